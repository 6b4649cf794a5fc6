"""One line to run PEFT's LoRA layers through fused_lora's fused Function.

    import fused_lora.peft
    model = fused_lora.peft.accelerate(peft_model)      # same model object, same modules and state dict

    fused_lora.peft.enable()                            # or: every PEFT LoRA model made from now on (get_peft_model,
                                                        # PeftModel.from_pretrained, TRL's trainers with peft_config)

Each ``peft.tuners.lora.Linear`` gets its class swapped to :class:`FusedLinear`, a subclass that only overrides
``forward`` (PEFT's bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` LoRA layers to ``FusedLinear4bit`` /
``FusedLinear8bitLt``, which run ``fused_lora.quantized``). Nothing else changes: parameter names, the state dict,
``save_pretrained``, ``merge_and_unload``, ``set_adapter``, ``disable_adapter``, the repr (``lora.Linear(...)``) and
so what PEFT's ``get_layer_status()`` / ``get_model_status()`` report (``module_type`` ``lora.Linear``) all stay
PEFT's; :func:`is_accelerated` tells an accelerated model apart. The fused path is taken call by call, when PEFT
would compute exactly ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with one adapter (``lora_bias=True``
included: lora_B's bias enters as ``scaling · b_B``), or its DoRA (``use_dora=True`` on an nn.Linear / Conv1D base:
the fused DoRA Function, ``fused_lora.autograd.dora``); anything else (adapters disabled or merged, other variants,
DoRA on quantized bases, several active adapters, custom or hooked bases, dtypes the Function does not take) runs
PEFT's own forward.

Mixed-adapter batches (``model(..., adapter_names=[name per example])``, ``generate(..., adapter_names=...)``): each
LoRA layer computes all the adapters named in the batch in one multi-adapter call (``fused_lora.peft_mixed``), with
PEFT's semantics (each example through its adapter, its own scaling, dropout and ``lora_bias``; ``"__base__"`` and
adapters a layer lacks: the base output), after PEFT's own argument checks; a layer where one named adapter cannot be
served (the reasons above, DoRA: PEFT's own error) runs PEFT's loop. Training with ``adapter_names``, which PEFT
refuses ("Cannot pass `adapter_names` when the model is in training mode"), works on a served model and gives each
adapter the gradients of training it alone on its examples: the ``LoraModel`` (PEFT's tuner) gets an
``_enable_peft_forward_hooks`` of its own that enters PEFT's with the tuner's own ``training`` flag False for the
moment PEFT checks it (no submodule's mode changes; :func:`restore` takes it out). Refused with gradient checkpointing
(its recomputation would run without the names).

Warnings: PEFT LoRA layers that cannot be served are reported in one grouped ``UserWarning`` per ``accelerate`` call
that says why, and a reason is reported once per process (a layer that falls back at call time, say after
``set_adapter`` made two adapters active, warns once for that reason). LoRA layer classes that are not PEFT's own
(registered through PEFT's dynamic dispatch, ``LoraConfig._register_custom_module``) are left to their own forward
without a warning: nothing of them was ever going to be fused, and PEFT has just warned about them itself (its tests
check that its warning is the last one).

Not served by the fused path (documented, not a bug): forward hooks registered on the ``lora_A``/``lora_B``/
``lora_dropout`` submodules do not fire, because those submodules are not called; their parameters are.

:func:`enable` does :func:`accelerate`'s work wherever PEFT builds LoRA layers, without access to the model object;
:func:`disable` takes the patch out again. Tested against peft 0.21.2 (the version the project's CI installs), 0.18.1,
0.15.2 and 0.13.2.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

try:
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.lora.dora import DoraLinearLayer
except ImportError as err:  # peft is an optional dependency
    raise ImportError("fused_lora.peft needs the `peft` package: pip install peft") from err
try:
    from peft.tuners.mixed import MixedModel  # PeftMixedModel's tuner
except ImportError:  # pragma: no cover (a PEFT without mixed adapter types)
    MixedModel = None

from . import bases, peft_mixed
from .bases import conv1d_class
from .dispatch import DORA, refusal
from .functional import fused_lora_linear
from .quantized import quantized_lora

__all__ = ["FusedLinear", "accelerate", "disable", "enable", "enabled", "is_accelerated", "is_enabled", "restore"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Reasons already reported in this process: a layer that falls back at call time (for example after
# set_adapter made several adapters active) warns once per reason, not once per layer and call.
_reported: set[str] = set()


def _weight_layout(base: nn.Module) -> str | None:
    """'linear' / 'conv1d' for the exact base types the Function serves; None for anything else (bitsandbytes'
    Linear4bit and other quantized layers subclass nn.Linear but hold packed integer weights)."""
    if type(base) is nn.Linear:
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and type(base) is conv1d:
        return "conv1d"
    return None


def _has_hooks(module: nn.Module) -> bool:
    # accelerate's device_map offloading (AlignDevicesHook) moves weights in a pre-forward hook; the fused
    # path reads the weights directly, so any hook means PEFT's path. DeepSpeed ZeRO-3's own hooks excepted.
    # accelerate's _hf_hook is a plain attribute (in __dict__): read there, ~60 ns, where getattr through
    # nn.Module.__getattr__'s miss costs ~1.3 µs, and this runs for four modules on every call.
    if module.__dict__.get("_hf_hook") is not None:
        return True
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if not pre and not post:
        return False
    return any(not _is_zero3_hook(h) for h in (*pre.values(), *post.values()))


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _is_fsdp_unit(module: nn.Module) -> bool:
    """A module FSDP wrapped as a unit of its own: FSDP1's ``FullyShardedDataParallel`` wrapper, or FSDP2's
    ``fully_shard`` (which swaps the class for ``FSDP<name>``)."""
    name = type(module).__name__
    return name == "FullyShardedDataParallel" or (name.startswith("FSDP") and hasattr(module, "_get_fsdp_state"))


def _is_zero3_hook(hook) -> bool:
    """One of the hooks DeepSpeed ZeRO-3 puts on every module to gather that module's partitioned parameters around
    its forward and backward. The fused path reads the base layer's and the adapters' parameters without calling those
    modules; inside the engine's forward DeepSpeed gathers a partitioned parameter when it is read and registers it with
    the module whose forward runs (the LoRA layer: its "external parameters"), which re-gathers them for its
    forward and its backward from then on (measured with deepspeed 0.19.8, the engine's forward and the model called
    directly alike). A LoRA layer called on its own before that finds them ungathered: :func:`_zero3_unavailable`
    sends such a call to PEFT's forward, whose modules gather their own."""
    return (getattr(hook, "__module__", None) or "").startswith("deepspeed.")


