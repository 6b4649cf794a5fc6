"""The self-check where people train: faults a first call at PEFT's default init cannot show (B = 0 zeroes the rank-r
terms; DoRA starts at g = 1), a fault in S, a fault only the dropout branches have behind an eval-first call, a wrong
rank-r term on an 8-bit base. Each is caught before it changes a training result: a short training run at the default
init with the fault gives the losses and adapters of the same run without it (the calls that would be wrong return the
PyTorch path's result, with the kernels' own dropout mask), and the fault is named in one FallbackWarning.

Faults are injected by wrapping the launchers (the kernels run through Triton's interpreter)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DEVICE
from test_self_check import verifying  # noqa: F401  (its autouse fixture: Triton backend, fused GEMM, check on)

from fused_lora import FallbackWarning, LoRALinear, diagnostics
from fused_lora.backends import dora_triton, lora_triton


def train(make_layer, steps: int = 4, p_eval_first: bool = False, micro: int = 1) -> tuple[list[float], dict]:
    """A few AdamW steps of one layer at PEFT's default init (B = 0), dropout on; ``micro`` micro-batches per step
    (gradient accumulation: B stays zero for all of the first step's). Returns the losses and the final adapters."""
    torch.manual_seed(0)
    layer = make_layer()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(micro, 13, 40, generator=gen).to(DEVICE)
    target = torch.randn(micro, 13, 28, generator=gen).to(DEVICE)
    if p_eval_first:  # evaluation before training: a p = 0 call of the same shape
        layer.eval()
        with torch.no_grad():
            layer(x[0])
        layer.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for i in range(micro):
            loss = torch.nn.functional.mse_loss(layer(x[i]), target[i])
            (loss / micro).backward()
            losses.append(loss.item())
        opt.step()
    return losses, {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}


def faulty(monkeypatch, module, name: str, wrap) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return wrap(real, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def rank_term_doubled(real, x, weight, bias, s, lora_B, scaling, layout):
    return real(x, weight, bias, s, lora_B, 2 * scaling, layout)


def da_doubled(real, *args, **kwargs):
    return 2 * real(*args, **kwargs)


def s_off(real, *args, **kwargs):
    return 1.5 * real(*args, **kwargs)


def dropout_mask_off(real, x, lora_A, seed, p, *args, **kwargs):
    # the wrong mask only where there is dropout: an eval call (p = 0) cannot show it
    return real(x, lora_A, seed + 1 if p > 0 else seed, p, *args, **kwargs)


def dora_g_minus_one_doubled(real, x, xd, weight, bias, s, lora_B, norm, magnitude, *args):
    # (g − 1) doubled (and g in the rank-r term, which is zero while B = 0): invisible while g = 1
    return real(x, xd, weight, bias, s, lora_B, norm, norm + 2 * (magnitude.float() - norm), *args)


def lora_layer():
    return LoRALinear(40, 28, r=6, lora_alpha=12, lora_dropout=0.2).to(DEVICE)


def dora_layer():
    return LoRALinear(40, 28, r=6, lora_alpha=12, lora_dropout=0.2, use_dora=True).to(DEVICE)


CASES = {
    "rank-r term doubled": (lora_triton, "lora_forward", rank_term_doubled, lora_layer, {}),
    "dA doubled": (lora_triton, "lora_da", da_doubled, lora_layer, {}),
    "dA doubled, gradient accumulation": (lora_triton, "lora_da", da_doubled, lora_layer, {"micro": 3}),
    "S off": (lora_triton, "lora_down", s_off, lora_layer, {}),
    "dropout mask off after an eval call": (lora_triton, "lora_down", dropout_mask_off, lora_layer,
                                            {"p_eval_first": True}),
    "DoRA (g - 1) doubled": (dora_triton, "dora_forward_gemm", dora_g_minus_one_doubled, dora_layer, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fault_hidden_at_the_default_init_never_changes_training(monkeypatch, case):
    module, name, wrap, make_layer, kwargs = CASES[case]
    clean_losses, clean_params = train(make_layer, **kwargs)
    diagnostics.clear()
    calls = faulty(monkeypatch, module, name, wrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, params = train(make_layer, **kwargs)
    assert calls, "the fault was never on the path"
    named = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert named, f"{case}: no check caught it"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(clean_losses), rtol=1e-5, atol=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(p, clean_params[n], rtol=1e-4, atol=1e-6, msg=f"{case}: {n}")


def test_a_check_at_b_zero_is_owed_until_b_has_changed():
    """At PEFT's default init the first check cannot see the rank-r terms: it is owed, made again once the optimizer
    has moved B, and then settled (no check on later calls)."""
    losses, _ = train(lora_layer, steps=3)
    (entry,) = diagnostics.path_report().values()
    assert not entry["owed"], "a check with B != 0 settled it"
    checks = list(entry["verified"]["fused"])
    assert checks == ["forward", "backward:dA,dB"] and all(v["ok"] for v in entry["verified"]["fused"].values())


def test_a_wrong_lora_term_on_an_8bit_base_is_caught(monkeypatch):
    """LLM.int8 rounds the activations, an error both the path and the PyTorch path carry against fp64: the check
    compares the rank-r term apart from the base layer's own output, so a 2% error in it is caught."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)

    def layer8():
        torch.manual_seed(0)
        base = bnb.nn.Linear8bitLt(40, 28, bias=True, has_fp16_weights=False, threshold=6.0).to(DEVICE)
        return LoRALinear.from_linear(base, r=6, lora_alpha=12, lora_dropout=0.2)

    clean_losses, clean_params = train(layer8, steps=3)
    diagnostics.clear()
    faulty(monkeypatch, lora_triton, "lora_up_add", lambda real, y, s, B, scaling: real(y, s, B, 1.02 * scaling))
    with pytest.warns(FallbackWarning, match="composed path's forward .* lora-bnb-8bit"):
        losses, params = train(layer8, steps=3)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(clean_losses), rtol=1e-5, atol=1e-6)
