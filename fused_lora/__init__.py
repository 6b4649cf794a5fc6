"""fused-lora: fused Triton kernels for LoRA linear layers, forward and backward.

    from fused_lora import LoRALinear
    layer = LoRALinear.from_linear(model.some_linear, r=16, lora_alpha=32, lora_dropout=0.1)
"""

from .adapters import load_adapter, read_adapter_config, save_adapter
from .backend import BACKENDS, FallbackWarning, resolve_backend
from .config import LoRAConfig
from .dora import DoRALinearFunction
from .dora_torch import dora_ref
from .functional import LoRALinearFunction, draw_dropout_seed, dropout_mask, fused_lora_linear
from .injector import (
    disable_lora,
    inject_lora,
    merge_lora,
    plan_injection,
    print_trainable_parameters,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from .layer import LoRALinear, lora_scaling
from .reference import lora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DoRALinearFunction",
    "FallbackWarning",
    "LoRAConfig",
    "LoRALinear",
    "LoRALinearFunction",
    "disable_lora",
    "dora_ref",
    "draw_dropout_seed",
    "dropout_mask",
    "fused_lora_linear",
    "inject_lora",
    "load_adapter",
    "lora_linear_ref",
    "lora_scaling",
    "merge_lora",
    "plan_injection",
    "print_trainable_parameters",
    "read_adapter_config",
    "resolve_backend",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
