"""The frozen base layer's GEMM as the composed path needs it: its output, and its input gradient.

    y  = base(x)                  forward
    dX = dY · ∂base/∂x            backward (the weight is frozen: no weight gradient)

The composed path (``triton_ops.composed_forward`` / ``torch_ops.composed_forward``) adds the LoRA branch to ``y``
and to ``dX`` in place. Each base here computes exactly what its layer computes (the same dtype casts and rounding)
and keeps nothing for backward beyond the layer's own weight: a bitsandbytes 4-bit base dequantizes W again in
backward, as bitsandbytes' own ``MatMul4Bit`` does, and no dequantized copy outlives the call.

bitsandbytes is optional: it is imported only when a bitsandbytes layer is handed over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BNB_4BIT, BNB_8BIT = "bnb-4bit", "bnb-8bit"


def quantized_kind(module: nn.Module) -> str | None:
    """``BNB_4BIT`` / ``BNB_8BIT`` for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (and their subclasses), else
    None. By class name along the MRO, so bitsandbytes need not be importable to ask."""
    names = {(cls.__module__.split(".")[0], cls.__name__) for cls in type(module).__mro__}
    if ("bitsandbytes", "Linear4bit") in names:
        return BNB_4BIT
    if ("bitsandbytes", "Linear8bitLt") in names:
        return BNB_8BIT
    return None


def looks_quantized(module: nn.Module) -> bool:
    """A layer whose weight is not floating point (GPTQ/AWQ/HQQ/torchao and other packed formats)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point


@dataclass(frozen=True)
class DenseBase:
    """``nn.Linear`` (weight N×K) or GPT-2 ``Conv1D`` (weight K×N) through cuBLAS, in x's dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str

    def _w_t(self) -> torch.Tensor:  # Wᵀ, K×N, as a view
        return self.weight.t() if self.layout == "linear" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_t = self._w_t()
        return torch.addmm(self.bias.to(x.dtype), x, w_t) if self.bias is not None else x @ w_t

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return (dy @ self._w_t().t()).to(x_dtype)


@dataclass(frozen=True)
class Bnb4Base:
    """bitsandbytes ``Linear4bit``: its own forward (x and bias cast to ``compute_dtype``, ``matmul_4bit``, the result
    cast back to x's dtype); input gradient ``dY · dequantize_4bit(W)`` in the compute dtype, as
    ``MatMul4Bit.backward``."""

    layer: nn.Module

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.compute_dtype or torch.float32

    def canonical_weight(self) -> nn.Parameter:
        """The layer's weight in bitsandbytes' standard packing. On CPU, ``Linear4bit.forward`` in eval mode without
        grad repacks the weight in place for its CPU kernel (``packing_format_for_cpu``); it is unpacked back
        here, as bitsandbytes' own state-dict save does, so dequantization and the fused kernels read the layout
        they expect."""
        weight = self.layer.weight
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layer's own forward: in eval mode without grad on CPU it runs bitsandbytes' repacked CPU kernel, which
        # rounds differently from the training path; calling it keeps PEFT's numbers in every mode.
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        """W (N×K) in the quantization state's dtype: a temporary."""
        import bitsandbytes.functional as F

        weight = self.canonical_weight()
        return F.dequantize_4bit(weight.data, weight.quant_state)

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        dy = dy.to(self.compute_dtype)
        return (dy @ self.dequantized().to(dy.dtype)).to(x_dtype)


@dataclass(frozen=True)
class Bnb8Base:
    """bitsandbytes ``Linear8bitLt`` (int8 weight with per-row scales): its own forward; input gradient
    ``dY · (CB · SCB / 127)`` in x's dtype, as ``MatMul8bitLt.backward``."""

    layer: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        weight = self.layer.weight
        cb = weight.CB if getattr(weight, "CB", None) is not None else self.layer.state.CB
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else self.layer.state.SCB
        return cb.float() * (scb.float().unsqueeze(1) / 127.0)

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return (dy.to(x_dtype) @ self.dequantized().to(x_dtype))


def quantized_base(module: nn.Module) -> Bnb4Base | Bnb8Base:
    kind = quantized_kind(module)
    if kind == BNB_4BIT:
        return Bnb4Base(module)
    if kind == BNB_8BIT:
        return Bnb8Base(module)
    raise TypeError(f"fused_lora: {type(module).__name__} is not a bitsandbytes Linear4bit or Linear8bitLt")
