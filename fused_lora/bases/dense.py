"""The dense base kind: a floating-point ``nn.Linear`` (weight out×in, layout "linear") or transformers' GPT-2
``Conv1D`` (weight in×out, layout "conv1d"). ``LoRALinear`` holds such a layer's weight and bias itself; its paths read
the weight through strides in either layout, never transposed or copied.

    LoRA: fused (lora_triton.FUSED), composed (cuBLAS + in-place rank-r kernels, lora_triton.COMPOSED), PyTorch
    DoRA: fused (dora_triton.FUSED), PyTorch
    multi (several adapters, one per segment of rows): fused (multi_triton.FUSED), composed (multi_triton.COMPOSED),
          PyTorch (multi_torch.DENSE)
"""

from __future__ import annotations

from torch import nn

from ..backends import dora_torch, dora_triton, lora_torch, lora_triton, multi_torch, multi_triton
from . import DENSE, BaseKind, conv1d_class, register


def layout(module: nn.Module) -> str | None:
    """"linear" for an ``nn.Linear`` (and subclasses no other kind claims), "conv1d" for GPT-2's ``Conv1D``, else
    None."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def _detect(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return layout(module) is not None and weight is not None and weight.dtype.is_floating_point


def _in_out(module: nn.Module) -> tuple[int, int]:
    if layout(module) == "conv1d":
        return tuple(module.weight.shape)  # in×out
    return module.in_features, module.out_features


def _peft_layers() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    return (Linear,)


KIND = register(BaseKind(
    name=DENSE,
    describe="floating-point nn.Linear / GPT-2 Conv1D",
    detect=_detect,
    passes={
        ("lora", "torch"): lora_torch.DENSE,
        ("lora", "fused"): lora_triton.FUSED,
        ("lora", "composed"): lora_triton.COMPOSED,
        ("dora", "torch"): dora_torch.DENSE,
        ("dora", "fused"): dora_triton.FUSED,
        ("multi", "torch"): multi_torch.DENSE,
        ("multi", "fused"): multi_triton.FUSED,
        ("multi", "composed"): multi_triton.COMPOSED,
    },
    quantized=False,
    layout=lambda module: layout(module) or "linear",
    in_out=_in_out,
    peft_layers=_peft_layers,
))