def _zero3_unavailable(tensor: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter not gathered now (an empty placeholder of its ``ds_numel`` values)."""
    return hasattr(tensor, "ds_id") and tensor.numel() != getattr(tensor, "ds_numel", tensor.numel())


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_magnitude_vector", {})


def _variant_name(layer: nn.Module, adapter: str) -> str | None:
    """Why the adapter's LoRA variant keeps PEFT's forward, or None (plain LoRA, or PEFT's own linear DoRA, which the
    fused DoRA Function computes)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None:
        # PEFT before its LoRA variants (< 0.15) computed DoRA inside lora.Linear.forward: not served
        return "DoRA (use_dora=True) of a PEFT without LoRA variants" if getattr(layer, "use_dora", {}).get(
            adapter, False) else None
    name = variant.__name__ if isinstance(variant, type) else type(variant).__name__
    if name != "DoraLinearVariant":
        return "DoRA variant " + name if name.startswith("Dora") else f"LoRA variant {name}"
    base = layer.get_base_layer()
    kind = bases.of(base)
    why = refusal(DORA, kind) if kind is not None else None
    if why is not None:
        return why
    if type(layer) is not PeftLoraLinear and type(layer) is not _served().get(PeftLoraLinear):
        return f"DoRA (use_dora=True) on a {type(base).__name__} base (fused DoRA: nn.Linear, Conv1D)"
    dora = layer.lora_magnitude_vector[adapter] if _is_dora(layer, adapter) else None
    if dora is None or type(dora) is not DoraLinearLayer:
        return "DoRA (use_dora=True) with a custom magnitude module"
    return None


def _is_custom_layer(layer: nn.Module) -> bool:
    """A LoRA layer class registered by the user (PEFT's dynamic dispatch), not one of PEFT's own."""
    return not type(layer).__module__.startswith(("peft.", "fused_lora."))


def layer_reason(layer: nn.Module, adapter: str | None = None) -> str | None:
    """Why ``layer`` cannot run the fused path for ``adapter`` (default: its active adapters), or None when it
    can. Input-dependent checks (dtypes of the call) are in :func:`_call_reason`."""
    served = _served()
    if type(layer) not in served and type(layer) not in served.values():
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
        kinds = ", ".join(k.describe for k in bases.registered())
        return f"LoRA layer type lora.{type(layer).__name__} on a {type(base).__name__} base (fused: {kinds} bases)"
    if adapter is None:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) > 1:
            return "several active adapters"
        if not active:
            return None  # PEFT returns the base output; nothing to fuse
        adapter = active[0]
    variant = _variant_name(layer, adapter)
    if variant is not None:
        return variant
    base = layer.get_base_layer()
    kind = bases.of(base)
    quantized = kind is not None and kind.quantized
    if not quantized and _weight_layout(base) is None:
        kinds = ", ".join(k.describe for k in bases.registered())
        return f"base layer {type(base).__name__} (custom; fused: exact nn.Linear / Conv1D types, {kinds})"
    weight = base.weight
    if not quantized and weight.dtype not in _FUSED_DTYPES:
        return f"base weight dtype {weight.dtype} (fused: float32, float16, bfloat16)"
    if weight.is_meta:
        return "base weight on the meta device (offloaded)"
    if weight.requires_grad:
        return "trainable base weight (the fused Function trains adapters and biases only)"
    if _is_dtensor(weight):
        return ("base weight still sharded in the layer's forward (its layer is an FSDP unit of its own); wrap per "
                "transformer block instead")
    not_ready = kind.not_ready(base) if quantized else None
    if not_ready is not None:
        return not_ready
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        if _is_fsdp_unit(lora_A) or _is_fsdp_unit(lora_B):
            # Measured (docs/distributed.md): gathering these units by hand for a fused call keeps their collectives
            # (6 per layer and step) and ran slower than this fallback; per-block units serve the call fused.
            return ("lora_A/lora_B are FSDP units of their own (PEFT's fsdp_auto_wrap_policy), sharded inside the "
                    "layer's forward; wrap per transformer block instead (accelerate's FSDP2 preparation does)")
        return "lora_A/lora_B are not plain nn.Linear modules (lora_A without a bias)"
    if lora_B.bias is not None:  # lora_bias=True: served, as scaling · b_B beside the fused call (_lora_B_bias)
        if _is_dora(layer, adapter):
            return "a lora_B bias (lora_bias=True) with DoRA"
        if lora_B.bias.dtype != lora_B.weight.dtype:
            return f"lora_B bias of dtype {lora_B.bias.dtype} beside a {lora_B.weight.dtype} lora_B weight"
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout module {type(dropout).__name__}"
    if _is_dora(layer, adapter):
        dora = layer.lora_magnitude_vector[adapter]
        if dora.weight.dtype not in (lora_A.weight.dtype, torch.float32) or dora.weight.dim() != 1:
            return f"DoRA magnitude of dtype {dora.weight.dtype} (fused: the adapters' dtype or float32)"
        if _has_hooks(dora):
            return "forward hooks on the DoRA magnitude module"
    if quantized:
        if lora_A.weight.dtype != lora_B.weight.dtype or not lora_A.weight.dtype.is_floating_point:
            return f"adapter dtype {lora_A.weight.dtype}/{lora_B.weight.dtype}"
    elif lora_A.weight.dtype != lora_B.weight.dtype or lora_A.weight.dtype not in (weight.dtype, torch.float32):
        return (f"adapter dtype {lora_A.weight.dtype}/{lora_B.weight.dtype} on a {weight.dtype} base (fused: adapters "
                "in the base's dtype or float32)")
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)):
        return "forward hooks on the base layer or the adapter modules (e.g. accelerate offloading)"
    return None


