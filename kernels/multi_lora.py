"""Several LoRA adapters on one frozen base in one pass (``fused_lora/segments.py``): the batch's rows come in contiguous
segments, segment i belonging to adapter i (rank r_i, scaling s_i, dropout p_i and seed_i, optionally its own bias).
The single-adapter kernels (lora_forward.py, lora_backward.py, lora_compose.py) with each row tile taking its own
segment's adapter:

    multi_lora_down_kernel:    S_i = dropout_i(x_i) A_iᵀ                     (packed, fp32)
    multi_lora_fwd_kernel:     y_i = x_i Wᵀ + b(_i) + s_i·S_i B_iᵀ           (W read once for all segments)
    multi_lora_up_add_kernel:  y_i += s_i·S_i B_iᵀ (+ own bias − base bias)  (composed path, in place)
    multi_lora_dy_kernel:      dS_i = s_i·dY_i B_i, dB_i = s_i·dY_iᵀ S_i, Σ_rows dY_i, one pass over dY
    multi_lora_dx_kernel:      dX_i = dY_i W + m_i ⊙ (dS_i A_i)
    multi_lora_dx_add_kernel:  dX_i += m_i ⊙ (dS_i A_i)                     (composed path, in place)
    multi_lora_da_kernel:      dA_i = dS_iᵀ (m_i ⊙ x_i)

Row tiles never straddle segments: segment i owns cdiv(len_i, BLOCK_M) row tiles, numbered after the tiles of the
segments before it, and a program finds its (segment, tile) from the row starts (``segment_tile``). The grids take
cdiv(M, BLOCK_M) + n row tiles, a bound on Σ cdiv(len_i, BLOCK_M) for any BLOCK_M, so the autotuner may pick any tile
height; the spare programs return at once. A segment's tiles are those of x_i alone, its rows numbered from 0
(``local``), so each adapter's dropout mask is the single-adapter kernels' for x_i and seed_i, and its tiles sum in the
same order.

Adapters come concatenated with each rank padded to a multiple of 4 (``segments.padded_rank``; zero rows and columns):
A_cat = cat(A_i) (R_tot×K), B_cat = cat(B_i, dim=1) (N×R_tot), dA and dB likewise; S and dS packed, segment after
segment, each row-major len_i×rp_i. The kernels take each adapter's padded rank as its rank (the padding computes exact
zeros) and tell the compiler it, its first rank and its S offset are multiples of 4, so that rank masks and S rows load
as 128-bit vectors (``segments.RANK_ALIGN`` has the measurement). The tables (``seg_ptr``: int64 (3, n+1) row starts,
rank offsets, S offsets; ``scal_ptr``: fp32 (3, n) scaling, p, 1/(1-p); ``seed_ptr``: int64 (n,)) are
``Segments.table`` / ``MultiAdapters.scalar_table`` / ``segments.seed_table``. Every rank-r loop runs in BLOCK_R chunks
over the tile's own r_i (masked: ranks 1, 2, 3 take one 16-wide chunk); BLOCK_R follows the largest rank (``R_MAX``,
an autotune key). Dropout (``HAS_DROPOUT``: any p_i > 0) regenerates each segment's mask with its own seed and p
(p_i = 0 keeps everything, scale 1). Offsets, dtype constexprs, autotuning and the in-place/atomic protections as the
single-adapter kernels.
"""

import triton
import triton.language as tl

from .configs import (
    ADD_CONFIGS,
    CACHE_RESULTS,
    DA_CONFIGS_FP32_ADAPTERS,
    DOWN_CONFIGS_FP32_ADAPTERS,
    DOWN_CONFIGS_HALF_ADAPTERS,
    DX_CONFIGS,
    DY_CONFIGS_FP32,
    DY_CONFIGS_FP32_ADAPTERS,
    GEMM_CONFIGS,
    GEMM_CONFIGS_FP32,
    MULTI_DY_CONFIGS_HALF_ADAPTERS,
    MULTI_GEMM_CONFIGS_FP32,
    RUNTIME_VALUES,
    SKINNY_CONFIGS,
    SKINNY_CONFIGS_FP32,
    SKINNY_CONFIGS_TURING,
    by_dtype,
)
from .dropout import dropout_scale
from .indexing import index
from .lora_forward import grouped_tile
from .precision import dot_fp32
from .rank_term import rank_r_tile

