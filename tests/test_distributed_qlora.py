"""A bitsandbytes 4-bit layer as FSDP2 hands it to a LoRA layer's forward and backward, in one process: its weight a
plain tensor holding the packed bytes (``fully_shard`` turns the ``Params4bit`` into a DTensor and gathers it into a
plain Parameter without ``quant_state``), its quantization state on the layer only. The fused and composed 4-bit paths
read the state from the layer, on both backends and for every ``bnb_4bit_quant_storage``: the same output and gradients
as with the ``Params4bit``. The two-process runs (sharded weights, training) are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from fused_lora.backends.bnb4_triton import quant_state_of  # noqa: E402
from fused_lora.bases.bnb4 import standard_4bit_packing  # noqa: E402
from fused_lora.quantized import quantized_lora  # noqa: E402

K, N, R, M = 64, 48, 4, 7  # K a multiple of the blocksize (every real projection), M odd


def layer_4bit(storage: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                              quant_storage=storage)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def as_fsdp2_gathers_it(layer: nn.Module) -> None:
    """The weight replaced by a plain Parameter over the same packed bytes, as FSDP2's unshard leaves it (before the
    forward, and again before the backward: bitsandbytes' own forward wraps it in a Params4bit, which FSDP2's reshard
    drops)."""
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    assert getattr(layer.weight, "quant_state", None) is None and layer.quant_state is not None


def run(layer, backend, x, lora_A, lora_B, gathered: bool):
    x = x.clone().requires_grad_(True)
    A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
    if gathered:
        as_fsdp2_gathers_it(layer)
    y = quantized_lora(x, layer, A, B, 2.0, backend=backend)
    assert type(y.grad_fn).__name__ == "FusedLoRAFunctionBackward"
    if gathered:
        as_fsdp2_gathers_it(layer)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32],
                         ids=["uint8", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("path", ["torch", "triton-fused", "triton-composed"])
def test_gathered_plain_weight_reads_the_layers_quant_state(monkeypatch, storage, path):
    backend, _, gemm = path.partition("-")
    if gemm:
        monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, M, K, generator=g)[:, ::2]  # leading dims, not contiguous
    lora_A, lora_B = torch.randn(R, K, generator=g) * 0.1, torch.randn(N, R, generator=g) * 0.1
    want = run(layer_4bit(storage), backend, x, lora_A, lora_B, gathered=False)
    got = run(layer_4bit(storage), backend, x, lora_A, lora_B, gathered=True)
    for name, g_, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert torch.equal(g_, w), f"{name}: max |Δ| {(g_ - w).abs().max().item():.3g}"


def test_a_weight_repacked_for_cpu_inference_before_sharding_is_refused():
    """bitsandbytes' CPU inference repack rewrites the bytes and the state; once FSDP2 sharded those bytes, a gathered
    copy cannot be put back in place: a clear error instead of a wrong weight."""
    layer = layer_4bit(torch.uint8)
    state = quant_state_of(layer)
    state.packing_format_for_cpu = True  # what the repack leaves on the state (the bytes do not matter here)
    as_fsdp2_gathers_it(layer)
    with pytest.raises(ValueError, match=r"repacked for bitsandbytes' CPU inference.*before FSDP sharded it"):
        standard_4bit_packing(layer)


def test_the_router_reads_the_blocksize_from_the_layer():
    """On a GPU the router checks K against the blocksize before choosing the fused 4-bit GEMM: from the layer's state
    when the weight is a gathered plain tensor (an AttributeError before)."""
    from types import SimpleNamespace

    from fused_lora.bases import bnb4

    layer = layer_4bit(torch.uint8)
    as_fsdp2_gathers_it(layer)
    base = SimpleNamespace(layer=layer, compute_dtype=torch.float32)
    on_gpu = SimpleNamespace(dtype=torch.float32, device=SimpleNamespace(type="cuda"), shape=(3, K))
    assert bnb4.fused_fits(on_gpu, base)
    assert not bnb4.fused_fits(SimpleNamespace(dtype=torch.float32, device=on_gpu.device, shape=(3, K + 1)), base)
