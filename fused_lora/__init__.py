"""fused-lora: fused Triton kernels for LoRA linear layers, forward and backward.

    from fused_lora import LoRALinear
    layer = LoRALinear.from_linear(model.some_linear, r=16, lora_alpha=32, lora_dropout=0.1)

The user API is ``__all__`` (README: API); diagnostics and switches (``path_report``, ``set_verify``, backends,
references) are in ``fused_lora.diagnostics``; PEFT's models are served by ``fused_lora.peft``. A map of the package:
docs/architecture.md.
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

# The user API (__all__), the base kinds (each plug-in file registers its kind), and names that keep importing
# (earlier versions listed them here: diagnostics and internals, not the user API).
from . import diagnostics  # noqa: E402
from .adapters import load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .autograd.driver import FusedLoRAFunction  # noqa: E402
from .bases import bnb4 as _bnb4  # noqa: E402,F401
from .bases import bnb8 as _bnb8  # noqa: E402,F401
from .bases import dense as _dense  # noqa: E402,F401
from .config import LoRAConfig  # noqa: E402
from .diagnostics import (  # noqa: E402,F401
    BACKENDS,
    dora_ref,
    draw_dropout_seed,
    dropout_mask,
    lora_linear_ref,
    path_report,
    resolve_backend,
    set_verify,
)
from .fallback import FallbackWarning  # noqa: E402
from .functional import fused_lora_linear  # noqa: E402
from .injector import (  # noqa: E402,F401
    disable_adapters,
    disable_lora,
    inject_lora,
    merge_lora,
    plan_injection,
    print_trainable_parameters,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from .layer import LoRALinear, lora_scaling  # noqa: E402,F401
from .multi_adapters import (  # noqa: E402
    AdapterCollator,
    adapter_param_groups,
    inject_adapters,
    load_adapters,
    save_adapters,
    set_active_adapter,
    unload_adapters,
    use_adapters,
)
from .multi_layer import MultiLoRALinear, multi_lora_linear  # noqa: E402
from .quantized import QuantizedLoRALinear, quantized_lora  # noqa: E402

LoRALinearFunction = DoRALinearFunction = FusedLoRAFunction

__version__ = "0.1.0"

__all__ = [
    "AdapterCollator",
    "FallbackWarning",
    "FusedLoRATrainer",
    "LoRAConfig",
    "LoRALinear",
    "MultiLoRALinear",
    "QuantizedLoRALinear",
    "adapter_param_groups",
    "diagnostics",
    "disable_adapters",
    "fused_lora_linear",
    "inject_adapters",
    "inject_lora",
    "load_adapter",
    "load_adapters",
    "merge_lora",
    "multi_lora_linear",
    "plan_injection",
    "print_trainable_parameters",
    "quantized_lora",
    "read_adapter_config",
    "save_adapter",
    "save_adapters",
    "set_active_adapter",
    "trainable_parameters",
    "unload_adapters",
    "unload_lora",
    "unmerge_lora",
    "use_adapters",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers' Trainer (heavy): on first use only.
    if name == "FusedLoRATrainer":
        from .hf_trainer import FusedLoRATrainer

        return FusedLoRATrainer
    raise AttributeError(f"module 'fused_lora' has no attribute {name!r}")
