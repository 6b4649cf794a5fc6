"""The base-kind seam: a toy quantized kind registered from one file (tests/toy_int8_kind.py) runs through inject_lora,
merge, PEFT's accelerate and the self-check with no other change to fused_lora."""

from __future__ import annotations

import warnings

import pytest
import torch
import toy_int8_kind as toy
from helpers import DEVICE
from torch import nn

import fused_lora
from fused_lora import FallbackWarning, LoRAConfig, QuantizedLoRALinear, diagnostics, fallback, inject_lora, merge_lora
from fused_lora.backends import lora_triton


@pytest.fixture(autouse=True)
def toy_kind(monkeypatch):
    toy.register()
    monkeypatch.setattr(fallback, "_warned", set())
    diagnostics.clear()
    yield
    toy.unregister()
    diagnostics.clear()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = toy.Int8Linear(40, 24).to(DEVICE)
        self.v_proj = toy.Int8Linear(40, 24, bias=False).to(DEVICE)
        self.head = nn.Linear(24, 3).to(DEVICE)

    def forward(self, x):
        return self.head(torch.tanh(self.q_proj(x) + self.v_proj(x)))


def reference(layers, x):
    """The LoRA layers' math on the dequantized weights, in fp64."""
    out = []
    for layer in layers:
        w = layer.base_layer.dequantized().double()
        b = None if layer.base_layer.bias is None else layer.base_layer.bias.double()
        y = nn.functional.linear(x.double(), w, b)
        out.append(y + layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t())
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inject_wraps_and_trains_the_toy_kind(monkeypatch, backend):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")  # the kind has no fused path: its composed one runs
    model = inject_lora(Net(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    assert isinstance(model.q_proj, QuantizedLoRALinear) and model.q_proj.quantization == toy.NAME
    x = torch.randn(7, 40, device=DEVICE, requires_grad=True)
    yq, yv = model.q_proj(x), model.v_proj(x)
    want_q, want_v = reference((model.q_proj, model.v_proj), x)
    torch.testing.assert_close(yq.double(), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yv.double(), want_v, rtol=1e-5, atol=1e-5)
    (yq.square().sum() + yv.sum()).backward()
    assert model.q_proj.lora_A.grad is not None and model.q_proj.base_layer.weight.grad is None
    if backend == "triton":
        runs = {entry["runs"] for entry in fused_lora.path_report().values()}
        assert runs == {"composed"} and all(k.startswith("lora-toy-int8|") for k in fused_lora.path_report())


def test_merge_writes_the_weight_back_in_the_kinds_format():
    model = inject_lora(Net(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(5, 40, device=DEVICE)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="lossy"):
        merge_lora(model)
    assert model.q_proj.merged and model.q_proj.base_layer.weight.dtype == torch.int8
    with torch.no_grad():
        after = model(x)
    # int8 requantization: off by about the quantization step, not by the adapter's size
    assert (after - before).abs().max() < 0.05 < (before - Net()(x)).abs().max()


def test_peft_accelerate_serves_the_toy_kind(monkeypatch):
    peft = pytest.importorskip("peft")
    import fused_lora.peft as flp

    monkeypatch.setenv("FUSED_LORA_NATIVE", "0")
    base = Net()
    plain = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    fused = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    fused.load_state_dict(plain.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every LoRA layer served
        flp.accelerate(fused)
    x = torch.randn(6, 40, device=DEVICE)
    y = fused(x)
    assert "FusedLoRAFunction" in type(fused.base_model.model.q_proj(x).grad_fn).__name__
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    plain(x).sum().backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_self_check_covers_the_toy_kind(monkeypatch):
    """A wrong rank-r kernel on the toy kind's composed path is caught on its first call, and the call returns the
    PyTorch path's result."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    fused_lora.set_verify("first")
    real = lora_triton.lora_up_add

    def doubled(y, s, lora_B, scaling):
        return real(y, s, lora_B, 2 * scaling)

    monkeypatch.setattr(lora_triton, "lora_up_add", doubled)
    try:
        model = inject_lora(Net(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
        x = torch.randn(5, 40, device=DEVICE)
        with pytest.warns(FallbackWarning, match="composed path's forward .* lora-toy-int8"):
            y = model.q_proj(x)
    finally:
        fused_lora.set_verify(None)
    torch.testing.assert_close(y.double(), reference((model.q_proj,), x)[0], rtol=1e-5, atol=1e-5)
