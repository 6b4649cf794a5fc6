"""The first-call self-check: faulty kernels, injected by wrapping the launchers, are caught on the first
call of their key; that call returns the PyTorch path's result (which passes the fp64 rule), one FallbackWarning names
the fault, the key moves on to the next path (fused → composed → PyTorch) and later calls run there. A key is checked
once (``first``), every call (``always``) or never (``off``); a report line holds every field."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import DEVICE
from test_fallbacks import counting
from test_functional import make_problem, run_and_check

import fused_lora
from fused_lora import FallbackWarning, LoRALinear, diagnostics, fallback, fused_lora_linear
from fused_lora.backends import bnb4_triton, dora_triton, lora_triton, path_state, self_check


@pytest.fixture(autouse=True)
def verifying(monkeypatch):
    """The Triton backend (the interpreter on CPU), the fused GEMM, the check on, nothing remembered."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")
    monkeypatch.delenv("FUSED_LORA_VERIFY_REPORT", raising=False)
    monkeypatch.setattr(fallback, "_warned", set())
    diagnostics.clear()
    fused_lora.set_verify("first")
    yield
    fused_lora.set_verify(None)
    diagnostics.clear()


def faulty(monkeypatch, module, name: str, fault) -> list[int]:
    """Wraps ``module.name`` so that ``fault`` is applied to what it returns; returns the list of its calls."""
    calls: list[int] = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return fault(real(*args, **kwargs), args, kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def one_element_off(out, args, kwargs):
    out = out.clone()
    out.view(-1)[0] += 1.0
    return out


def problem(seed=0, p_bias=True):
    return make_problem((3, 7), 40, 28, 6, torch.float32, "linear", p_bias, device=DEVICE, seed=seed)


def check_call(seed=0, p=0.3):
    """One forward + backward through the Triton backend, checked against fp64 by the tests' own rule: what the call
    returned is right whatever its kernels did."""
    run_and_check(*problem(seed), scaling=1.5, p=p, layout="linear", backend="triton")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_wrong_output_element_is_caught_on_the_first_call(monkeypatch, p):
    calls = faulty(monkeypatch, lora_triton, "lora_forward", one_element_off)
    composed = counting(monkeypatch, lora_triton, "lora_up_add")
    with pytest.warns(FallbackWarning, match=r"the fused path's forward .* disagrees with the PyTorch path .* y error"):
        check_call(p=p)  # passes the fp64 rule: the call returned the PyTorch path's output
    assert len(calls) == 1 and not composed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_call(seed=1, p=p)  # the key now runs the composed path, checked once, right: no warning
    assert len(calls) == 1 and len(composed) == 1
    (entry,) = fused_lora.path_report().values()
    assert not entry["verified"]["fused"]["forward"]["ok"] and entry["verified"]["composed"]["forward"]["ok"]
    assert entry["runs"] == "composed"


def test_only_db_wrong_walks_the_key_down_to_the_pytorch_path(monkeypatch):
    """dB comes from the dY pass, which the fused and the composed path share: the first backward of each is caught,
    and the key ends on the PyTorch path, every call's gradients right."""
    def db_off(out, args, kwargs):
        ds, db, dbias = out
        return ds, (db * 1.01 if db is not None else None), dbias

    calls = faulty(monkeypatch, lora_triton, "lora_dy_pass", db_off)
    with pytest.warns(FallbackWarning, match="the fused path's backward .* dB error"):
        check_call()
    with pytest.warns(FallbackWarning, match="the composed path's backward .* dB error"):
        check_call(seed=1)
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_call(seed=2)
    assert len(calls) == n, "the PyTorch path runs no Triton dY pass"
    assert next(iter(fused_lora.path_report().values()))["runs"] == "torch"


def test_a_nan_is_caught(monkeypatch):
    def nan(out, args, kwargs):
        out = out.clone()
        out[0, 0] = float("nan")
        return out

    faulty(monkeypatch, lora_triton, "lora_dx", nan)
    with pytest.warns(FallbackWarning, match="backward .* dx error inf"):
        check_call()


@pytest.mark.parametrize("launcher", ["lora_da", "lora_dx"])
def test_another_mask_in_backward_is_caught(monkeypatch, launcher):
    real = getattr(lora_triton, launcher)
    seed_at = 3 if launcher == "lora_da" else 5  # lora_da(ds, x, A, seed, p) / lora_dx(dy, W, ds, A, layout, seed, …)

    def other_mask(*args, **kwargs):
        args = list(args)
        args[seed_at] = args[seed_at] + 1  # a new seed (a device tensor: not changed in place)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_triton, launcher, other_mask)
    with pytest.warns(FallbackWarning, match=f"backward .* {'dA' if launcher == 'lora_da' else 'dx'} error"):
        check_call()


def test_training_with_a_faulty_kernel_follows_the_pytorch_path(monkeypatch):
    """A short training run whose fused forward kernel is wrong: one warning, and the losses of a PyTorch-path run."""
    def train(backend: str) -> list[float]:
        torch.manual_seed(0)
        layer = LoRALinear(40, 28, r=6, init_lora_weights=False).to(DEVICE)
        opt = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.bias], lr=0.1)
        x = torch.randn(12, 40, device=DEVICE)
        target = torch.randn(12, 28, device=DEVICE)
        monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
        losses = []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(layer(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    faulty(monkeypatch, lora_triton, "lora_forward", one_element_off)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = train("triton")
    assert sum(issubclass(w.category, FallbackWarning) for w in caught) == 1
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(train("torch")), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mode", "checks"), [("first", 2), ("always", 6), ("off", 0)])
def test_a_key_is_checked_once_always_or_never(monkeypatch, mode, checks):
    fused_lora.set_verify(mode)
    compared = counting(monkeypatch, self_check, "compare")
    for seed in range(3):
        check_call(seed=seed)
    assert len(compared) == checks


def test_the_default_is_first_on_cuda_and_off_elsewhere(monkeypatch):
    fused_lora.set_verify(None)
    monkeypatch.delenv("FUSED_LORA_VERIFY", raising=False)
    assert path_state.verify_mode(torch.device("cuda")) == "first"
    assert path_state.verify_mode(torch.device("cpu")) == "off"
    monkeypatch.setenv("FUSED_LORA_VERIFY", "always")
    assert path_state.verify_mode(torch.device("cpu")) == "off", "read once (this runs on every call)"
    fused_lora.set_verify(None)  # read the environment again
    assert path_state.verify_mode(torch.device("cpu")) == "always"
    monkeypatch.setenv("FUSED_LORA_VERIFY", "sometimes")
    fused_lora.set_verify(None)
    with pytest.raises(ValueError, match="FUSED_LORA_VERIFY='sometimes'"):
        path_state.verify_mode(torch.device("cpu"))
    with pytest.raises(ValueError, match="mode='never'"):
        fused_lora.set_verify("never")


def test_the_report_line_has_every_field(monkeypatch, tmp_path):
    report = tmp_path / "verify.jsonl"
    monkeypatch.setenv("FUSED_LORA_VERIFY_REPORT", str(report))
    faulty(monkeypatch, lora_triton, "lora_forward", one_element_off)
    with pytest.warns(FallbackWarning):
        check_call()
    (line,) = report.read_text().splitlines()
    record = json.loads(line)
    for field in ("gpu", "capability", "triton", "torch", "key", "path", "direction", "moved_to", "worst", "error",
                  "bound", "shapes", "dtypes"):
        assert field in record, field
    assert record["path"] == "fused" and record["moved_to"] == "composed" and record["worst"] == "y"
    assert record["error"] > record["bound"] and record["shapes"]["x"] == [21, 40]


def test_a_faulty_4bit_gemm_is_caught():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4").to(DEVICE)
    layer = LoRALinear.from_linear(base, r=4, init_lora_weights=False)
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        real = bnb4_triton.forward_4bit
        mp.setattr(bnb4_triton, "forward_4bit", lambda *a, **k: one_element_off(real(*a, **k), a, k))
        with pytest.warns(FallbackWarning, match="the fused path's forward"):
            y = layer(x)
    want = base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_a_faulty_dora_kernel_is_caught(monkeypatch):
    layer = LoRALinear(40, 28, r=6, use_dora=True, init_lora_weights=False).to(DEVICE)
    x = torch.randn(9, 40, device=DEVICE, requires_grad=True)

    def y_off(out, args, kwargs):
        y, P = out
        return one_element_off(y, args, kwargs), P

    faulty(monkeypatch, dora_triton, "dora_forward_gemm", y_off)
    with pytest.warns(FallbackWarning, match="dora\\|.* y error"):
        y = layer(x)
    want = fused_lora.dora_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                               layer.scaling)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_a_right_kernel_is_not_flagged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(2):
            check_call(seed=seed)
            run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "conv1d", False, device=DEVICE, seed=seed),
                          scaling=1.0, p=0.0, layout="conv1d", backend="triton")
    verdicts = [v for entry in fused_lora.path_report().values() for path in entry["verified"].values()
                for v in path.values()]
    assert len(verdicts) == 4 and all(v["ok"] for v in verdicts)


def test_fused_lora_linear_returns_the_checked_result_shape(monkeypatch):
    """An N-D input whose check fails still gets its N-D output (the fallback result is reshaped like the kernels')."""
    faulty(monkeypatch, lora_triton, "lora_forward", one_element_off)
    x, weight, bias, lora_A, lora_B = problem()
    with pytest.warns(FallbackWarning):
        y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.0, backend="triton")
    assert y.shape == (3, 7, 28)
