"""Several LoRA adapters on one base on the PyTorch backend: the same semantics as the segmented kernels
(``multi_triton``), for CPU tensors and wherever a kernel cannot run.

One base GEMM over all rows (W read once), then per segment the single-adapter path's own rank-r arithmetic
(``lora_torch``'s helpers) on the rows of that segment, in place: segment i's rows are what ``lora_torch`` computes for
x_i alone with seed_i, its dropout mask ``dropout.keep_mask(seed_i, (len_i, K), p_i)``, regenerated in backward. S
(and dS) are packed as in the kernels (``Segments.split``), in the adapters' dtype; dA_i and dB_i in the adapters'
dtype; the per-segment bias sums Σ_rows dY_i fp32 (n, N). ``keeps``: per segment, a boolean keep mask to use instead
of this backend's (the kernels' masks, when this path stands in for a kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..bases import Pass
from ..call import Call, Operands
from ..segments import MultiAdapters, Segments, bias_deltas, seed_ints
from .dense_base import DenseBase
from .lora_torch import add_masked, add_up, branch_backward, down

__all__ = ["COMPOSED", "DENSE", "backward", "base_bias", "base_output", "composed_backward", "composed_forward",
           "dense_output", "forward"]

Keeps = Sequence[torch.Tensor | None] | None


def base_bias(base) -> torch.Tensor | None:
    """The bias a base layer's forward adds: ``base.bias`` (``DenseBase``) or ``base.layer.bias`` (bitsandbytes)."""
    if hasattr(base, "bias"):
        return base.bias
    return getattr(getattr(base, "layer", None), "bias", None)


def _seeds(seeds, adapters: MultiAdapters, keeps: Keeps) -> list[int]:
    """Host ints for the Generators, read only when some segment with dropout draws its own mask."""
    own_draw = any(p > 0 and _keep(keeps, i) is None for i, p in enumerate(adapters.dropout_ps))
    return seed_ints(seeds, adapters.n) if own_draw else [0] * adapters.n


def _keep(keeps: Keeps, i: int) -> torch.Tensor | None:
    return keeps[i] if keeps is not None else None


def _rank_terms(y: torch.Tensor, x: torch.Tensor, adapters: MultiAdapters, segments: Segments, seeds, keeps: Keeps,
                deltas: torch.Tensor | None) -> torch.Tensor:
    """y_i += s_i · dropout_i(x_i) A_iᵀ B_iᵀ (+ deltas[i]) in place per segment; returns the packed S."""
    ints = _seeds(seeds, adapters, keeps)
    parts = []
    for i in range(segments.n):
        rows = segments.rows_of(i)
        x_i = x[rows]
        s_i, _ = down(x_i, adapters.lora_A[i], adapters.dropout_ps[i], ints[i], _keep(keeps, i))
        y_i = y[rows]
        if deltas is not None and adapters.biases[i] is not None:
            y_i.add_(deltas[i].to(y.dtype))
        add_up(y_i, s_i, adapters.lora_B[i], adapters.scalings[i])
        parts.append(s_i)
    return segments.pack(parts)


def composed_forward(
    x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments, seeds: torch.Tensor | Sequence[int] | None,
    *, keeps: Keeps = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) (the base's own forward, its bias included; any object with ``forward``/``input_grad``) with each
    segment's rank-r term added in place, and an adapter's own bias in place of the base's (:func:`base_output`).
    Returns (y M×N in the base's output dtype, S packed in the adapters' dtype)."""
    adapters.check(segments, x.shape[0], x.shape[1], adapters.out_features, "multi_torch.composed_forward")
    y, deltas = base_output(x, base, adapters, segments)
    return y, _rank_terms(y, x, adapters, segments, seeds, keeps, deltas)


def dense_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: MultiAdapters,
                 segments: Segments, weight_layout: str) -> torch.Tensor:
    """x Wᵀ + each segment's bias (an adapter's own, else ``bias``) in x's dtype: one GEMM over all rows, rounded once
    with its bias as ``lora_torch.forward``'s (its F.linear / addmm without own biases; with them y starts as each
    row's bias and the GEMM adds into it: addmm's beta = 1, F.linear's own rounding)."""
    n_out = weight.shape[0] if weight_layout == "linear" else weight.shape[1]
    if not adapters.has_own_bias:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if weight_layout == "linear":
            return torch.nn.functional.linear(x, weight, bias)
        return x @ weight if bias is None else torch.addmm(bias, x, weight)
    y = torch.empty((x.shape[0], n_out), device=x.device, dtype=x.dtype)
    for i in range(segments.n):
        own = adapters.biases[i] if adapters.biases[i] is not None else bias
        if own is None:
            y[segments.rows_of(i)].zero_()
        else:
            y[segments.rows_of(i)].copy_(own.to(x.dtype).expand(segments.lengths[i], n_out))
    return y.addmm_(x, weight.t() if weight_layout == "linear" else weight)