def _call_reason(layer: PeftLoraLinear, adapter: str, x: torch.Tensor) -> str | None:
    """Checks that depend on the call: the dtype the Function will compute in."""
    weight = layer.get_base_layer().weight
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_dtype = lora_A.dtype
    if x.device != weight.device:
        return "input and weights on different devices"
    if _zero3_unavailable(weight) or _zero3_unavailable(lora_A) or _zero3_unavailable(lora_B):
        return ("DeepSpeed ZeRO-3 parameters not gathered for this call (the LoRA layer called on its own, before a "
                "forward of the model registered them with it)")
    kind = bases.of(layer.get_base_layer())
    if kind is not None and kind.quantized:  # the layer casts x itself, as PEFT's path does
        return None if x.dtype in _FUSED_DTYPES else f"input dtype {x.dtype}"
    compute = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        compute = torch.get_autocast_dtype(x.device.type)  # the Function casts x, W, b to it, like nn.Linear
    elif x.dtype != weight.dtype:
        return "input dtype differs from the base weight's"  # PEFT's path raises its own error, or copes
    if compute not in _FUSED_DTYPES:
        return f"compute dtype {compute}"
    if lora_dtype not in (compute, torch.float32):
        return f"adapter dtype {lora_dtype} with {compute} inputs (fused: adapters in the input's dtype or float32)"
    return None


