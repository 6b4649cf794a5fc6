"""Base kinds: the kinds of frozen layer LoRA can sit on, as registered plug-ins.

Each kind is one file of this package (``dense.py``: nn.Linear and GPT-2 Conv1D; ``bnb4.py``: bitsandbytes Linear4bit;
``bnb8.py``: bitsandbytes Linear8bitLt) that builds one :class:`BaseKind` and registers it. The kind says everything
about its layers: how to recognise one, the base object the paths compute with (its own forward, input gradient and
dequantized weight), how a merge writes the weight back, the wrapper module, the PEFT layer classes it serves, and which
variants and paths it has (``passes``). Everything else asks this registry: the router builds its table from it
(``dispatch.py``), ``LoRALinear.from_linear`` and ``inject_lora`` wrap layers with it, ``fused_lora.peft`` serves the
PEFT classes it names. Adding a kind (GPTQ, HQQ, torchao int4) is one file that calls :func:`register`
(docs/architecture.md; ``tests/toy_int8_kind.py`` is a whole one).

This module is the registry only: it imports nothing of the package, and the kind files (which import the paths and
modules they name) register themselves when ``fused_lora`` is imported.

The base object of a quantized kind (``BaseKind.base(layer)``) has:

    forward(x) -> y                      the layer's own output (its casts and rounding), x 2-D
    input_grad(dy, x_dtype) -> dX        dY · ∂layer/∂x (the weight is frozen)
    dequantized() -> W                   out × in, floating point: the self-check's ground truth, merges
    compute_dtype                        the dtype the layer computes in (None: x's)
    layer                                the module
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DENSE = "dense"  # the kind LoRALinear itself serves (weights in the module); every other kind is quantized


@dataclass(frozen=True)
class Pass:
    """One path's computation of a variant on a kind: ``forward(t, call, seed, keep)`` → (y, *saved) and
    ``backward(t, call, saved, dy, needs, seed, keep)`` → the gradients (dX, dA, dB, dbias[, d magnitude]), None where
    not needed (``autograd/variants.py`` says what each variant saves and returns). ``keep`` is the kernels' boolean
    dropout mask on the Triton backend's PyTorch path, None elsewhere (a PyTorch-backend call draws its own)."""

    forward: Callable[..., tuple]
    backward: Callable[..., tuple]


@dataclass(frozen=True, eq=False)
class BaseKind:
    """A kind of frozen base layer (see the module docstring)."""

    name: str
    describe: str  # for messages: "bitsandbytes Linear4bit"
    detect: Callable[[nn.Module], bool]
    # (variant name, path) → Pass; path "torch" is the PyTorch path, "fused"/"composed" the Triton ones. A variant with
    # no entry is refused on this kind (``refusals`` says why).
    passes: dict[tuple[str, str], Pass]
    refusals: dict[str, str] = field(default_factory=dict)
    quantized: bool = True
    base: Callable[[nn.Module], Any] | None = None  # the base object of a quantized layer (kept on the layer)
    layout: Callable[[nn.Module], str] = lambda module: "linear"
    in_out: Callable[[nn.Module], tuple[int, int]] = lambda module: (module.in_features, module.out_features)
    # Per call: whether the fused path can serve x on this layer (e.g. x in the compute dtype), given the base object.
    fused_fits: Callable[[torch.Tensor, Any], bool] | None = None
    # Why a layer of this kind cannot be served now (e.g. not quantized yet), or None.
    not_ready: Callable[[nn.Module], str | None] = lambda module: None
    # Called on every layer of the kind in a model that LoRA is put on (and on the layers it wraps), e.g. to keep
    # bitsandbytes' 4-bit weights out of its CPU inference packing.
    prepare: Callable[[nn.Module], None] | None = None
    # A merge: writes ``weight`` (out × in, float) back into the layer in its own format (quantized again).
    requantize: Callable[[nn.Module, torch.Tensor], None] | None = None
    # The module that wraps a layer of this kind: ``wrap(layer, r, lora_alpha, lora_dropout, use_rslora,
    # init_lora_weights, adapter_dtype)``; None: LoRALinear itself (the dense kind).
    wrap: Callable[..., nn.Module] | None = None
    # PEFT's LoRA layer classes whose base layer is of this kind and which fused_lora.peft serves (imported lazily:
    # PEFT is optional). PEFT's generic ``lora.Linear`` serves any nn.Linear subclass, so a kind whose layers subclass
    # nn.Linear is served through it without naming it.
    peft_layers: Callable[[], tuple[type, ...]] = lambda: ()

    def paths(self, variant: str) -> tuple[str, ...]:
        """The Triton paths this kind has for ``variant`` (in the order "fused", "composed")."""
        return tuple(p for p in ("fused", "composed") if (variant, p) in self.passes)

    def serves(self, variant: str) -> bool:
        return (variant, "torch") in self.passes

    def refusal(self, variant: str) -> str | None:
        """Why ``variant`` is not computed on this kind, or None."""
        if self.serves(variant):
            return None
        return self.refusals.get(variant, f"{variant} on a {self.describe} base is not supported by fused_lora")