def base_output(x: torch.Tensor, base, adapters: MultiAdapters,
                segments: Segments) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y = the base's output over all rows, the bias corrections the composed path adds with the rank-r terms or None).
    A dense base puts each segment's own bias into its GEMM (exactly what the adapter computes alone); any other base
    (bitsandbytes) adds its own bias inside its forward, so an adapter's own bias comes in as own − base afterwards
    (one rounding of y more than alone)."""
    if isinstance(base, DenseBase):
        return dense_output(x, base.weight, base.bias, adapters, segments, base.layout), None
    return base.forward(x), bias_deltas(base_bias(base), adapters)


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | Sequence[int] | None, weight_layout: str, gemm: str = "", *, keeps: Keeps = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense base (either layout): one GEMM over all rows with each segment's bias (:func:`dense_output`), then the
    rank-r terms per segment. ``gemm`` is the kernels' choice, ignored here."""
    n_out = weight.shape[0] if weight_layout == "linear" else weight.shape[1]
    adapters.check(segments, x.shape[0], x.shape[1], n_out, "multi_torch.forward")
    y = dense_output(x, weight, bias, adapters, segments, weight_layout)
    return y, _rank_terms(y, x, adapters, segments, seeds, keeps, None)


def _lora_grads(dy, x, adapters: MultiAdapters, segments: Segments, seeds, s: torch.Tensor, needs, keeps: Keeps,
                dx: torch.Tensor | None):
    """Each segment's share: m_i ⊙ (dS_i A_i) added into ``dx`` (the base's dX) in place, and ([dA_i], [dB_i], dbias
    (n, N) fp32), None where not needed."""
    need_dx, need_da, need_db, need_dbias = needs
    ints = _seeds(seeds, adapters, keeps)
    s_parts = segments.split(s)
    das, dbs, dbias = [], [], []
    for i in range(segments.n):
        rows = segments.rows_of(i)
        lora_dx, keep_f, da, db, db_i = branch_backward(
            dy[rows], x[rows], adapters.lora_A[i], adapters.lora_B[i], s_parts[i], adapters.scalings[i],
            adapters.dropout_ps[i], ints[i], need_dx, need_da, need_db, need_dbias, _keep(keeps, i))
        if need_dx:
            add_masked(dx[rows], lora_dx, keep_f)
        das.append(da)
        dbs.append(db)
        dbias.append(db_i)
    return (das if need_da else None), (dbs if need_db else None), (torch.stack(dbias) if need_dbias else None)


def composed_backward(
    dy: torch.Tensor, x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | Sequence[int] | None, s: torch.Tensor,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, *, keeps: Keeps = None,
) -> tuple:
    """Returns (dX, [dA_i], [dB_i], dbias fp32 (n, N)), None where not needed: dX is the base's input gradient with each
    segment's m_i ⊙ (dS_i A_i) added in place, the masks regenerated once per segment for dA and dX."""
    dx = base.input_grad(dy, x.dtype) if need_dx else None
    das, dbs, dbias = _lora_grads(dy, x, adapters, segments, seeds, s, (need_dx, need_da, need_db, need_dbias), keeps,
                                  dx)
    return dx, das, dbs, dbias


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | Sequence[int] | None, s: torch.Tensor, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, gemm: str = "", *, keeps: Keeps = None,
) -> tuple:
    """Dense base (either layout): dX = dY W over all rows, then each segment's m_i ⊙ (dS_i A_i) added in place (as
    ``lora_torch.backward``). Returns (dX in x's dtype, [dA_i], [dB_i], dbias fp32 (n, N)), None where not needed."""
    dx = None
    if need_dx:
        dx = dy @ (weight if weight_layout == "linear" else weight.t())
    das, dbs, dbias = _lora_grads(dy, x, adapters, segments, seeds, s, (need_dx, need_da, need_db, need_dbias), keeps,
                                  dx)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, das, dbs, dbias


# ------------------------------------------------------------------- the passes (the multi variant's PyTorch path)
# In the driver's pass form (``bases.Pass``): ``t.segments`` / ``t.adapters`` carry the batch's segments and the
# adapters, ``seed`` the per-adapter seeds (host ints on the PyTorch backend, the device table on the Triton one),
# ``keep`` the kernels' per-segment boolean masks when this path stands in for the kernels (else None: each segment's
# own Generator mask). Backward returns (dX, [dA_i], [dB_i], the per-segment bias sums (n, N) fp32).


def _dense_pass_forward(t: Operands, call: Call, seed, keep: Keeps = None) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(t.x, t.weight, t.bias, t.adapters, t.segments, seed, call.layout, keeps=keep)


def _dense_pass_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                         keep: Keeps = None) -> tuple:
    return backward(dy, t.x, t.weight, t.adapters, t.segments, seed, saved[0], call.layout, *needs, keeps=keep)


def _base_of(t: Operands, call: Call):
    return t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)


def _composed_pass_forward(t: Operands, call: Call, seed, keep: Keeps = None) -> tuple[torch.Tensor, torch.Tensor]:
    return composed_forward(t.x, _base_of(t, call), t.adapters, t.segments, seed, keeps=keep)


def _composed_pass_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                            keep: Keeps = None) -> tuple:
    return composed_backward(dy, t.x, _base_of(t, call), t.adapters, t.segments, seed, saved[0], *needs, keeps=keep)


DENSE = Pass(_dense_pass_forward, _dense_pass_backward)  # the dense kind's multi-adapter PyTorch path
COMPOSED = Pass(_composed_pass_forward, _composed_pass_backward)  # any base object's multi-adapter PyTorch path
