"""Several LoRA adapters on one base on the Triton backend (``kernels/multi_lora.py``): the launchers of the segmented
kernels and the layer's two ways to run with them, as ``lora_triton`` for one adapter.

    forward:  S_i = dropout_i(x_i) A_iᵀ (multi_lora_down), then y
    backward: dS, dB, dbias (multi_lora_dy_pass), then dX, and dA (multi_lora_da)
    "fused":     y = x Wᵀ + b(_i) + s_i·S_i B_iᵀ, one GEMM over all rows (multi_lora_forward)
                 dX = dY W + m_i ⊙ (dS_i A_i), one GEMM (multi_lora_dx)
    "composed":  y = base(x), += s_i·S_i B_iᵀ in place (multi_lora_up_add)
                 dX = the base's dX, += m_i ⊙ (dS_i A_i) in place (multi_lora_dx_add)

Inputs: x (M×K, any strides), the :class:`~fused_lora.segments.Segments` of the batch (host ints), the
:class:`~fused_lora.segments.MultiAdapters` and one dropout seed per adapter (an int64 (n,) tensor on the device, or
ints). Outputs: y in x's dtype; S and dS packed fp32 (``Segments.split`` gives each len_i×r_i); dA_i (r_i×K) and dB_i
(N×r_i) fp32, views of the concatenated results; the per-segment bias sums Σ_rows dY_i as one fp32 (n, N) tensor
(``segments.bias_grads`` makes the base's and each adapter's own bias gradient of it). A kernel that cannot run hands
the call to the next path (the autograd driver). Launch conventions:
``triton_launch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bases import Pass
from ..call import Call, Operands
from ..kernels.configs import m_bucket
from ..kernels.multi_lora import (
    multi_lora_da_kernel,
    multi_lora_down_kernel,
    multi_lora_dx_add_kernel,
    multi_lora_dx_kernel,
    multi_lora_dy_kernel,
    multi_lora_fwd_kernel,
    multi_lora_up_add_kernel,
)
from ..segments import MultiAdapters, Segments, bias_rows, seed_table
from . import multi_torch
from .dense_base import DenseBase
from .masks import keep
from .triton_launch import (
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    on_device,
    rank_block,
    skinny_rank_block,
    split_factor,
    unused,
    weight_strides,
    wide_offsets,
)

GEMMS = ("fused", "composed")

__all__ = ["COMPOSED", "FUSED", "GEMMS", "Tables", "backward", "backward_with", "composed_backward", "composed_forward",
           "forward", "forward_with", "kernel_keeps", "multi_lora_da", "multi_lora_down", "multi_lora_dx",
           "multi_lora_dx_add", "multi_lora_dy_pass", "multi_lora_forward", "multi_lora_up_add", "rank_args", "tables"]


@dataclass(frozen=True)
class Tables:
    """What every segmented kernel indexes by, on the launch device: ``seg`` int64 (3, n+1) (row starts, rank offsets,
    S offsets: ``Segments.table``), ``scal`` fp32 (3, n) (scaling, p, 1/(1-p): ``MultiAdapters.scalar_table``),
    ``seeds`` int64 (n,), and whether any adapter drops out."""

    segments: Segments
    seg: torch.Tensor
    scal: torch.Tensor
    seeds: torch.Tensor
    has_dropout: bool


def tables(segments: Segments, adapters: MultiAdapters, seeds: torch.Tensor | list[int] | None,
           device: torch.device) -> Tables:
    """The :class:`Tables` of a call (the segment and scalar tables are kept on their objects per device)."""
    return Tables(segments, segments.table(device), adapters.scalar_table(device),
                  seed_table(seeds if adapters.has_dropout else None, adapters.n, device), adapters.has_dropout)


def rank_args(t: Tables, adapter_dtype: torch.dtype, device: torch.device, skinny: bool) -> dict:
    r_max = t.segments.max_rank
    block_r = skinny_rank_block(r_max, device) if skinny else rank_block(r_max, adapter_dtype, device)
    return {"LORA_DOT": dot_dtype(adapter_dtype), "LORA_PREC": dot_precision(adapter_dtype, device),
            "BLOCK_R": block_r, "ARCH": arch(device)}


def multi_lora_down(x: torch.Tensor, lora_A: torch.Tensor, t: Tables, split_k: int | None = None) -> torch.Tensor:
    """S_i = dropout_i(x_i) A_iᵀ, packed fp32 (Σ len_i·r_i). ``lora_A``: A_cat (R_tot×K). ``split_k`` slices of K
    (default: enough to fill the GPU when the row tiles alone do not), summed in a fixed order."""
    M, K = x.shape
    seg = t.segments
    rank = rank_args(t, lora_A.dtype, x.device, skinny=True)
    block_r = rank["BLOCK_R"]
    if split_k is None:
        split_k = split_factor(cdiv(M, 64) * cdiv(seg.max_rank, block_r), cdiv(K, 256), x.device, cap=8)
    numel = seg.s_numel
    out = torch.empty((split_k, numel) if split_k > 1 else (numel,), device=x.device, dtype=torch.float32)
    if numel == 0:
        return out.sum(0) if split_k > 1 else out
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) + seg.n, cdiv(seg.max_rank, block_r), split_k)
    with on_device(x.device):
        multi_lora_down_kernel[grid](
            x, lora_A, out, t.seg, t.scal, t.seeds, M, K, seg.n, seg.max_rank, m_bucket(M),
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), numel if split_k > 1 else 0,
            HAS_DROPOUT=t.has_dropout, WIDE=wide_offsets(x, lora_A, out), **rank,
        )
    return out.sum(0) if split_k > 1 else out


def _bias_args(rows: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int, int]:
    if rows is None:
        return unused(device), 0, 1
    return rows, rows.stride(0), rows.stride(1)


def multi_lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, lora_B: torch.Tensor,
    t: Tables, weight_layout: str,
) -> torch.Tensor:
    """y_i = x_i Wᵀ + bias[i] + s_i · S_i B_iᵀ in x's dtype (M×N), one Triton GEMM over all rows. ``bias``: (n, N), row
    i the bias of segment i (``segments.bias_rows``), or None; ``s``: the packed S; ``lora_B``: B_cat (N×R_tot)."""
    M, K = x.shape
    N = lora_B.shape[0]
    seg = t.segments
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    bias_arg, stride_bias_seg, stride_bias = _bias_args(bias, x.device)
    grid = lambda meta: ((cdiv(M, meta["BLOCK_M"]) + seg.n) * cdiv(N, meta["BLOCK_N"]),)
    with on_device(x.device):
        multi_lora_fwd_kernel[grid](
            x, weight, bias_arg, s, lora_B, y, t.seg, t.scal,
            M, N, K, seg.n, seg.max_rank, m_bucket(M),
            x.stride(0), x.stride(1), stride_wk, stride_wn, lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), stride_bias_seg, stride_bias,
            HAS_BIAS=bias is not None, BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, x.device),
            WIDE=wide_offsets(x, weight, bias_arg, s, lora_B, y), **rank_args(t, lora_B.dtype, x.device, False),
        )
    return y


def multi_lora_up_add(y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, t: Tables,
                      bias_delta: torch.Tensor | None = None) -> torch.Tensor:
    """y_i += s_i · S_i B_iᵀ (+ bias_delta[i]) in place (y: the base layer's M×N output); returns y. ``bias_delta``:
    fp32 (n, N) (``segments.bias_deltas``), or None."""
    M, N = y.shape
    seg = t.segments
    if M == 0 or N == 0:
        return y
    delta = bias_delta.contiguous() if bias_delta is not None else unused(y.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) + seg.n, cdiv(N, meta["BLOCK_N"]))
    with on_device(y.device):
        multi_lora_up_add_kernel[grid](
            y, s, lora_B, delta, t.seg, t.scal, M, N, seg.n, seg.max_rank, m_bucket(M),
            y.stride(0), y.stride(1), lora_B.stride(0), lora_B.stride(1), delta.stride(0) if bias_delta is not None
            else 0,
            HAS_DELTA=bias_delta is not None, WIDE=wide_offsets(y, s, lora_B),
            **rank_args(t, lora_B.dtype, y.device, False),
        )
    return y


def multi_lora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, t: Tables,
    need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over dY: (dS packed fp32, dB_cat fp32 N×R_tot, the per-segment Σ_rows dY fp32 (n, N)), each None when
    not needed."""
    M, N = dy.shape
    seg = t.segments
    rank = rank_args(t, lora_B.dtype, dy.device, skinny=True)
    block_r = rank["BLOCK_R"]
    if split_n is None:
        split_n = split_factor(cdiv(M, 64) * cdiv(seg.max_rank, block_r), cdiv(N, 128), dy.device)
    f32 = {"device": dy.device, "dtype": torch.float32}
    nothing = unused(dy.device)
    ds = (torch.zeros if split_n > 1 else torch.empty)((seg.s_numel,), **f32) if need_ds else nothing
    db = torch.zeros((N, seg.total_rank), **f32) if need_db else nothing
    dbias = torch.zeros((seg.n, N), **f32) if need_dbias else nothing
    if M > 0 and N > 0:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) + seg.n, cdiv(seg.max_rank, block_r), split_n)
        with on_device(dy.device):
            multi_lora_dy_kernel[grid](
                dy, lora_B, s, ds, db, dbias, t.seg, t.scal, M, N, seg.n, seg.max_rank, m_bucket(M),
                dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
                *((db.stride(0), db.stride(1)) if need_db else (1, 1)), dbias.stride(0) if need_dbias else 0,
                DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db,
                WIDE=wide_offsets(dy, lora_B, s, ds, db), **rank,
            )
    elif need_ds:
        ds.zero_()
    return (ds if need_ds else None), (db if need_db else None), (dbias if need_dbias else None)


