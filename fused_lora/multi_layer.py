"""Several LoRA adapters on one frozen base layer: the functional API (``multi_lora_linear``) and the module
(``MultiLoRALinear``).

    y_i = x_i Wᵀ + b(_i) + s_i · B_i A_i dropout_i(x_i)        adapter i on segment i of x's rows

One call computes every adapter's rows with one read of the base weight (the router's ``multi`` variant: fused,
composed and PyTorch paths on dense, bitsandbytes 4-bit and 8-bit bases), and each adapter computes exactly what it
computes alone on its rows: a rank or learning-rate sweep, or one adapter per task or tenant, trained in one run.

The module takes a batch's rows per example (dim 0 of x: a batch of sequences): which adapter each example belongs to
comes from the :class:`Rows` object its model shares (set by ``fused_lora.multi_adapters``' context and forward
argument ``adapter_names=``). Examples not grouped by adapter are grouped for the call and put back; examples named
``"__base__"``, or an adapter this layer does not have, get the base layer's output only (PEFT's ``adapter_names=``
rules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import bases
from .bases import looks_quantized, unsupported_quantized_message
from .dispatch import MULTI, check_supported, multi_call
from .layer import lora_scaling
from .segments import Segments
from .validation import FLOAT_DTYPES, WEIGHT_LAYOUTS, ShapeError, autocast_inputs

BASE_ROWS = "__base__"  # PEFT's name for examples that get the base model's output only

__all__ = ["BASE_ROWS", "AdapterSettings", "MultiLoRALinear", "Rows", "multi_lora_linear"]


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    lengths: Sequence[int] | Segments,
    dropout_ps: Sequence[float] | None = None,
    training: bool = True,
    weight_layout: str = "linear",
    *,
    biases: Sequence[torch.Tensor | None] | None = None,
    dropout_seeds: torch.Tensor | Sequence[int] | None = None,
    backend: str | None = None,
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Several LoRA adapters on one frozen base in one call: x's rows (leading dims flattened) in contiguous segments
    of ``lengths`` (host ints, one per adapter, 0 allowed), segment i through adapter i::

        y_i = x_i Wᵀ + b(_i) + scalings[i] · (dropout_i(x_i) lora_As[i]ᵀ) lora_Bs[i]ᵀ

    Args:
        x: (..., in_features).
        weight, bias: a dense base (``weight_layout`` "linear": out×in, "conv1d": in×out); frozen. With ``layer`` (a
            quantized base: bitsandbytes Linear4bit / Linear8bitLt) ``weight`` is None and ``bias`` its bias.
        lora_As, lora_Bs: adapter i's r_i×in and out×r_i (one dtype and device for all: x's or float32).
        scalings: alpha_i/r_i (or alpha_i/sqrt(r_i)).
        lengths: the rows of each adapter, in adapter order (or a ``segments.Segments``).
        dropout_ps: each adapter's dropout on its LoRA branch, applied when ``training`` (default: none).
        biases: adapter i's own bias (out_features,) replacing ``bias`` on its rows, or None.
        dropout_seeds: one per adapter (ints or an int64 tensor); drawn from PyTorch's generator of x's device when
            None. Adapter i's mask is what ``fused_lora_linear`` draws for x_i alone with seed i.
        backend: "auto", "triton" or "torch" (as ``fused_lora_linear``).
    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast).
    """
    n = len(lora_As)
    where = "multi_lora_linear"
    if len(lora_Bs) != n or len(scalings) != n or (dropout_ps is not None and len(dropout_ps) != n) or \
            (biases is not None and len(biases) != n):
        raise ValueError(f"{where}: one lora_A, lora_B, scaling (and dropout p, bias, when given) per adapter; got "
                         f"{n} lora_As, {len(lora_Bs)} lora_Bs, {len(scalings)} scalings, "
                         f"{None if dropout_ps is None else len(dropout_ps)} dropout_ps, "
                         f"{None if biases is None else len(biases)} biases")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.dtype.is_floating_point:
        raise TypeError(f"{where}: x must be a floating-point tensor of shape (..., in_features), got "
                        f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if layer is None:
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"{where}: weight_layout={weight_layout!r}; use one of {WEIGHT_LAYOUTS}")
        x, weight, bias = autocast_inputs(x, weight, bias)
        K = weight.shape[1] if weight_layout == "linear" else weight.shape[0]
        if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
            raise TypeError(f"{where}: x ({x.dtype}) and the base weight ({weight.dtype}) must share one of "
                            f"{FLOAT_DTYPES}")
        if weight.requires_grad:
            raise ValueError(f"{where}: the base weight {tuple(weight.shape)} requires grad; several adapters share "
                             "one frozen base and train only their A, B (and own biases). Freeze it with "
                             "weight.requires_grad_(False)")
    else:
        K = bases.of(layer).in_out(layer)[0] if bases.of(layer) is not None else x.shape[-1]
    if x.shape[-1] != K:
        raise ShapeError(f"{where}: x has shape {tuple(x.shape)} but the base layer has in_features={K}")
    ranks = tuple(a.shape[0] for a in lora_As)
    segments = lengths if isinstance(lengths, Segments) else Segments(tuple(lengths), ranks)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else x.shape[0] if x.dim() > 1 else 1
    segments.check(rows, n, where)
    if segments.ranks != ranks:
        raise ValueError(f"{where}: the segments carry ranks {list(segments.ranks)}, the adapters have {list(ranks)}")
    ps = tuple(float(p) if training else 0.0 for p in (dropout_ps if dropout_ps is not None else (0.0,) * n))
    bad = [p for p in ps if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"{where}: dropout p must be in [0, 1], got {bad[0]}")
    return multi_call(x, weight, bias, tuple(lora_As), tuple(lora_Bs), tuple(float(s) for s in scalings), ps, segments,
                      weight_layout, biases=tuple(biases) if biases is not None else None,
                      dropout_seeds=dropout_seeds, backend=backend, layer=layer)


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter of a :class:`MultiLoRALinear` (PEFT's words): its rank, alpha, dropout, rsLoRA, init, and whether it
    trains a bias of its own (PEFT's ``bias="lora_only"``: a copy of the base bias, trained for this adapter only)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    own_bias: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


@dataclass
class Rows:
    """Which adapter each example of the batch belongs to, shared by every :class:`MultiLoRALinear` of a model:
    ``names`` (one per example along x's dim 0; None: every example to ``active``), and what the layers worked out of
    it for this batch (kept until the names change)."""

    names: tuple[str, ...] | None = None
    active: str | None = None
    plans: dict = field(default_factory=dict)

    def set(self, names: Sequence[str] | None) -> None:
        names = None if names is None else tuple(names)
        if names != self.names:
            self.names = names
            self.plans.clear()


@dataclass(frozen=True)
class RowPlan:
    """A batch's grouping for one layer's adapters: the examples in grouped order (``order``, None when they are
    already), each adapter's examples, the base-only examples at the end."""

    order: tuple[int, ...] | None
    counts: tuple[int, ...]
    base: int
    tensors: dict = field(default_factory=dict)  # device → (order, its inverse) as index tensors
    segments: dict = field(default_factory=dict)  # (rows per example, ranks) → Segments

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.tensors.get(device)
        if found is None:
            order = torch.tensor(self.order, dtype=torch.int64)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            found = self.tensors[device] = (order.to(device), inverse.to(device))
        return found


def plan_rows(names: tuple[str, ...], adapters: tuple[str, ...]) -> RowPlan:
    """How to group a batch whose examples are named ``names`` for a layer holding ``adapters`` (in that order)."""
    index = {name: i for i, name in enumerate(adapters)}
    n = len(adapters)
    groups = [index.get(name, n) for name in names]  # n: base-only rows (BASE_ROWS, or an adapter not on this layer)
    counts = [0] * (n + 1)
    for g in groups:
        counts[g] += 1
    grouped = all(a <= b for a, b in zip(groups, groups[1:], strict=False))
    order = None if grouped else tuple(sorted(range(len(groups)), key=lambda e: groups[e]))
    return RowPlan(order, tuple(counts[:n]), counts[n])


class MultiLoRALinear(nn.Module):
    """A frozen base layer (``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) kept as
    the child ``base_layer``, with several named LoRA adapters: ``lora_A[name]`` (r×in), ``lora_B[name]`` (out×r) and,
    for an adapter with ``own_bias``, ``lora_bias[name]`` (out). Each batch's examples go to the adapters the shared
    :class:`Rows` names (every example to ``rows.active`` without names); all of them in one fused call.

    Adapters default to float32 on a half base and to the weight's dtype otherwise (PEFT's default); each adapter is
    initialised as PEFT's (A kaiming-uniform, B zeros; ``init_lora_weights``) by :meth:`reset_adapter`."""

    def __init__(self, base_layer: nn.Module, adapters: dict[str, AdapterSettings], *,
                 adapter_dtype: torch.dtype | None = None, rows: Rows | None = None, init: bool = True) -> None:
        super().__init__()
        kind = bases.of(base_layer)
        where = "MultiLoRALinear"
        if kind is None:
            if looks_quantized(base_layer):
                raise TypeError(unsupported_quantized_message(where, type(base_layer).__name__,
                                                              base_layer.weight.dtype))
            served = ", ".join(k.describe for k in bases.registered())
            raise TypeError(f"{where}: expected a layer of a registered base kind ({served}), got "
                            f"{type(base_layer).__name__}")
        check_supported(MULTI, kind, where)
        if not adapters:
            raise ValueError(f"{where}: give at least one adapter (name → AdapterSettings)")
        for name in adapters:
            if not isinstance(name, str) or not name or "." in name or name == BASE_ROWS:
                raise ValueError(f"{where}: adapter name {name!r} must be a non-empty string without '.', and not "
                                 f"{BASE_ROWS!r} (PEFT's name for base-only rows)")
        if kind.quantized:
            why = kind.not_ready(base_layer)
            if why is not None:
                raise ValueError(f"{where}: {why}")
            if kind.prepare is not None:
                kind.prepare(base_layer)
            bases.base_of(base_layer)  # its base object now, not while torch.compile traces the first call
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.kind_name = kind.name
        self.quantized = kind.quantized
        self.weight_layout = kind.layout(base_layer)
        self.in_features, self.out_features = kind.in_out(base_layer)
        self.settings = dict(adapters)
        self.rows = rows if rows is not None else Rows()
        if self.rows.active is None:
            self.rows.active = next(iter(adapters))
        weight = base_layer.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.quantized or weight.dtype in (torch.float16, torch.bfloat16) \
                else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        for name, s in adapters.items():
            if not isinstance(s.r, int) or isinstance(s.r, bool) or s.r < 1:
                raise ValueError(f"{where}: adapter {name!r}: r={s.r!r} must be a positive integer")
            if not 0.0 <= s.lora_dropout <= 1.0:
                raise ValueError(f"{where}: adapter {name!r}: lora_dropout={s.lora_dropout} must be in [0, 1]")
            self.lora_A[name] = nn.Parameter(torch.empty(s.r, self.in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, s.r, **factory))
            if s.own_bias:
                base_bias = base_layer.bias
                own = torch.zeros(self.out_features, **factory) if base_bias is None else \
                    base_bias.detach().to(**factory).clone()
                self.lora_bias[name] = nn.Parameter(own)
            if init:
                self.reset_adapter(name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.settings)

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """PEFT's init of adapter ``name``: A kaiming-uniform(a=√5) ("gaussian": normal(std=1/r)), B zeros (False:
        both random, for tests); the same draws ``LoRALinear.reset_lora_parameters`` makes."""
        s = self.settings[name]
        A, B = self.lora_A[name], self.lora_B[name]
        if s.init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / s.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if s.init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer's own output."""
        return self.base_layer(x)

    def _segments(self, plan: RowPlan, per_example: int, names: tuple[str, ...]) -> Segments:
        """The segments of the grouped rows, kept on the batch's plan per (rows per example, ranks): one device table
        per batch, shared by the layers with the same ranks."""
        ranks = tuple(self.settings[n].r for n in names)
        key = (per_example, ranks)
        seg = plan.segments.get(key)
        if seg is None:
            seg = plan.segments[key] = Segments(tuple(c * per_example for c in plan.counts), ranks)
        return seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"MultiLoRALinear(in_features={self.in_features}, out_features={self.out_features}): x "
                             f"has shape {tuple(x.shape)}; its last dim must be in_features")
        names = self.adapter_names
        rows = self.rows
        examples = rows.names
        if examples is None:
            if rows.active not in self.settings:
                return self.base_forward(x)
            examples = (rows.active,) * (x.shape[0] if x.dim() > 1 else 1)
        plan = rows.plans.get(names)
        if plan is None:
            plan = rows.plans[names] = plan_rows(examples, names)
        batch = len(examples)
        lead = x.shape[0] if x.dim() > 1 else 1
        if lead % batch:
            raise ShapeError(f"MultiLoRALinear: x has shape {tuple(x.shape)}, but {batch} examples were named "
                             "(adapter_names: one per example along dim 0)")
        xb = x.reshape(batch, -1, self.in_features)
        per_example = xb.shape[1]
        if plan.order is not None:
            order, inverse = plan.index(x.device)
            xb = xb.index_select(0, order)
        n_ad = sum(plan.counts)
        y = None
        if n_ad:
            # Every row an adapter's (the usual training batch): x itself, not a slice of it, so that autograd
            # hands dX over as it is (a slice's backward zero-fills and copies a dX of x's size per layer).
            x_ad = xb if n_ad == batch else xb[:n_ad]
            y = self._adapters_call(x_ad.reshape(-1, self.in_features), self._segments(plan, per_example, names),
                                    names).view(n_ad, per_example, -1)
        if plan.base:
            y_base = self.base_forward(xb[n_ad:].reshape(-1, self.in_features)).view(plan.base, per_example, -1)
            y = y_base if y is None else torch.cat([y, y_base.to(y.dtype)])
        if plan.order is not None:
            y = y.index_select(0, inverse)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _adapters_call(self, x2d: torch.Tensor, segments: Segments, names: tuple[str, ...]) -> torch.Tensor:
        A = tuple(self.lora_A[n] for n in names)
        B = tuple(self.lora_B[n] for n in names)
        own = tuple(self.lora_bias[n] if n in self.lora_bias else None for n in names)
        settings = [self.settings[n] for n in names]
        scalings = [s.scaling for s in settings]
        ps = [s.lora_dropout for s in settings]
        biases = own if any(o is not None for o in own) else None
        if self.quantized:
            return multi_lora_linear(x2d, None, self.base_layer.bias, A, B, scalings, segments, ps, self.training,
                                     biases=biases, layer=self.base_layer)
        return multi_lora_linear(x2d, self.base_layer.weight, self.base_layer.bias, A, B, scalings, segments, ps,
                                 self.training, self.weight_layout, biases=biases)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={s.r}, alpha={s.lora_alpha}, p={s.lora_dropout}"
                             for n, s in self.settings.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, base={self.kind_name}, "
                f"adapters={{{adapters}}}")