def _report(reason: str, stacklevel: int = 2) -> None:
    """Warns that a layer falls back to PEFT's forward at call time, once per reason and process."""
    if reason not in _reported:
        _reported.add(reason)
        warnings.warn(f"fused_lora.peft: some LoRA layers keep PEFT's unfused forward: {reason}", UserWarning,
                      stacklevel=stacklevel + 1)


def _warn(reasons: dict[str, list[str]], total: int, stacklevel: int) -> None:
    parts = []
    for reason, names in reasons.items():
        examples = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        parts.append(f"{reason}: {len(names)} layer{'s' if len(names) != 1 else ''} ({examples})")
    n = sum(len(v) for v in reasons.values())
    warnings.warn(f"fused_lora.peft: {n} of {total} LoRA layers keep PEFT's unfused forward: " + "; ".join(parts),
                  UserWarning, stacklevel=stacklevel + 1)
    _reported.update(reasons)


class _Fused:
    """The forward every accelerated class shares: PEFT's own forward unless PEFT would compute plain LoRA with one
    adapter, and then the fused Function (``_fused_call``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # PEFT's own semantics first: extra arguments, disabled adapters (which unmerge a merged layer), merged
        # weights: its forward handles them and costs only the base GEMM. A mixed-adapter batch (adapter_names= and
        # nothing else): one multi-adapter call (peft_mixed), after PEFT's own checks of the names.
        if args or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs:
            names = kwargs.get("adapter_names")
            if names is not None and all(v is None for k, v in kwargs.items() if k != "adapter_names"):
                self._check_forward_args(x, adapter_names=names)
                y = peft_mixed.mixed_forward(self, x, names)
                if y is not None:
                    return y
            if any(v is not None for v in kwargs.values()):
                return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return super().forward(x, *args, **kwargs)
        reason = layer_reason(self) or _call_reason(self, active[0], x)
        if reason is not None:
            _report(reason)
            return super().forward(x, *args, **kwargs)
        adapter = active[0]
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return self._fused_call(x, adapter, p, dropout.training)

    def _get_name(self) -> str:
        # nn.Module.__repr__ names the class with this: PEFT's repr ("lora.Linear(...)") and the module_type its
        # get_layer_status() derives from the repr stay what PEFT reports for its own layer.
        served = _served()
        return next(cls for cls in type(self).__mro__ if cls in served).__name__


class FusedLinear(_Fused, PeftLoraLinear):
    """A ``peft.tuners.lora.Linear`` whose forward runs through :func:`fused_lora.fused_lora_linear` when PEFT would
    compute plain LoRA with one adapter. Made by :func:`accelerate` (class swap); never constructed directly."""

    def _fused_call(self, x, adapter, p, training):
        base = self.get_base_layer()
        kind = bases.of(base)
        if kind is not None and kind.quantized:  # PEFT's generic lora.Linear on a quantized layer of a plain model
            return _quantized_call(self, x, adapter, p, training)
        magnitude = None
        if _is_dora(self, adapter):  # PEFT drops x only when the layer trains and its dropout is a Dropout
            magnitude, training = self.lora_magnitude_vector[adapter].weight, training and self.training
        lora_B, scaling = self.lora_B[adapter], float(self.scaling[adapter])
        bias = base.bias
        if lora_B.bias is not None:
            # lora_bias=True: PEFT's lora_B(...) * scaling adds scaling · b_B to every row. Folded into the bias the
            # Function adds, it costs no pass over the output; autograd gives b_B its gradient scaling · Σ dY (and
            # the base bias Σ dY when it trains). In fp32 when either is (the Function takes an fp32 bias).
            bias = _lora_B_bias(lora_B, scaling) if bias is None else bias + _lora_B_bias(lora_B, scaling)
        return fused_lora_linear(x, base.weight, bias, self.lora_A[adapter].weight, lora_B.weight, scaling, p, training,
                                 _weight_layout(base), magnitude=magnitude)


def _lora_B_bias(lora_B: nn.Linear, scaling: float) -> torch.Tensor:
    return lora_B.bias * scaling


def _quantized_call(self, x, adapter, p, training):
    lora_B, scaling = self.lora_B[adapter], float(self.scaling[adapter])
    y = quantized_lora(x, self.get_base_layer(), self.lora_A[adapter].weight, lora_B.weight, scaling, p, training)
    if lora_B.bias is not None:
        # lora_bias=True on a bitsandbytes base: the base layer adds its own bias inside quantized_lora, so
        # scaling · b_B is added here, in the output's dtype, as PEFT adds its LoRA term (cast to the result's dtype).
        y = y + _lora_B_bias(lora_B, scaling).to(y.dtype)
    return y


# PEFT's LoRA class → the class accelerate swaps it to: PEFT's generic lora.Linear → FusedLinear, and each class a
# registered base kind names (bitsandbytes' Linear4bit / Linear8bitLt, when bitsandbytes is installed) → a subclass
# that runs the quantized path. Rebuilt when the registered kinds change (a plug-in registered after this import).
_served_cache: dict[tuple, dict[type, type]] = {}
_fused_classes: dict[type, type] = {}


def _served() -> dict[type, type]:
    kinds = bases.registered()
    stamp = tuple(id(k) for k in kinds)
    served = _served_cache.get(stamp)
    if served is None:
        served = {PeftLoraLinear: FusedLinear}
        for kind in kinds:
            for cls in kind.peft_layers():
                if cls in served:
                    continue
                fused = _fused_classes.get(cls)
                if fused is None:
                    fused = _fused_classes[cls] = type(f"Fused{cls.__name__}", (_Fused, cls), {
                        "_fused_call": _quantized_call, "__module__": __name__,
                        "__doc__": f"A ``{cls.__module__}.{cls.__name__}`` whose forward runs through "
                                   "``fused_lora.quantized.quantized_lora`` when PEFT would compute plain LoRA with "
                                   "one adapter.",
                    })
                served[cls] = fused
        _served_cache.clear()
        _served_cache[stamp] = served
    return served


def is_accelerated(module: nn.Module) -> bool:
    """Whether ``module`` holds any layer that :func:`accelerate` swapped to the fused forward."""
    fused = set(_served().values())
    return any(type(m) in fused for m in module.modules())


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Make ``peft_model``'s LoRA layers compute through the fused Function; returns the same object.

    Works on a ``peft.PeftModel`` or any module holding PEFT LoRA layers. Every ``peft.tuners.lora.Linear`` is
    switched (in place, by class swap) to :class:`FusedLinear`; whether a call takes the fused path is decided
    per call, so ``set_adapter``, ``disable_adapter``, ``merge_adapter`` and the like keep working. Layers that
    cannot be served now (DoRA on quantized bases, several active adapters, custom bases, …) are named in one
    ``UserWarning`` with the reason; they and any other PEFT layer type run PEFT's forward. Layers that PEFT
    creates later (``add_adapter`` targeting new modules) are plain PEFT layers: call ``accelerate`` again.

    Raises:
        ValueError: the model holds no PEFT LoRA layer.
    """
    if not _serve(peft_model, stacklevel=2):
        raise ValueError(f"fused_lora.peft.accelerate: {type(peft_model).__name__} holds no PEFT LoRA layer "
                         "(peft.tuners.lora.LoraLayer); wrap it with peft.get_peft_model first")
    return peft_model


