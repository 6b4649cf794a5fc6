"""A whole base kind in one file: int8 weights with one fp32 scale per output channel (the shape of GPTQ/HQQ-class
formats, without their packing). Importing this module registers it; nothing else in fused_lora knows it. It says how
to recognise such a layer, its base object (its own forward, input gradient and dequantized weight), how a merge
writes the weight back, the module that wraps it (the generic quantized one), and its paths: the composed path
(the layer's own matmul + the in-place rank-r kernels) and the PyTorch path. PEFT wraps an ``nn.Linear`` subclass in
its generic ``lora.Linear``, which fused_lora.peft already serves, so the kind names no PEFT class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fused_lora import QuantizedLoRALinear, bases
from fused_lora.backends import lora_torch, lora_triton

NAME = "toy-int8"


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scale per row): w ≈ codes · scale[:, None]."""
    scale = weight.detach().float().abs().amax(dim=1).clamp_min(1e-8) / 127.0
    codes = torch.round(weight.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored as int8 codes with a per-output-channel scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        codes, scale = quantize(self.weight)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized().to(x.dtype), bias)


@dataclass(frozen=True, eq=False)
class Int8Base:
    layer: Int8Linear

    compute_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        return self.layer.dequantized()

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return dy.to(x_dtype) @ self.dequantized().to(x_dtype)


def requantize(layer: Int8Linear, weight: torch.Tensor) -> None:
    codes, scale = quantize(weight)
    layer.weight = nn.Parameter(codes.to(layer.weight.device), requires_grad=False)
    layer.scale.copy_(scale)


KIND = bases.BaseKind(
    name=NAME,
    describe="toy int8 per-channel Linear",
    detect=lambda module: isinstance(module, Int8Linear),
    passes={("lora", "torch"): lora_torch.COMPOSED, ("lora", "composed"): lora_triton.COMPOSED},
    refusals={"dora": "use_dora=True on a toy int8 Linear (a quantized base): no DoRA here"},
    base=Int8Base,
    requantize=requantize,
    wrap=QuantizedLoRALinear.wrap,
)


def register() -> bases.BaseKind:
    return bases.register(KIND)


def unregister() -> None:
    bases.unregister(NAME)