def multi_lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, t: Tables,
    weight_layout: str, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX_i = dY_i W + m_i ⊙ (dS_i A_i) (M×K, ``out_dtype``), one Triton GEMM over all rows."""
    M, N = dy.shape
    K = lora_A.shape[1]
    seg = t.segments
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    if M == 0 or K == 0:
        return dx
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    grid = lambda meta: ((cdiv(M, meta["BLOCK_M"]) + seg.n) * cdiv(K, meta["BLOCK_N"]),)
    with on_device(dy.device):
        multi_lora_dx_kernel[grid](
            dy, weight, ds, lora_A, dx, t.seg, t.scal, t.seeds, M, N, K, seg.n, seg.max_rank, m_bucket(M),
            dy.stride(0), dy.stride(1), stride_wk, stride_wn, lora_A.stride(0), lora_A.stride(1),
            dx.stride(0), dx.stride(1),
            HAS_DROPOUT=t.has_dropout, BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
            WIDE=wide_offsets(dy, weight, ds, lora_A, dx), **rank_args(t, lora_A.dtype, dy.device, False),
        )
    return dx


def multi_lora_dx_add(dx: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, t: Tables) -> torch.Tensor:
    """dX_i += m_i ⊙ (dS_i A_i) in place (dX: the base layer's input gradient, M×K); returns dX."""
    M, K = dx.shape
    seg = t.segments
    if M == 0 or K == 0:
        return dx
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) + seg.n, cdiv(K, meta["BLOCK_N"]))
    with on_device(dx.device):
        multi_lora_dx_add_kernel[grid](
            dx, ds, lora_A, t.seg, t.scal, t.seeds, M, K, seg.n, seg.max_rank, m_bucket(M),
            dx.stride(0), dx.stride(1), lora_A.stride(0), lora_A.stride(1),
            HAS_DROPOUT=t.has_dropout, WIDE=wide_offsets(dx, ds, lora_A),
            **rank_args(t, lora_A.dtype, dx.device, False),
        )
    return dx