def _serve(model: nn.Module, stacklevel: int) -> int:
    """Swaps every PEFT LoRA layer of ``model`` that has a fused class to it (layers already swapped stay) and warns
    once about the layers that cannot be served, with the reasons not reported before; returns the number of LoRA
    layers found."""
    lora_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if lora_layers:
        # every bitsandbytes 4-bit layer, adapted or not, in bitsandbytes' standard packing: on CPU an eval-mode forward
        # would repack it for bitsandbytes' inference kernel, after which it passes no gradient (README: QLoRA)
        bases.prepare_all(model)
    unserved: dict[str, list[str]] = defaultdict(list)
    served = _served()
    for m in model.modules():
        if type(m) is LoraModel:  # PeftModel's tuner: adapter_names= in training mode too (peft_mixed)
            peft_mixed.allow_training(m)
    for name, layer in lora_layers:
        if type(layer) in served:
            layer.__class__ = served[type(layer)]  # same attributes and parameters; only forward differs
        reason = None if _is_custom_layer(layer) else layer_reason(layer)
        if reason is not None and reason not in _reported:
            unserved[reason].append(name)
    if unserved:
        _warn(unserved, len(lora_layers), stacklevel=stacklevel + 1)
    return len(lora_layers)


def restore(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every accelerated layer becomes its plain PEFT class again."""
    original = {fused: peft_cls for peft_cls, fused in _served().items()}
    for module in peft_model.modules():
        if type(module) in original:
            module.__class__ = original[type(module)]
        elif type(module) is LoraModel:
            peft_mixed.disallow_training(module)
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# enable() / disable(): every PEFT LoRA model made afterwards
# ---------------------------------------------------------------------------------------------------------------

# Tuner class → what its own __dict__ held under "inject_adapter" before enable() (_ABSENT: nothing, it inherited
# BaseTuner's), so that disable() puts back exactly that. Empty while disabled.
_PATCHED: dict[type, object] = {}
_ABSENT = object()
_LOCK = threading.Lock()


def _tuner_classes() -> tuple[type, ...]:
    return tuple(cls for cls in (LoraModel, MixedModel) if cls is not None)


def _serving(original):
    """``inject_adapter`` that runs PEFT's, then serves the tuner's whole model."""

    @functools.wraps(original)
    def inject_adapter(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        # Exact types only: subclasses such as AdaLoraModel build their own layer types, which nothing here serves.
        if type(self) in _PATCHED:
            if _serve(self.model, stacklevel=2) and type(self) is LoraModel:
                peft_mixed.allow_training(self)
        return result

    inject_adapter.__fused_lora_wrapped__ = original
    return inject_adapter


def enable() -> None:
    """From now on, every PEFT LoRA model is served by the fused path, as if :func:`accelerate` were called on it.

    That is every model made by ``peft.get_peft_model``, ``PeftModel.from_pretrained`` (and ``AutoPeftModel*``),
    ``peft.inject_adapter_in_model`` (and so transformers' ``model.add_adapter`` / ``model.load_adapter``),
    ``PeftMixedModel``, and therefore TRL's trainers given a ``peft_config``, without access to the model object.
    ``add_adapter`` / ``load_adapter`` / ``add_weighted_adapter`` on a model serve its new layers too. Calling it
    again does nothing. Layers that cannot be served are named in one ``UserWarning`` per model, as by
    :func:`accelerate`.

    How: PEFT's LoRA tuner, ``peft.tuners.lora.LoraModel`` (and ``peft.tuners.mixed.MixedModel`` for mixed models),
    gets an ``inject_adapter`` that runs PEFT's own and then swaps the LoRA layers of the tuner's model. Why there:
    ``inject_adapter`` is ``BaseTuner``'s documented public method that creates the adapter layers, and every entry
    point above reaches it (``BaseTuner.__init__`` calls it; ``PeftModel.add_adapter`` calls it); it is looked up on
    the tuner's class at each call, so the patch reaches callers that imported ``get_peft_model`` into their own
    modules before ``enable()`` (TRL's ``trl.trainer.sft_trainer`` does), which patching ``peft.get_peft_model``
    would miss. Nothing else of PEFT is changed: not its functions, not its layer classes, not models made before
    the call (a model made before ``enable()`` is served from its next ``add_adapter`` / ``load_adapter`` on, as a
    whole). Subclasses of those tuners (``AdaLoraModel``, a user's own) keep PEFT's behaviour.

    Tested against peft 0.21.2, 0.18.1, 0.15.2 and 0.13.2 (``tests/test_peft_enable.py``).
    """
    with _LOCK:
        for cls in _tuner_classes():
            if cls in _PATCHED:
                continue
            _PATCHED[cls] = cls.__dict__.get("inject_adapter", _ABSENT)
            cls.inject_adapter = _serving(cls.inject_adapter)


def disable() -> None:
    """Undo :func:`enable`: PEFT's tuner classes get back exactly what they held, so models made afterwards are plain
    PEFT models. Models made while enabled keep their fused layers (:func:`restore` makes one plain again). Calling
    it when not enabled does nothing."""
    with _LOCK:
        for cls, own in _PATCHED.items():
            if own is _ABSENT:
                del cls.inject_adapter  # it inherited BaseTuner.inject_adapter: inherit it again
            else:
                cls.inject_adapter = own
        _PATCHED.clear()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return bool(_PATCHED)


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """:func:`enable` for the block; afterwards the state before the block (disabled, unless it was enabled)."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


peft_mixed.connect(peft_mixed.Serving(
    reason=lambda layer, adapter, x: layer_reason(layer, adapter) or _call_reason(layer, adapter, x),
    is_dora=_is_dora,
    report=lambda reason: _report(reason, stacklevel=3),  # the frame that called mixed_forward, as before
    weight_layout=_weight_layout,
    is_accelerated=is_accelerated,
))