_KINDS: dict[str, BaseKind] = {}
_conv1d: list[type | None] = []  # transformers' Conv1D, looked up once


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight in×out: the dense kind's "conv1d" layout), or None
    without transformers."""
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # transformers is a dependency, but the layers themselves do not need it
            Conv1D = None
        _conv1d.append(Conv1D)
    return _conv1d[0]


def register(kind: BaseKind) -> BaseKind:
    """Adds ``kind`` (or replaces the kind of that name). Later registrations are asked first by :func:`of`, the dense
    kind last, so a plug-in for an ``nn.Linear`` subclass takes its layers."""
    _KINDS.pop(kind.name, None)
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def get(name: str) -> BaseKind:
    """The kind registered as ``name``."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"fused_lora: no base kind {name!r} is registered (registered: {sorted(_KINDS)})") from None


def registered() -> tuple[BaseKind, ...]:
    return tuple(_KINDS.values())


def of(module: nn.Module) -> BaseKind | None:
    """The kind of ``module``, or None when no registered kind takes it."""
    dense = None
    for kind in reversed(_KINDS.values()):
        if kind.name == DENSE:
            dense = kind
            continue
        if kind.detect(module):
            return kind
    return dense if dense is not None and dense.detect(module) else None


_bases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer → (kind, its base object)
_by_handle: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # handle → base object (torch.compile's ops)


def base_of(layer: nn.Module) -> tuple[BaseKind, Any]:
    """(the kind, the base object) of a quantized ``layer`` (``kind.base``), made once per layer and kept beside it (not
    in it: a saved or copied model holds nothing of this): this runs on every call of a quantized layer."""
    cached = _bases.get(layer)
    if cached is None or _KINDS.get(cached[0].name) is not cached[0]:
        kind = of(layer)
        if kind is None or kind.base is None:
            raise TypeError(f"fused_lora: {type(layer).__name__} is not a quantized layer of a registered base kind "
                            f"(registered: {sorted(_KINDS)})")
        base = kind.base(layer)
        # a plain attribute naming the base object for torch.compile's custom ops (they take ints, not objects)
        handle = max(_by_handle.keys(), default=0) + 1
        object.__setattr__(base, "handle", handle)
        _by_handle[handle] = base
        cached = _bases[layer] = (kind, base)
    return cached


def by_handle(handle: int) -> Any:
    """The base object :func:`base_of` named ``handle`` (None for -1 or one no longer alive)."""
    return _by_handle.get(handle)


def prepare_all(module: nn.Module) -> int:
    """Runs each kind's ``prepare`` on every layer of ``module`` (itself included) of that kind; returns how many."""
    n = 0
    for m in module.modules():
        kind = of(m)
        if kind is not None and kind.prepare is not None:
            kind.prepare(m)
            n += 1
    return n


def looks_quantized(module: nn.Module) -> bool:
    """A layer whose weight is not floating point and whose kind is not registered (GPTQ/AWQ/HQQ/torchao formats)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point and of(module) is None


def unsupported_quantized_message(where: str, type_name: str, dtype: torch.dtype) -> str:
    if dtype.is_floating_point:  # a float weight no kind takes: float64 (or an fp8 format), not a quantized layer
        return (f"{where}: {type_name} holds a {dtype} weight; fused_lora's layers compute in float32, float16 or "
                "bfloat16: cast the model first (model.float(), or torch_dtype= when loading it), or leave this layer "
                "out of target_modules")
    served = ", ".join(k.describe for k in registered())
    return (f"{where}: {type_name} holds a {dtype} weight, and no registered base kind serves it (fused_lora serves: "
            f"{served}). Other quantized formats (GPTQ, AWQ, HQQ, torchao, …) are not supported without a base-kind "
            "plug-in (docs/architecture.md): load the model in floating point or with a BitsAndBytesConfig, or leave "
            "this layer out of target_modules")