def multi_lora_da(ds: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, t: Tables,
                  split_m: int | None = None) -> torch.Tensor:
    """dA_cat (R_tot×K, fp32): rows ``Segments.ranks_of(i)`` = dS_iᵀ (m_i ⊙ x_i); zeros for an empty segment."""
    M, K = x.shape
    seg = t.segments
    rank = rank_args(t, lora_A.dtype, x.device, skinny=True)
    block_r = rank["BLOCK_R"]
    if split_m is None:
        split_m = split_factor(seg.n * cdiv(K, 64) * cdiv(seg.max_rank, block_r), cdiv(M, 128 * seg.n), x.device)
    da = (torch.zeros if split_m > 1 else torch.empty)((seg.total_rank, K), device=x.device, dtype=torch.float32)
    if K == 0:
        return da
    ds_arg = ds if ds.numel() else unused(x.device)  # all segments empty: never read
    grid = lambda meta: (seg.n * cdiv(K, meta["BLOCK_K"]), cdiv(seg.max_rank, block_r), split_m)
    with on_device(x.device):
        multi_lora_da_kernel[grid](
            ds_arg, x, da, t.seg, t.scal, t.seeds, M, K, seg.n, seg.max_rank, m_bucket(M),
            x.stride(0), x.stride(1), da.stride(0), da.stride(1),
            DA_ATOMIC=split_m > 1, HAS_DROPOUT=t.has_dropout, WIDE=wide_offsets(ds, x, da), **rank,
        )
    return da


