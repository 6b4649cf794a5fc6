"""PEFT's mixed-adapter batches (``adapter_names=[name per example]``) served by one multi-adapter call per layer.

PEFT computes a LoRA layer called with ``adapter_names`` as a Python loop: the base output for the whole batch, then,
per adapter named in the batch, its examples gathered, ``lora_B(lora_A(dropout(x))) * scaling`` added to them
(``LoraLayer._mixed_batch_forward``; ``"__base__"`` and names the layer has no adapter for get the base output only).
An accelerated layer (:mod:`fused_lora.peft`) computes the same with one call of the multi-adapter Function
(:func:`fused_lora.multi_layer.multi_lora_linear`): the examples grouped by adapter (a permutation, put back after),
each adapter's rows through its own A, B, scaling, dropout (and ``lora_bias``), the base-only examples through the base
layer. PEFT's argument checks run first (:meth:`LoraLayer._check_forward_args`: the names' count, merged adapters,
DoRA), so PEFT's errors stay PEFT's.

Falls back to PEFT's loop, with its semantics, whenever one adapter named in the batch cannot be served on that layer
(the reasons of ``fused_lora.peft``'s ``layer_reason``: LoRA variants, custom or hooked bases and adapter modules,
dtypes; and ``lora_bias`` on a quantized base), for extra forward arguments, and for inputs without a batch dim.

Training: PEFT refuses ``adapter_names`` while the model trains (``LoraModel._enable_peft_forward_hooks`` raises
"Cannot pass `adapter_names` when the model is in training mode"). A model that fused_lora serves accepts it: each
adapter then gets the gradients it gets trained alone on its examples (tests/test_peft_mixed_batch.py). See
:func:`allow_training`.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import bases
from .multi_layer import RowPlan, multi_lora_linear, plan_rows
from .segments import Segments


@dataclass(frozen=True)
class Serving:
    """What ``fused_lora.peft`` (the module above this one, which calls it) knows of PEFT's layers, handed over by
    :func:`connect` when it is imported: this module cannot import it back (one direction of imports)."""

    reason: Callable[[nn.Module, str, torch.Tensor], str | None]  # why (layer, adapter, x) keeps PEFT's forward
    is_dora: Callable[[nn.Module, str], bool]
    report: Callable[[str], None]  # warns once per reason and process
    weight_layout: Callable[[nn.Module], str | None]  # 'linear' / 'conv1d' for the dense bases served
    is_accelerated: Callable[[nn.Module], bool]  # whether a model holds layers fused_lora.peft serves


_serving: Serving | None = None


def connect(serving: Serving) -> None:
    global _serving
    _serving = serving


def _peft() -> Serving:
    if _serving is None:  # only fused_lora.peft's layers call in here, and importing it connects
        raise RuntimeError("fused_lora.peft_mixed: import fused_lora.peft first (it serves PEFT's layers)")
    return _serving

# (names of the batch, the layer's adapters named in it) → the grouping; PEFT hands the same names to every layer of
# the model, so one batch makes as many entries as there are distinct adapter sets among its layers.
_PLANS: dict[tuple[tuple[str, ...], tuple[str, ...]], RowPlan] = {}
_MAX_PLANS = 64


def _plan_for(names: tuple[str, ...], adapters: tuple[str, ...]) -> RowPlan:
    key = (names, adapters)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = plan_rows(names, adapters)
    return plan


def mixed_reason(layer: nn.Module, adapters: Sequence[str], x: torch.Tensor) -> str | None:
    """Why ``layer`` cannot compute a mixed batch of ``adapters`` (its adapters named in the batch) on ``x`` in one
    multi-adapter call, or None when it can."""
    peft = _peft()
    if x.dim() < 2:
        return "adapter_names with an input without a batch dim"
    for adapter in adapters:
        why = peft.reason(layer, adapter, x)
        if why is not None:
            return why
        if peft.is_dora(layer, adapter):  # PEFT refuses it before this point; a PEFT that allows it keeps its loop
            return "DoRA (use_dora=True) in a mixed-adapter batch"
    base = layer.get_base_layer()
    kind = bases.of(base)
    if kind is not None and kind.quantized and any(layer.lora_B[a].bias is not None for a in adapters):
        return "a lora_B bias (lora_bias=True) on a quantized base in a mixed-adapter batch"
    return None


def mixed_forward(layer: nn.Module, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor | None:
    """PEFT's mixed-batch forward of ``layer`` (an accelerated PEFT LoRA layer, adapters enabled, not merged), computed
    by one multi-adapter call; None when PEFT's own loop must compute it (the reason reported once)."""
    names = tuple(adapter_names)
    present = tuple(a for a in layer.lora_A if a in names)  # the layer's order: one plan per adapter set
    if not present:
        return None  # base output only: PEFT's loop costs just the base layer
    why = mixed_reason(layer, present, x)
    if why is not None:
        _peft().report(why)
        return None
    plan = _plan_for(names, present)
    batch, in_features = len(names), x.shape[-1]
    xb = x.reshape(batch, -1, in_features)
    per_example = xb.shape[1]
    if plan.order is not None:
        order, inverse = plan.index(x.device)
        xb = xb.index_select(0, order)
    n_ad = sum(plan.counts)
    y = _adapters_call(layer, xb[:n_ad].reshape(-1, in_features), plan, per_example, present)
    y = y.view(n_ad, per_example, -1)
    if plan.base:
        y_base = layer.base_layer(xb[n_ad:].reshape(-1, in_features)).view(plan.base, per_example, -1)
        y = torch.cat([y.to(y_base.dtype), y_base])
    if plan.order is not None:
        y = y.index_select(0, inverse)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _adapters_call(layer: nn.Module, x2d: torch.Tensor, plan: RowPlan, per_example: int,
                   adapters: tuple[str, ...]) -> torch.Tensor:
    base = layer.get_base_layer()
    As = tuple(layer.lora_A[a].weight for a in adapters)
    Bs = tuple(layer.lora_B[a].weight for a in adapters)
    scalings = tuple(float(layer.scaling[a]) for a in adapters)
    # PEFT applies each adapter's own dropout module: its p while that module trains, none otherwise
    ps = tuple(d.p if isinstance(d, nn.Dropout) and d.training else 0.0
               for d in (layer.lora_dropout[a] for a in adapters))
    ranks = tuple(a.shape[0] for a in As)
    key = (per_example, ranks)
    segments = plan.segments.get(key)
    if segments is None:
        segments = plan.segments[key] = Segments(tuple(c * per_example for c in plan.counts), ranks)
    biases = None
    if any(layer.lora_B[a].bias is not None for a in adapters):
        # lora_bias=True: PEFT's lora_B(...) * scaling adds scaling · b_B to the adapter's rows: an own bias of that
        # adapter (replacing the base bias on its rows), base bias + scaling · b_B; autograd sends its gradient to both
        biases = tuple(_own_bias(base.bias, layer.lora_B[a], s) for a, s in zip(adapters, scalings, strict=True))
    kind = bases.of(base)
    if kind is not None and kind.quantized:
        return multi_lora_linear(x2d, None, base.bias, As, Bs, scalings, segments, ps, True, layer=base)
    return multi_lora_linear(x2d, base.weight, base.bias, As, Bs, scalings, segments, ps, True,
                             _peft().weight_layout(base), biases=biases)


