"""Several adapters on one base (the ``multi`` variant) through the router and the one driver: ``multi_lora_linear`` →
``dispatch.multi_call`` → ``FusedLoRAFunction`` on both backends (the kernels through Triton's interpreter on CPU).

- y and every gradient (x, each A_i and B_i, the base bias, each own bias) against fp64 (``reference.multi_lora_ref``,
  each segment through the single-adapter reference with the backend's own mask) by the tests' rule; N-D and
  non-contiguous x, empty segments (no gradient for an adapter without rows), both layouts, bf16 with fp32 adapters;
- the Triton backend's three paths (fused, composed, the PyTorch path with the kernels' masks) agree, ``auto`` times
  them per key (n adapters, ranks, dropout pattern, own biases in the key);
- the self-check catches a faulty multi-adapter kernel (forward and backward) and a kernel that cannot run walks the
  key to the next path; a check made while an adapter's B is zero is owed again;
- backward(create_graph=True), torch.compile (fullgraph, one opaque op per direction), torch.func, 4-bit and 8-bit
  bases, refusals.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import CUDA, DEVICE
from test_multi_kernels import Case, _check, build, masks, references

import fused_lora
from fused_lora import FallbackWarning, diagnostics, fallback, hardware
from fused_lora.backends import multi_triton, path_choice
from fused_lora.multi_layer import multi_lora_linear
from fused_lora.segments import Segments

# (case, backends): odd K/N, ranks not multiples of 4, empty segments, own biases, dropout on some adapters
CASES = [
    Case((5, 0, 12), (3, 8, 1), (0.25, 0.0, 0.1), torch.float32, "linear", "own", K=21, N=13),
    Case((0, 9, 4), (2, 5, 4), (0.0, 0.3, 0.0), torch.bfloat16, "conv1d", "base", "transposed", K=18, N=11),
    Case((7, 6), (4, 2), (0.0, 0.0), torch.float32, "linear", "none", "sliced", K=16, N=9),
]


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    monkeypatch.setattr(fallback, "_warned", set())
    diagnostics.clear()
    yield
    fused_lora.set_verify(None)
    path_choice.set_timer(None)
    diagnostics.clear()


def run_call(d: dict, case: Case, backend: str, **kwargs) -> dict:
    """One forward and backward through multi_lora_linear on leaves of ``d``'s tensors (x given a leading dim)."""
    x = d["x"].detach().requires_grad_()
    As = [a.detach().clone().requires_grad_() for a in d["A"]]
    Bs = [b.detach().clone().requires_grad_() for b in d["B"]]
    bias = d["bias"].detach().clone().requires_grad_() if d["bias"] is not None else None
    own = [b.detach().clone().requires_grad_() if b is not None else None for b in d["own"]]
    y = multi_lora_linear(x.unsqueeze(0), d["weight"], bias, As, Bs, d["scalings"], case.lengths, case.ps, True,
                          case.layout, biases=own if any(o is not None for o in own) else None,
                          dropout_seeds=d["seeds"], backend=backend, **kwargs)
    assert y.shape == (1, x.shape[0], case.N) and y.dtype == case.dtype
    y.backward(d["dy"].unsqueeze(0))
    return {"y": y.detach()[0], "dx": x.grad, "dA": [a.grad for a in As], "dB": [b.grad for b in Bs],
            "dbias": bias.grad if bias is not None else None, "own": [b.grad if b is not None else None for b in own]}


