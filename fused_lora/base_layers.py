"""The kinds of frozen base layer LoRA can sit on, in one place: how to recognise each, its forward, its input
gradient, and (for quantized ones) how to dequantize and quantize again.

    kind        layers                                        weight
    "dense"     nn.Linear ("linear" layout), GPT-2 Conv1D     float, N×K ("linear") or K×N ("conv1d")
    "bnb-4bit"  bitsandbytes Linear4bit (NF4/FP4)              packed 4-bit + quant_state
    "bnb-8bit"  bitsandbytes Linear8bitLt                      int8 + per-row scales

    y  = base(x)                  forward
    dX = dY · ∂base/∂x            backward (the weight is frozen: no weight gradient)

The composed path (``backends.lora_triton.composed_forward`` / ``backends.lora_torch.composed_forward``) adds the LoRA
branch to ``y`` and to ``dX`` in place. Each base here computes exactly what its layer computes (the same dtype casts
and rounding) and keeps nothing for backward beyond the layer's own weight: a bitsandbytes 4-bit base dequantizes W
again in backward, as bitsandbytes' own ``MatMul4Bit`` does, and no dequantized copy outlives the call.

A new base kind (GPTQ, say) starts here: its detection in :func:`base_kind`, a base class with ``forward`` /
``input_grad`` / ``dequantized`` in :func:`quantized_base`, its requantization in :func:`requantized`; then a row in
the router's table (``dispatch.py``).

bitsandbytes is optional: it is imported only when a bitsandbytes layer is handed over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DENSE, BNB_4BIT, BNB_8BIT = "dense", "bnb-4bit", "bnb-8bit"

_conv1d: list[type | None] = []  # transformers' Conv1D, looked up once (this runs per call in fused_lora.peft)


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight in×out), or None without transformers."""
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # transformers is a dependency, but the layers themselves do not need it
            Conv1D = None
        _conv1d.append(Conv1D)
    return _conv1d[0]


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


def dense_layout(module: nn.Module) -> str | None:
    """"linear" for an ``nn.Linear`` (and subclasses that are not quantized), "conv1d" for transformers' ``Conv1D``,
    else None."""
    if quantized_kind(module) is not None:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def base_kind(module: nn.Module) -> str | None:
    """``DENSE``, ``BNB_4BIT`` or ``BNB_8BIT`` for a layer LoRA can sit on, else None."""
    kind = quantized_kind(module)
    if kind is not None:
        return kind
    return DENSE if dense_layout(module) is not None else None


def unsupported_quantized_message(where: str, type_name: str, dtype: torch.dtype) -> str:
    return (f"{where}: {type_name} holds a {dtype} weight; fused_lora serves floating-point nn.Linear / Conv1D layers "
            "and bitsandbytes Linear4bit / Linear8bitLt (QLoRA). Other quantized formats (GPTQ, AWQ, HQQ, torchao, …) "
            "are not supported: load the model in floating point or with a BitsAndBytesConfig, or leave this layer "
            "out of target_modules")


@dataclass(frozen=True)
class DenseBase:
    """``nn.Linear`` (weight N×K) or GPT-2 ``Conv1D`` (weight K×N) through cuBLAS, in x's dtype."""

    kind = DENSE
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

    kind = BNB_4BIT
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

    kind = BNB_8BIT
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


def requantized(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes weight for ``layer`` holding ``weight`` (N×K, float), quantized like the old one, as
    PEFT's merge does (``peft.tuners.lora.bnb``)."""
    import bitsandbytes as bnb

    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs["requires_grad"] = False
    if quantized_kind(layer) == BNB_4BIT:
        kwargs["bnb_quantized"] = False
        kwargs.pop("quant_state", None)
        return bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
    kwargs = {k: kwargs[k] for k in ("requires_grad", "has_fp16_weights") if k in kwargs}
    return bnb.nn.Int8Params(weight.to("cpu"), **kwargs).to(old.device)


def set_requantized(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replaces ``layer``'s quantized weight by ``weight`` (float, N×K) quantized again; an 8-bit layer's cached
    int8 state is reset so that its next forward reads the new weight."""
    layer.weight = requantized(layer, weight)
    if quantized_kind(layer) == BNB_8BIT:
        layer.state.reset_grads()
        layer.state.CB = layer.state.SCB = None


def quantized_base(module: nn.Module) -> Bnb4Base | Bnb8Base:
    kind = quantized_kind(module)
    if kind == BNB_4BIT:
        return Bnb4Base(module)
    if kind == BNB_8BIT:
        return Bnb8Base(module)
    raise TypeError(f"fused_lora: {type(module).__name__} is not a bitsandbytes Linear4bit or Linear8bitLt")