def _own_bias(base_bias: torch.Tensor | None, lora_B: nn.Linear, scaling: float) -> torch.Tensor | None:
    if lora_B.bias is None:
        return None
    term = lora_B.bias * scaling
    return term if base_bias is None else base_bias.to(term.dtype) + term


# ---------------------------------------------------------------------------------------------------------------
# Training with adapter_names
# ---------------------------------------------------------------------------------------------------------------

def allow_training(tuner: nn.Module) -> None:
    """Let a PEFT ``LoraModel`` that fused_lora serves take ``adapter_names`` while it trains.

    PEFT's ``LoraModel._enable_peft_forward_hooks`` (the context ``PeftModel.forward`` / ``generate`` enter, which
    checks the names and registers the pre-forward hooks that hand them to every LoRA layer) raises in training mode.
    This gives the tuner object an ``_enable_peft_forward_hooks`` of its own (a bound method in its ``__dict__``, so a
    deep copy carries it; :func:`disallow_training` takes it out) that enters PEFT's context with the tuner's own
    ``training`` flag False for the moment PEFT reads it, when names are given, the tuner trains and holds accelerated
    layers; everything else of PEFT's context (the check that each name exists, beam search, the hooks) is PEFT's.
    The flag is the tuner module's own attribute only: its submodules' modes, and so dropout, are untouched.

    Refused (ValueError) with gradient checkpointing on: the recomputation in backward calls the layers without the
    names (PEFT's hooks are gone by then), which would compute other adapters than the forward did.
    """
    if "_enable_peft_forward_hooks" not in tuner.__dict__:
        tuner._enable_peft_forward_hooks = types.MethodType(_enable_peft_forward_hooks, tuner)


def disallow_training(tuner: nn.Module) -> None:
    """Undo :func:`allow_training`: the tuner's class method (PEFT's) again."""
    tuner.__dict__.pop("_enable_peft_forward_hooks", None)


def _checkpointing(module: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


@contextlib.contextmanager
def _enable_peft_forward_hooks(self: nn.Module, *args, **kwargs) -> Iterator[None]:
    # Named as PEFT's method: pickling a bound method looks its name up on the object again.
    original = type(self)._enable_peft_forward_hooks
    if kwargs.get("adapter_names") is None or not self.training or not _peft().is_accelerated(self):
        with original(self, *args, **kwargs):
            yield
        return
    if _checkpointing(self):
        raise ValueError("fused_lora.peft: adapter_names= while training with gradient checkpointing: the "
                         "recomputation in backward would run without the names (PEFT's hooks are removed after the "
                         "forward) and compute other adapters; turn gradient checkpointing off "
                         "(model.gradient_checkpointing_disable()) or train one adapter per batch")
    with contextlib.ExitStack() as stack:
        self.training = False  # the flag PEFT's check reads; this module's own attribute, no submodule's
        try:
            stack.enter_context(original(self, *args, **kwargs))
        finally:
            self.training = True
        yield

