"""fused-lora: fused Triton kernels for LoRA linear layers, forward and backward.

    from fused_lora import LoRALinear
    layer = LoRALinear.from_linear(model.some_linear, r=16, lora_alpha=32, lora_dropout=0.1)

A map of the package: docs/architecture.md.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _register_source_kernels() -> None:
    """The Triton kernels live in the project's top-level ``kernels/`` folder, installed as ``fused_lora.kernels``
    (pyproject.toml). The folder has no ``__init__.py``, so that it never shadows HF's top-level ``kernels`` package
    (transformers imports it) when the project root is on ``sys.path``. A wheel holds it as the namespace folder
    ``fused_lora/kernels/``; in an editable install or a source checkout, setuptools' finder cannot map a namespace
    folder under a regular package, so the checkout's folder is registered here."""
    name = __name__ + ".kernels"
    if name in _sys.modules or _util.find_spec(name) is not None:
        return
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    spec = _machinery.PathFinder.find_spec(name, [root])
    if spec is not None:
        _sys.modules[name] = kernels = _util.module_from_spec(spec)
        _sys.modules[__name__].kernels = kernels


_register_source_kernels()

from .adapters import load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .autograd.dora import DoRALinearFunction  # noqa: E402
from .autograd.lora import LoRALinearFunction  # noqa: E402
from .backends.self_check import report as path_report  # noqa: E402
from .backends.self_check import set_verify  # noqa: E402
from .config import LoRAConfig  # noqa: E402
from .dispatch import BACKENDS, resolve_backend  # noqa: E402
from .dropout import draw_dropout_seed  # noqa: E402
from .fallback import FallbackWarning  # noqa: E402
from .functional import dropout_mask, fused_lora_linear  # noqa: E402
from .injector import (  # noqa: E402
    disable_lora,
    inject_lora,
    merge_lora,
    plan_injection,
    print_trainable_parameters,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from .layer import LoRALinear, lora_scaling  # noqa: E402
from .quantized import QuantizedLoRALinear  # noqa: E402,F401  (registers the bitsandbytes base kinds)
from .reference import dora_ref, lora_linear_ref  # noqa: E402

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
    "path_report",
    "plan_injection",
    "print_trainable_parameters",
    "read_adapter_config",
    "resolve_backend",
    "save_adapter",
    "set_verify",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