def check_against_fp64(got: dict, d: dict, case: Case, backend: str) -> None:
    ref, same = references(d, case, masks("torch" if backend == "torch" else "triton-fused", case, d["seeds"]))
    _check("y", got["y"], same["y"], ref["y"], case.dtype)
    _check("dx", got["dx"], same["dx"], ref["dx"], case.dtype)
    for i, n in enumerate(case.lengths):
        if n == 0:  # no rows: no part in the call, no gradient (an optimizer leaves the adapter alone)
            assert got["dA"][i] is None and got["dB"][i] is None and got["own"][i] is None, i
            continue
        _check(f"dA[{i}]", got["dA"][i], same["dA"][i], ref["dA"][i], torch.float32)
        _check(f"dB[{i}]", got["dB"][i], same["dB"][i], ref["dB"][i], torch.float32)
        if ref["own"][i] is not None:
            _check(f"own bias[{i}]", got["own"][i], same["own"][i], ref["own"][i], torch.float32)
    assert (got["dbias"] is None) == (ref["dbias"] is None)
    if ref["dbias"] is not None:
        _check("dbias", got["dbias"], same["dbias"], ref["dbias"], torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_through_the_function_against_fp64(case, backend):
    d = build(case, seed=11)
    check_against_fp64(run_call(d, case, backend), d, case, backend)
    if backend == "triton":
        (key,) = diagnostics.path_report()
        assert key.startswith("multi|") and f"n{len(case.ranks)}|R{'.'.join(map(str, case.ranks))}" in key


@pytest.mark.skipif(CUDA, reason="the PyTorch path as a Triton-backend candidate: forced through the injected timer")
@pytest.mark.parametrize("faster", ["composed", "torch"])
def test_auto_times_the_three_paths_and_each_is_right(faster, monkeypatch):
    """auto on a GPU-like CPU: the candidates are timed once per key (forward and backward), the fastest kept; the
    composed path and the PyTorch path with the kernels' masks give what the fused path gives."""
    monkeypatch.setattr(hardware, "device_capability", lambda device: (9, 0))
    monkeypatch.setenv("FUSED_LORA_GEMM_CACHE", "")
    calls: list[str] = []

    def timer(name, fn, device):
        calls.append(name)
        fn()
        return 1.0 if name == faster else 2.0

    path_choice.set_timer(timer)
    case = CASES[0]
    d = build(case, seed=3)
    got = run_call(d, case, "triton")
    (entry,) = diagnostics.path_report().values()
    assert entry["chosen"] == entry["runs"] == faster
    assert sorted(set(calls)) == ["composed", "fused", "torch"]
    check_against_fp64(got, d, case, "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")
    fused = run_call(d, case, "triton")
    for name in ("y", "dx"):
        torch.testing.assert_close(got[name], fused[name], rtol=2e-5, atol=2e-5)
    for i in (0, 2):
        torch.testing.assert_close(got["dA"][i], fused["dA"][i], rtol=2e-5, atol=2e-5)


def _perturb(monkeypatch, name: str):
    real = getattr(multi_triton, name)

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        out = out.clone()
        # y / dX: the last segment's last row; dA_cat: adapter 0's first rank (the last rows are rank padding)
        out.view(-1)[0 if name == "multi_lora_da" else -1] += 1.0
        return out

    monkeypatch.setattr(multi_triton, name, wrong)


@pytest.mark.parametrize("launcher", ["multi_lora_forward", "multi_lora_da", "multi_lora_dx"])
def test_the_self_check_catches_a_faulty_kernel(launcher, monkeypatch):
    """A wrong element in the fused GEMM's y, in one adapter's dA or in dX: the first call's check finds it, returns
    the PyTorch path's result (right by the fp64 rule), warns once and moves the key on."""
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")
    fused_lora.set_verify("first")
    _perturb(monkeypatch, launcher)
    case = CASES[0]
    d = build(case, seed=5)
    with pytest.warns(FallbackWarning, match="disagrees with the PyTorch path"):
        got = run_call(d, case, "triton")
    check_against_fp64(got, d, case, "triton")
    (entry,) = diagnostics.path_report().values()
    assert entry["demoted_to"] == "composed"
    verdicts = entry["verified"]["fused"]
    failed = [v for v in verdicts.values() if not v["ok"]]
    assert len(failed) == 1 and failed[0]["worst"] == {"multi_lora_forward": "y", "multi_lora_da": "dA[0]",
                                                       "multi_lora_dx": "dx"}[launcher]


def test_a_right_kernel_passes_every_check_and_b_zero_is_owed(monkeypatch):
    """The check passes the real kernels (dropout, own biases, empty segment), per segment; with an adapter's B = 0
    (PEFT's init) the check is owed until B changes, then made again."""
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    fused_lora.set_verify("first")
    case = CASES[0]
    d = build(case, seed=6)
    d["B"][2] = torch.zeros_like(d["B"][2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        run_call(d, case, "triton")
    (entry,) = diagnostics.path_report().values()
    assert all(v["ok"] for v in entry["verified"]["composed"].values())
    assert entry["owed"] == ["composed backward:dx,dA,dB,dbias", "composed forward"]
    d["B"][2] = torch.randn_like(d["B"][2])  # the optimizer moved B: a new tensor
    run_call(d, case, "triton")
    (entry,) = diagnostics.path_report().values()
    assert entry["owed"] == []


def test_a_kernel_that_cannot_run_walks_to_the_next_path(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")

    def cannot(*args, **kwargs):
        raise OutOfResources(240 * 1024, 99 * 1024, "shared memory")

    monkeypatch.setattr(multi_triton, "multi_lora_forward", cannot)
    case = CASES[0]
    d = build(case, seed=7)
    with pytest.warns(FallbackWarning, match="a Triton kernel of the fused path's forward failed"):
        got = run_call(d, case, "triton")
    check_against_fp64(got, d, case, "triton")
    (entry,) = diagnostics.path_report().values()
    assert entry["runs"] == "composed" and entry["kernel_failures"][0]["path"] == "fused"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_create_graph_gives_exact_second_derivatives(backend):
    """backward(create_graph=True): per segment, LoRA's differentiable backward with the forward's mask; a gradient
    penalty's gradient equals the reference's (autograd twice through multi_lora_ref with the same masks)."""
    from fused_lora.reference import multi_lora_ref

    case = CASES[0]
    d = build(case, seed=8)
    mask_list = masks("torch" if backend == "torch" else "triton-fused", case, d["seeds"])
    results = []
    for fused in (True, False):
        x = d["x"].detach().clone().requires_grad_()
        As = [a.detach().clone().requires_grad_() for a in d["A"]]
        Bs = [b.detach().clone().requires_grad_() for b in d["B"]]
        if fused:
            y = multi_lora_linear(x, d["weight"], d["bias"], As, Bs, d["scalings"], case.lengths, case.ps,
                                  dropout_seeds=d["seeds"], backend=backend)
        else:
            y = multi_lora_ref(x, d["weight"], d["bias"], As, Bs, d["scalings"], list(case.lengths),
                               dropout_masks=mask_list)
        gx, ga = torch.autograd.grad(y.square().sum(), [x, As[0]], create_graph=True)
        penalty = gx.square().sum() + ga.square().sum()
        results.append(torch.autograd.grad(penalty, [x, As[0], Bs[0], Bs[2]]))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    """torch.compile traces a multi-adapter call as the driver's two custom ops (no graph break), same results."""
    torch._dynamo.reset()
    case = CASES[0]
    d = build(case, seed=9)
    segments = Segments(case.lengths, case.ranks)
    seeds = torch.tensor(d["seeds"], dtype=torch.int64, device=DEVICE)

    def fn(x, As, Bs):
        return multi_lora_linear(x, d["weight"], d["bias"], As, Bs, d["scalings"], segments, case.ps,
                                 dropout_seeds=seeds, backend=backend).relu()

    def grads(f):
        x = d["x"].detach().clone().requires_grad_()
        As = [a.detach().clone().requires_grad_() for a in d["A"]]
        Bs = [b.detach().clone().requires_grad_() for b in d["B"]]
        y = f(x, As, Bs)
        y.square().sum().backward()
        return [y.detach(), x.grad, As[0].grad, Bs[2].grad]

    explanation = torch._dynamo.explain(fn)(d["x"], d["A"], d["B"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(fn), grads(compiled), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_func_runs_the_plain_ops():
    """Under torch.func the router runs PEFT's ops per segment: the same gradients as the Function."""
    case = CASES[2]
    d = build(case, seed=10)

    def loss(As, x):
        return multi_lora_linear(x, d["weight"], d["bias"], As, d["B"], d["scalings"], case.lengths,
                                 backend="torch").square().sum()

    got = torch.func.grad(loss)(list(d["A"]), d["x"])
    As = [a.detach().clone().requires_grad_() for a in d["A"]]
    loss(As, d["x"]).backward()
    for g, a in zip(got, As, strict=True):
        torch.testing.assert_close(g, a.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "backend", "gemm"), [(4, "triton", "fused"), (4, "triton", "composed"),
                                                       (4, "torch", ""), (8, "triton", "composed")])
def test_quantized_bases(bits, backend, gemm, monkeypatch):
    """A bitsandbytes 4-bit / 8-bit base through the Function: against fp64 on the layer's own dequantized W."""
    pytest.importorskip("bitsandbytes")
    from test_multi_kernels_quantized import _bnb_base

    if gemm:
        monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    fused_lora.set_verify("first")  # every check passes on the real kernels
    case = Case((6, 0, 9), (3, 16, 2), (0.2, 0.0, 0.0), torch.float32, "linear", "own", K=64, N=19)
    base = _bnb_base(bits, case.K, case.N, torch.float32)
    d = build(case, seed=bits)
    d["bias"] = None  # the layer's own bias: frozen, read by the layer
    x = d["x"].detach().requires_grad_()
    As = [a.detach().clone().requires_grad_() for a in d["A"]]
    Bs = [b.detach().clone().requires_grad_() for b in d["B"]]
    own = [b.detach().clone().requires_grad_() if b is not None else None for b in d["own"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        y = multi_lora_linear(x, None, base.layer.bias, As, Bs, d["scalings"], case.lengths, case.ps, biases=own,
                              dropout_seeds=d["seeds"], backend=backend, layer=base.layer)
        y.backward(d["dy"])
    d["bias"] = base.layer.bias.detach()
    d["weight"] = base.dequantized().float()
    ref, same = references(d, case, masks("torch" if backend == "torch" else "triton-fused", case, d["seeds"]))
    _check("y", y.detach(), same["y"], ref["y"], case.dtype)
    _check("dx", x.grad, same["dx"], ref["dx"], case.dtype)
    for i in (0, 2):
        _check(f"dA[{i}]", As[i].grad, same["dA"][i], ref["dA"][i], torch.float32)
        _check(f"dB[{i}]", Bs[i].grad, same["dB"][i], ref["dB"][i], torch.float32)
    assert As[1].grad is None
    if backend == "triton":
        (entry,) = diagnostics.path_report().values()
        assert entry["runs"] == gemm and all(v["ok"] for v in entry["verified"][gemm].values())


def test_bad_input_is_named():
    case = CASES[2]
    d = build(case)
    with pytest.raises(ValueError, match="sum to 12 rows but x has 13 rows"):
        multi_lora_linear(d["x"], d["weight"], None, d["A"], d["B"], d["scalings"], (6, 6))
    with pytest.raises(ValueError, match="one lora_A, lora_B, scaling"):
        multi_lora_linear(d["x"], d["weight"], None, d["A"], d["B"][:1], d["scalings"], case.lengths)
    with pytest.raises(ValueError, match="share one floating dtype"):
        multi_lora_linear(d["x"], d["weight"], None, [d["A"][0].double(), d["A"][1]], d["B"], d["scalings"],
                          case.lengths)


def test_a_kind_without_multi_passes_is_refused():
    """A plug-in kind that lists no multi-adapter passes: one message naming it."""
    import toy_int8_kind

    toy_int8_kind.register()
    try:
        layer = toy_int8_kind.Int8Linear(16, 8)
        with pytest.raises(TypeError, match="multi on a .* base is not supported"):
            multi_lora_linear(torch.randn(3, 16), None, None, [torch.randn(2, 16)], [torch.randn(8, 2)], [1.0], (3,),
                              layer=layer)
    finally:
        toy_int8_kind.unregister()
