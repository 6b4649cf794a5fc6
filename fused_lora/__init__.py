"""fused-lora: fused Triton kernels for LoRA linear layers, forward and backward.

    from fused_lora import LoRALinear
    layer = LoRALinear.from_linear(model.some_linear, r=16, lora_alpha=32, lora_dropout=0.1)
"""

from .backend import BACKENDS, resolve_backend
from .functional import LoRALinearFunction, draw_dropout_seed, dropout_mask, fused_lora_linear
from .layer import LoRALinear, lora_scaling
from .reference import lora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LoRALinear",
    "LoRALinearFunction",
    "draw_dropout_seed",
    "dropout_mask",
    "fused_lora_linear",
    "lora_linear_ref",
    "lora_scaling",
    "resolve_backend",
]
