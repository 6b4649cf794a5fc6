"""LoRALinear: construction, sharing, PEFT-like init, merge/unmerge, adapter on/off, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE
from transformers.pytorch_utils import Conv1D

from fused_lora import LoRALinear, lora_linear_ref


def base_layers():
    torch.manual_seed(0)
    return {"linear": torch.nn.Linear(20, 12), "conv1d": Conv1D(12, 20)}  # Conv1D(nf=out, nx=in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_linear_shares_weights_and_starts_as_the_base_layer(kind, monkeypatch):
    base = base_layers()[kind].to(DEVICE)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.weight_layout == kind and (layer.in_features, layer.out_features) == (20, 12)
    assert layer.scaling == 2.0
    x = torch.randn(3, 5, 20).to(DEVICE)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    assert torch.equal(layer(x), base(x))  # B = 0: bit for bit the base output (same GEMM + a zero update)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    # The kernels' own GEMM sums in another order than the CPU BLAS: equal up to fp32 rounding.
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_constructor_matches_layouts_and_rslora():
    lin = LoRALinear(20, 12, r=16, lora_alpha=32, use_rslora=True)
    assert lin.weight.shape == (12, 20) and lin.scaling == pytest.approx(32 / math.sqrt(16))
    conv = LoRALinear(20, 12, bias=False, weight_layout="conv1d")
    assert conv.weight.shape == (20, 12) and conv.bias is None
    half = LoRALinear(20, 12, dtype=torch.bfloat16)
    assert half.lora_A.dtype == torch.float32  # PEFT keeps adapters fp32 on a half base
    assert LoRALinear(20, 12, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16).lora_B.dtype == torch.bfloat16
    assert set(dict(lin.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


def test_init_modes():
    torch.manual_seed(0)
    default = LoRALinear(256, 64, r=32)
    assert torch.count_nonzero(default.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on fan_in=256
    assert default.lora_A.abs().max() <= bound and default.lora_A.abs().max() > 0.9 * bound
    gaussian = LoRALinear(256, 64, r=32, init_lora_weights="gaussian")
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 32, rel=0.1)
    assert torch.count_nonzero(gaussian.lora_B) == 0
    random = LoRALinear(256, 64, r=32, init_lora_weights=False)
    assert torch.count_nonzero(random.lora_B) > 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    base = base_layers()[kind]
    original = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    layer.eval()
    x = torch.randn(7, 20)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # not added twice
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)  # the base layer itself now includes it
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_disable_adapter_gives_exactly_the_base_output(kind):
    base = base_layers()[kind]
    layer = LoRALinear.from_linear(base, r=4, init_lora_weights=False, lora_dropout=0.2)
    x = torch.randn(2, 6, 20)
    with layer.disable_adapter():
        assert not layer.enabled
        assert torch.equal(layer(x), base(x))
    assert layer.enabled
    assert not torch.allclose(layer(x), base(x))
    layer.enabled = False
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_only_the_adapters(backend, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    layer = LoRALinear(20, 12, r=4, init_lora_weights=False, lora_dropout=0.0).to(DEVICE)
    x = torch.randn(5, 20).to(DEVICE)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_eval_mode_turns_dropout_off():
    layer = LoRALinear(20, 12, r=4, init_lora_weights=False, lora_dropout=0.5).eval()
    x = torch.randn(5, 20)
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_base_checkpoint_keys_load():
    base = torch.nn.Linear(20, 12)
    layer = LoRALinear(20, 12, r=4)
    missing, unexpected = layer.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(layer.weight, base.weight)