# ------------------------------------------------------------------------------------------ the layer, two ways


def _per_adapter(segments: Segments, da: torch.Tensor | None, db: torch.Tensor | None):
    """dA_cat / dB_cat as per-adapter views (dA_i r_i×K, dB_i N×r_i), None stays None."""
    das = [da[segments.ranks_of(i)] for i in range(segments.n)] if da is not None else None
    dbs = [db[:, segments.ranks_of(i)] for i in range(segments.n)] if db is not None else None
    return das, dbs


def kernel_keeps(segments: Segments, adapters: MultiAdapters, seeds, x: torch.Tensor) -> list[torch.Tensor | None]:
    """The kernels' boolean keep mask of each segment (x_i alone, seed_i, p_i), for the PyTorch path standing in."""
    table = seed_table(seeds if adapters.has_dropout else None, adapters.n, x.device)
    return [keep("triton", table[i:i + 1], tuple(x[segments.rows_of(i)].shape), adapters.dropout_ps[i], x.device)
            for i in range(segments.n)]


def _check(x: torch.Tensor, adapters: MultiAdapters, segments: Segments, n_out: int, where: str) -> None:
    adapters.check(segments, x.shape[0], x.shape[1], n_out, where)


def forward_with(
    x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments, seeds, label: str, base_gemm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S by ``multi_lora_down``, then ``base_gemm(S, A_cat, B_cat, tables)`` → y with every segment's rank-r term; the
    PyTorch path (composed over ``base``) with the kernels' masks stands in when a kernel cannot run. Returns (y, S
    packed fp32)."""
    def fallback(keeps):
        y, s = multi_torch.composed_forward(x, base, adapters, segments, seeds, keeps=keeps)
        return y, s.float()

    if x.numel() == 0 or adapters.out_features == 0:
        return fallback(kernel_keeps(segments, adapters, seeds, x))

    def launch():
        t = tables(segments, adapters, seeds, x.device)
        s = multi_lora_down(x, adapters.A_cat(), t)
        return base_gemm(s, adapters.B_cat(), t), s

    return launch()  # a kernel that cannot run: the driver hands the call to the next path


def backward_with(
    dy: torch.Tensor, x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments, seeds, s: torch.Tensor,
    needs: tuple[bool, bool, bool, bool], label: str, base_dx,
) -> tuple:
    """One pass over dY (dS, dB, dbias), ``base_dx(dS, A_cat, tables)`` → dX with every segment's m_i ⊙ (dS_i A_i),
    dA; the PyTorch path with the kernels' masks stands in when a kernel cannot run. Returns (dX, [dA_i fp32],
    [dB_i fp32], dbias fp32 (n, N)), None where not needed."""
    need_dx, need_da, need_db, need_dbias = needs

    def fallback(keeps):
        return multi_torch.composed_backward(dy, x, base, adapters, segments, seeds, s, *needs, keeps=keeps)

    if x.numel() == 0 or dy.numel() == 0:
        return fallback(kernel_keeps(segments, adapters, seeds, x))

    def launch():
        t = tables(segments, adapters, seeds, x.device)
        A_cat = adapters.A_cat()
        dx = da = None
        ds, db, dbias = multi_lora_dy_pass(dy, adapters.B_cat(), s, t, need_dx or need_da, need_db, need_dbias)
        if need_dx:
            dx = base_dx(ds, A_cat, t)
        if need_da:
            da = multi_lora_da(ds, x, A_cat, t)
        das, dbs = _per_adapter(segments, da, db)
        return dx, das, dbs, dbias

    return launch()


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | list[int] | None, weight_layout: str, gemm: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense base (either layout), every adapter on its segment; ``bias``: the base's (an adapter's own bias replaces it
    on its rows). Returns (y M×N in x's dtype, S packed fp32). ``gemm``: "fused" (two launches: W read once for all
    segments) or "composed" (cuBLAS + two)."""
    n_out = weight.shape[0] if weight_layout == "linear" else weight.shape[1]
    _check(x, adapters, segments, n_out, "multi_triton.forward")
    base = DenseBase(weight, bias, weight_layout)
    if gemm == "composed":
        return composed_forward(x, base, adapters, segments, seeds)
    rows = bias_rows(bias, adapters)
    return forward_with(x, base, adapters, segments, seeds, f"fused-{weight_layout}",
                        lambda s, B_cat, t: multi_lora_forward(x, weight, rows, s, B_cat, t, weight_layout))


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | list[int] | None, s: torch.Tensor, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, gemm: str = "fused",
) -> tuple:
    """Dense base. At most three launches (plus cuBLAS's dY W when composed). Returns (dX in x's dtype, [dA_i] fp32,
    [dB_i] fp32, the per-segment Σ_rows dY fp32 (n, N)), None where not needed."""
    base = DenseBase(weight, None, weight_layout)
    needs = (need_dx, need_da, need_db, need_dbias)
    if gemm == "composed":
        return composed_backward(dy, x, base, adapters, segments, seeds, s, *needs)
    return backward_with(dy, x, base, adapters, segments, seeds, s, needs, f"fused-{weight_layout}",
                         lambda ds, A_cat, t: multi_lora_dx(dy, weight, ds, A_cat, t, weight_layout, x.dtype))


