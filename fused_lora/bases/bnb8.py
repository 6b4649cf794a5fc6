"""The bitsandbytes 8-bit base kind (``bitsandbytes.nn.Linear8bitLt``: int8 weight with per-row scales, LLM.int8).

    LoRA: composed (bitsandbytes' own int8 matmul + the in-place rank-r kernels), PyTorch
    DoRA: refused (PEFT for DoRA on a quantized base)
    multi (several adapters, one per segment of rows): composed (multi_triton.COMPOSED), PyTorch (multi_torch.COMPOSED)

The base object (:class:`Bnb8Base`) runs the layer's own forward (LLM.int8 quantizes the activations too: the
self-check therefore checks the rank-r term apart from the base's output), and in backward ``dY · (CB · SCB / 127)`` in
x's dtype, as bitsandbytes' ``MatMul8bitLt.backward``. A merge dequantizes, adds and quantizes again, like PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import lora_torch, lora_triton, multi_torch, multi_triton
from ..quantized import QuantizedLoRALinear
from . import BaseKind, register

NAME = "bnb-8bit"


def detect(module: nn.Module) -> bool:
    return any(cls.__name__ == "Linear8bitLt" and cls.__module__.split(".")[0] == "bitsandbytes"
               for cls in type(module).__mro__)


@dataclass(frozen=True, eq=False)
class Bnb8Base:
    """A ``Linear8bitLt`` as the paths compute with it (see the module docstring)."""

    layer: nn.Module

    compute_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        weight = self.layer.weight
        cb = weight.CB if getattr(weight, "CB", None) is not None else self.layer.state.CB
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else self.layer.state.SCB
        return cb.float() * (scb.float().unsqueeze(1) / 127.0)

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return dy.to(x_dtype) @ self.dequantized().to(x_dtype)


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replaces the layer's int8 weight by ``weight`` (N×K, float) quantized again; its cached int8 state is reset so
    that its next forward reads the new weight."""
    import bitsandbytes as bnb

    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if k in ("has_fp16_weights",)}
    layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **kwargs).to(old.device)
    layer.state.reset_grads()
    layer.state.CB = layer.state.SCB = None


def _peft_layers() -> tuple[type, ...]:
    try:
        from peft.tuners.lora.bnb import Linear8bitLt
    except ImportError:
        return ()
    return (Linear8bitLt,)


KIND = register(BaseKind(
    name=NAME,
    describe="bitsandbytes Linear8bitLt",
    detect=detect,
    passes={
        ("lora", "torch"): lora_torch.COMPOSED,
        ("lora", "composed"): lora_triton.COMPOSED,
        ("multi", "torch"): multi_torch.COMPOSED,
        ("multi", "composed"): multi_triton.COMPOSED,
    },
    refusals={"dora": "use_dora=True on a bitsandbytes Linear8bitLt (a quantized base): fused_lora runs DoRA "
                      "(weight-decomposed LoRA) on floating-point nn.Linear / Conv1D bases only. Use plain LoRA on "
                      "this layer, or PEFT for DoRA on a quantized base"},
    base=Bnb8Base,
    requantize=requantize,
    wrap=QuantizedLoRALinear.wrap,
    peft_layers=_peft_layers,
))