# The segment count and the largest rank change with the batch and the adapter set: not specialized (a new count never
# compiles a new variant). R_MAX is only an autotune key (BLOCK_R is the launcher's constexpr).
SEGMENT_RUNTIME_VALUES = RUNTIME_VALUES + ["n_seg", "R_MAX"]
# Segments scanned per step of ``segment_tile``'s search (any count works: it loops).
_SEG_CHUNK: tl.constexpr = tl.constexpr(64)
# Every adapter's ranks are padded to a multiple of this (fused_lora.segments.RANK_ALIGN).
_RANK_ALIGN: tl.constexpr = tl.constexpr(4)


@triton.jit
def segment_tile(t, seg_ptr, n_seg, BLOCK_M: tl.constexpr):
    """(segment, tile within the segment) of row tile ``t``: segment i owns cdiv(len_i, BLOCK_M) tiles, numbered after
    the tiles of the segments before it (an empty segment owns none). The segment is ``n_seg`` for a ``t`` past the
    last tile. ``seg_ptr``: the row starts (n_seg + 1, int64)."""
    seg = t * 0
    before = t * 0  # tiles of the segments wholly before t
    base = t * 0  # tiles of the segments of earlier chunks
    for c0 in range(0, n_seg, _SEG_CHUNK):
        idx = c0 + tl.arange(0, _SEG_CHUNK)
        ok = idx < n_seg
        lo = tl.load(seg_ptr + idx, mask=ok, other=0)
        hi = tl.load(seg_ptr + idx + 1, mask=ok, other=0)
        tiles = ((hi - lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        done = ((base + tl.cumsum(tiles, 0)) <= t) & ok
        seg += tl.sum(done.to(tl.int32), 0)
        before += tl.sum(tl.where(done, tiles, 0), 0)
        base += tl.sum(tiles, 0)
    return seg, t - before


@triton.jit
def segment_rows(seg_ptr, seg, tile, BLOCK_M: tl.constexpr):
    """(the segment's first row in x, its length, the tile's rows numbered within the segment) as int64, int32, int32."""
    start = tl.load(seg_ptr + seg)
    length = (tl.load(seg_ptr + seg + 1) - start).to(tl.int32)
    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return start, length, local


@triton.jit
def segment_ranks(seg_ptr, seg, n_seg):
    """(the adapter's first rank in A_cat/B_cat, int64; its padded rank r (also its S's row stride), int32; its S's
    offset in the packed S, int64), each a multiple of ``_RANK_ALIGN``, which the compiler is told."""
    r_lo = tl.multiple_of(tl.load(seg_ptr + (n_seg + 1) + seg), _RANK_ALIGN)
    r = tl.multiple_of((tl.load(seg_ptr + (n_seg + 1) + seg + 1) - r_lo).to(tl.int32), _RANK_ALIGN)
    s_off = tl.multiple_of(tl.load(seg_ptr + 2 * (n_seg + 1) + seg), _RANK_ALIGN)
    return r_lo, r, s_off


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "K", "R_MAX", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", SKINNY_CONFIGS_FP32,
                                                                   fp32_adapters=DOWN_CONFIGS_FP32_ADAPTERS,
                                                                   half_adapters=DOWN_CONFIGS_HALF_ADAPTERS,
                                                                   kernel="multi_lora_down_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_down_kernel(
    x_ptr, a_ptr, s_ptr, seg_ptr, scal_ptr, seed_ptr,
    M, K, n_seg, R_MAX, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ss, ARCH,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S_i (packed, fp32) = (m_i ⊙ x_i) A_iᵀ. Grid: (cdiv(M, BLOCK_M) + n_seg, cdiv(R_MAX, BLOCK_R), SPLIT_K); split-K
    slices write to ``s_ptr + k·stride_ss``, summed by the launcher (lora_down_kernel)."""
    seg, tile = segment_tile(tl.program_id(0), seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= r:  # a rank chunk past this adapter's rank
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    rows = index(start + local, WIDE)
    ranks = index(r0 + tl.arange(0, BLOCK_R), WIDE)
    row_ok = local[:, None] < length
    rank_ok = ranks[None, :] < r
    a_seg = a_ptr + r_lo * stride_ar
    pid_k = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + seg)
        p = tl.load(scal_ptr + n_seg + seg)
    for k0 in range(pid_k * BLOCK_K, K, tl.num_programs(2) * BLOCK_K):
        cols = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok & (cols[None, :] < K), other=0.0)
        if HAS_DROPOUT:  # the 0/1 keep mask of x_i alone (rows numbered within the segment); 1/(1-p) scales S below
            x = x.to(tl.float32) * dropout_scale(seed, local, k0, p, 1.0, BLOCK_M, BLOCK_K)
        a_t = tl.load(a_seg + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=rank_ok & (cols[:, None] < K), other=0.0)
        acc = dot_fp32(x.to(LORA_DOT), a_t.to(LORA_DOT), acc, LORA_PREC, x_ptr.dtype.element_ty != tl.float32, False)
    if HAS_DROPOUT:
        acc *= tl.load(scal_ptr + 2 * n_seg + seg)
    tl.store(s_ptr + index(pid_k, WIDE) * stride_ss + s_off + local[:, None] * r + ranks[None, :], acc,
             mask=row_ok & rank_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R_MAX", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", MULTI_GEMM_CONFIGS_FP32,
                                                                   kernel="multi_lora_fwd_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, seg_ptr, scal_ptr,
    M, N, K, n_seg, R_MAX, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_bn, stride_br, stride_ym, stride_yn,
    stride_bias_seg, stride_bias, ARCH,
    HAS_BIAS: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y_i = x_i Wᵀ + bias[i] + s_i · S_i B_iᵀ: the base GEMM over all rows, each row tile's own adapter in its
    accumulator. ``bias_ptr``: (n_seg, N), row i the bias of segment i (``segments.bias_rows``). W through
    (stride_wk, stride_wn): "linear" N×K or "conv1d" K×N. Grid: ((cdiv(M, BLOCK_M) + n_seg) · cdiv(N, BLOCK_N),)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M) + n_seg, tl.cdiv(N, BLOCK_N), GROUP_M)
    seg, tile = segment_tile(pid_m, seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    # 64-bit rows and columns in both variants, as lora_fwd_kernel; WIDE widens the loop's K offsets.
    rows = start + local.to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = local[:, None] < length
    col_ok = cols[None, :] < N

    # The rank-r term first, then the base GEMM on top: one accumulator (lora_fwd_kernel).
    acc = rank_r_tile(s_ptr + s_off, b_ptr + r_lo * stride_br, local, cols, row_ok, col_ok, r, r, 1, stride_br,
                      stride_bn, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc *= tl.load(scal_ptr + seg)
    for k0 in range(0, K, BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & col_ok, other=0.0)
        acc = tl.dot(x.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + seg * stride_bias_seg + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=ADD_CONFIGS, key=["M_BUCKET", "N", "R_MAX", "ARCH"], restore_value=["y_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("y_ptr", ADD_CONFIGS,
                                                                   kernel="multi_lora_up_add_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_up_add_kernel(
    y_ptr, s_ptr, b_ptr, delta_ptr, seg_ptr, scal_ptr,
    M, N, n_seg, R_MAX, M_BUCKET,
    stride_ym, stride_yn, stride_bn, stride_br, stride_delta_seg, ARCH,
    HAS_DELTA: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y_i += s_i · S_i B_iᵀ (+ delta[i]) in place, y holding base(x) (the base bias in it). ``delta_ptr``: fp32
    (n_seg, N), an adapter's own bias minus the base's (``segments.bias_deltas``). Grid: (cdiv(M, BLOCK_M) + n_seg,
    cdiv(N, BLOCK_N))."""
    seg, tile = segment_tile(tl.program_id(0), seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    rows = index(start + local, WIDE)
    cols = index(tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    row_ok = local[:, None] < length
    col_ok = cols[None, :] < N
    acc = rank_r_tile(s_ptr + s_off, b_ptr + r_lo * stride_br, local, cols, row_ok, col_ok, r, r, 1, stride_br,
                      stride_bn, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc *= tl.load(scal_ptr + seg)
    if HAS_DELTA:
        acc += tl.load(delta_ptr + seg * stride_delta_seg + cols, mask=cols < N, other=0.0)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=row_ok & col_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "N", "R_MAX", "ARCH"],
                 reset_to_zero=["ds_ptr", "db_ptr", "dbias_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", DY_CONFIGS_FP32,
                                                                   fp32_adapters=DY_CONFIGS_FP32_ADAPTERS,
                                                                   half_adapters=MULTI_DY_CONFIGS_HALF_ADAPTERS,
                                                                   kernel="multi_lora_dy_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, dbias_ptr, seg_ptr, scal_ptr,
    M, N, n_seg, R_MAX, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_dbn, stride_dbr, stride_dbias_seg, ARCH,
    DS_ATOMIC: tl.constexpr, HAS_DBIAS: tl.constexpr, NEED_DS: tl.constexpr, NEED_DB: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One pass over dY: dS_i (packed like S) = s_i·dY_i B_i, dB_cat[:, adapter i's ranks] = s_i·dY_iᵀ S_i, dbias[i] =
    Σ_rows dY_i ((n_seg, N)). Grid: (cdiv(M, BLOCK_M) + n_seg, cdiv(R_MAX, BLOCK_R), SPLIT_N); split, staggered
    columns and atomics as lora_dy_kernel (ds, db, dbias fp32, zeroed by the launcher)."""
    pid_m = tl.program_id(0)
    seg, tile = segment_tile(pid_m, seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    pid_r = tl.program_id(1)
    if pid_r * BLOCK_R >= r:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    pid_split = tl.program_id(2)
    split_n = tl.num_programs(2)
    BLOCK_N: tl.constexpr = BLOCK_K
    HALF_DY: tl.constexpr = dy_ptr.dtype.element_ty != tl.float32  # exact in TF32 (precision.py)
    scaling = tl.load(scal_ptr + seg)
    rows = index(start + local, WIDE)
    ranks = index(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    row_ok = local[:, None] < length
    rank_ok = ranks[None, :] < r
    s_tile = s_ptr + s_off + local[:, None] * r + ranks[None, :]  # S_i's (and dS_i's) elements of this tile
    s = tl.load(s_tile, mask=row_ok & rank_ok, other=0.0).to(LORA_DOT)
    b_seg = b_ptr + r_lo * stride_br
    db_seg = db_ptr + r_lo * stride_dbr
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    my_tiles = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid_split, split_n)  # column tiles of this slice
    for i in range(0, my_tiles):
        n0 = (pid_split + ((i + pid_m) % my_tiles) * split_n) * BLOCK_N
        cols = index(n0 + tl.arange(0, BLOCK_N), WIDE)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok & col_ok[None, :], other=0.0)
        if NEED_DS:
            b = tl.load(b_seg + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=col_ok[:, None] & rank_ok, other=0.0)
            ds = dot_fp32(dy.to(LORA_DOT), b.to(LORA_DOT), ds, LORA_PREC, HALF_DY, False)
        if NEED_DB:
            db = dot_fp32(tl.trans(dy.to(LORA_DOT)), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), LORA_PREC,
                          HALF_DY, False)
            tl.atomic_add(db_seg + cols[:, None] * stride_dbn + ranks[None, :] * stride_dbr, scaling * db,
                          mask=col_ok[:, None] & rank_ok, sem="relaxed")
        if HAS_DBIAS:
            if pid_r == 0:
                tl.atomic_add(dbias_ptr + seg * stride_dbias_seg + cols, tl.sum(dy.to(tl.float32), axis=0),
                              mask=col_ok, sem="relaxed")
    if NEED_DS:
        ds_ptrs = ds_ptr + s_off + local[:, None] * r + ranks[None, :]
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, scaling * ds, mask=row_ok & rank_ok, sem="relaxed")
        else:
            tl.store(ds_ptrs, scaling * ds, mask=row_ok & rank_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=DX_CONFIGS, key=["M_BUCKET", "N", "K", "R_MAX", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", GEMM_CONFIGS_FP32,
                                                                   kernel="multi_lora_dx_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seg_ptr, scal_ptr, seed_ptr,
    M, N, K, n_seg, R_MAX, M_BUCKET,
    stride_dym, stride_dyn, stride_wk, stride_wn, stride_ar, stride_ak, stride_dxm, stride_dxk, ARCH,
    HAS_DROPOUT: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX_i = dY_i W + m_i ⊙ (dS_i A_i). Output tiles BLOCK_M × BLOCK_N over (M, K), the reduction over N in BLOCK_K
    steps (lora_dx_kernel). Grid: ((cdiv(M, BLOCK_M) + n_seg) · cdiv(K, BLOCK_N),)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M) + n_seg, tl.cdiv(K, BLOCK_N), GROUP_M)
    seg, tile = segment_tile(pid_m, seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    rows = index(start + local, WIDE)
    k_start = pid_k * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = local[:, None] < length
    col_ok = cols[None, :] < K

    # The rank-r term and the segment's dropout mask first, then the base GEMM on top (lora_dx_kernel).
    acc = rank_r_tile(ds_ptr + s_off, a_ptr + r_lo * stride_ar, local, cols, row_ok, col_ok, r, r, 1, stride_ar,
                      stride_ak, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(tl.load(seed_ptr + seg), local, k_start, tl.load(scal_ptr + n_seg + seg),
                             tl.load(scal_ptr + 2 * n_seg + seg), BLOCK_M, BLOCK_N)
    for n0 in range(0, N, BLOCK_K):
        ns = index(n0 + tl.arange(0, BLOCK_K), WIDE)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok & (ns[None, :] < N), other=0.0)
        w = tl.load(w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=(ns[:, None] < N) & col_ok, other=0.0)
        acc = tl.dot(dy.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=ADD_CONFIGS, key=["M_BUCKET", "K", "R_MAX", "ARCH"], restore_value=["dx_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("dx_ptr", ADD_CONFIGS,
                                                                   kernel="multi_lora_dx_add_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_dx_add_kernel(
    dx_ptr, ds_ptr, a_ptr, seg_ptr, scal_ptr, seed_ptr,
    M, K, n_seg, R_MAX, M_BUCKET,
    stride_dxm, stride_dxk, stride_ar, stride_ak, ARCH,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dX_i += m_i ⊙ (dS_i A_i) in place (dX: the base layer's input gradient). Grid: (cdiv(M, BLOCK_M) + n_seg,
    cdiv(K, BLOCK_N)); BLOCK_N is the tile width along K."""
    seg, tile = segment_tile(tl.program_id(0), seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    rows = index(start + local, WIDE)
    k_start = tl.program_id(1) * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = local[:, None] < length
    col_ok = cols[None, :] < K
    acc = rank_r_tile(ds_ptr + s_off, a_ptr + r_lo * stride_ar, local, cols, row_ok, col_ok, r, r, 1, stride_ar,
                      stride_ak, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(tl.load(seed_ptr + seg), local, k_start, tl.load(scal_ptr + n_seg + seg),
                             tl.load(scal_ptr + 2 * n_seg + seg), BLOCK_M, BLOCK_N)
    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
    dx = tl.load(dx_ptrs, mask=row_ok & col_ok, other=0.0)
    tl.store(dx_ptrs, (dx.to(tl.float32) + acc).to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "K", "R_MAX", "LORA_DOT", "ARCH"],
                 reset_to_zero=["da_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", SKINNY_CONFIGS_FP32,
                                                                   fp32_adapters=DA_CONFIGS_FP32_ADAPTERS,
                                                                   kernel="multi_lora_da_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_da_kernel(
    ds_ptr, x_ptr, da_ptr, seg_ptr, scal_ptr, seed_ptr,
    M, K, n_seg, R_MAX, M_BUCKET,
    stride_xm, stride_xk, stride_dar, stride_dak, ARCH,
    DA_ATOMIC: tl.constexpr, HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA_cat[adapter i's ranks] (fp32) = dS_iᵀ (m_i ⊙ x_i). Grid: (n_seg · cdiv(K, BLOCK_K), cdiv(R_MAX, BLOCK_R),
    SPLIT_M): a program per (segment, column tile, rank chunk, row slice) sweeps its segment's rows; ``DA_ATOMIC``
    (SPLIT_M > 1): partial sums are atomic adds into da, zeroed by the launcher (lora_da_kernel). An empty segment's
    programs store zeros."""
    num_k = tl.cdiv(K, BLOCK_K)
    seg = tl.program_id(0) // num_k
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    pid_r = tl.program_id(1)
    if pid_r * BLOCK_R >= r:
        return
    start = tl.load(seg_ptr + seg)
    length = (tl.load(seg_ptr + seg + 1) - start).to(tl.int32)
    pid_split = tl.program_id(2)
    split_m = tl.num_programs(2)
    k_start = (tl.program_id(0) % num_k) * BLOCK_K
    cols = index(k_start + tl.arange(0, BLOCK_K), WIDE)
    ranks = index(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    col_ok = cols[None, :] < K
    rank_ok = ranks[None, :] < r
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + seg)
        p = tl.load(scal_ptr + n_seg + seg)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_split * BLOCK_M, length, split_m * BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        rows = index(start + local, WIDE)
        row_ok = local[:, None] < length
        ds = tl.load(ds_ptr + s_off + local[:, None] * r + ranks[None, :], mask=row_ok & rank_ok, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=row_ok & col_ok, other=0.0)
        if HAS_DROPOUT:  # the 0/1 keep mask: x stays exact (dot_fp32), 1/(1-p) scales dA once below
            x = x.to(tl.float32) * dropout_scale(seed, local, k_start, p, 1.0, BLOCK_M, BLOCK_K)
        acc = dot_fp32(tl.trans(ds.to(LORA_DOT)), x.to(LORA_DOT), acc, LORA_PREC, False,
                       x_ptr.dtype.element_ty != tl.float32)
    if HAS_DROPOUT:
        acc *= tl.load(scal_ptr + 2 * n_seg + seg)
    da_ptrs = da_ptr + (r_lo + ranks)[:, None] * stride_dar + cols[None, :] * stride_dak
    da_mask = (ranks[:, None] < r) & col_ok
    if DA_ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")
    else:
        tl.store(da_ptrs, acc, mask=da_mask)