def composed_forward(
    x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments, seeds: torch.Tensor | list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) (the base's own GEMM: cuBLAS, bitsandbytes 4/8-bit; any object with ``forward``/``input_grad``, its
    bias in ``bias`` or ``layer.bias``) + every segment's rank-r term added in place, and an adapter's own bias in
    place of the base's (``multi_torch.base_output``: in a dense base's GEMM, else added with the rank-r term). The
    base's GEMM + 2 launches."""
    adapters.check(segments, x.shape[0], x.shape[1], adapters.out_features, "multi_triton.composed_forward")

    def base_gemm(s, B_cat, t):
        y, deltas = multi_torch.base_output(x, base, adapters, segments)
        return multi_lora_up_add(y, s, B_cat, t, deltas)

    return forward_with(x, base, adapters, segments, seeds, f"composed-{type(base).__name__}", base_gemm)


def composed_backward(
    dy: torch.Tensor, x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | list[int] | None, s: torch.Tensor,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple:
    """dX = the base's input gradient with every segment's m_i ⊙ (dS_i A_i) added in place; dA, dB, dbias as the fused
    path. The base's GEMM + 3 launches."""
    return backward_with(dy, x, base, adapters, segments, seeds, s, (need_dx, need_da, need_db, need_dbias),
                         f"composed-{type(base).__name__}",
                         lambda ds, A_cat, t: multi_lora_dx_add(base.input_grad(dy, x.dtype), ds, A_cat, t))


# ------------------------------------------------------------------- the passes (the multi variant's Triton paths)
# In the driver's pass form (``bases.Pass``): ``t.segments`` / ``t.adapters`` carry the batch's segments and the
# adapters, ``seed`` the int64 (n,) per-adapter seeds on the device; ``keep`` is unused (the kernels draw their masks).


def _fused_pass_forward(t: Operands, call: Call, seed, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(t.x, t.weight, t.bias, t.adapters, t.segments, seed, call.layout, "fused")


def _fused_pass_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                         keep=None) -> tuple:
    return backward(dy, t.x, t.weight, t.adapters, t.segments, seed, saved[0], call.layout, *needs, "fused")


def _base_of(t: Operands, call: Call):
    return t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)


def _composed_pass_forward(t: Operands, call: Call, seed, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    return composed_forward(t.x, _base_of(t, call), t.adapters, t.segments, seed)


def _composed_pass_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                            keep=None) -> tuple:
    return composed_backward(dy, t.x, _base_of(t, call), t.adapters, t.segments, seed, saved[0], *needs)


FUSED = Pass(_fused_pass_forward, _fused_pass_backward)  # the dense kind's multi-adapter fused path
COMPOSED = Pass(_composed_pass_forward, _composed_pass_backward)  # any base object's multi-adapter composed path
