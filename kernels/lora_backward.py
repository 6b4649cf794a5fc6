"""Backward kernels. Given dY (M×N):

    lora_dy_kernel: one pass over dY → dS = s·dY B (M×R), dB = s·dYᵀ S (N×R), db = Σ_rows dY
    lora_dx_kernel: dX = dY W + m ⊙ (dS A), the rank-r term and the regenerated mask in the epilogue
    lora_da_kernel: dA = dSᵀ (m ⊙ x), the mask regenerated while x streams through

Reductions that cross programs (dB and db over row tiles; dS over SPLIT_N column slices; dA over
SPLIT_M row slices) use fp32 atomics into zeroed buffers. The split factors are the grids' third
dimension, chosen by the launcher to fill the GPU when M or R alone gives too few programs (tests force
them above 1 to cover that path); only "split or not" is a constexpr. Offsets as in ``lora_forward``.
Dtype constexprs as in ``lora_forward``.
"""

import triton
import triton.language as tl

from .configs import (
    CACHE_RESULTS,
    DA_CONFIGS_FP32_ADAPTERS,
    DX_CONFIGS,
    DY_CONFIGS_FP32,
    DY_CONFIGS_FP32_ADAPTERS,
    DY_CONFIGS_HALF_ADAPTERS,
    GEMM_CONFIGS_FP32,
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


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "N", "R", "ARCH"],
                 reset_to_zero=["ds_ptr", "db_ptr", "dbias_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", DY_CONFIGS_FP32,
                                                                   fp32_adapters=DY_CONFIGS_FP32_ADAPTERS,
                                                                   half_adapters=DY_CONFIGS_HALF_ADAPTERS,
                                                                   kernel="lora_dy_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, dbias_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    scaling, ARCH,
    DS_ATOMIC: tl.constexpr, HAS_DBIAS: tl.constexpr, NEED_DS: tl.constexpr, NEED_DB: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R), SPLIT_N). BLOCK_K is the tile width along N.

    The grid's third dimension splits the columns of dY into SPLIT_N interleaved slices (a runtime value,
    so a new split never compiles a new variant); ``DS_ATOMIC`` (SPLIT_N > 1) makes the dS write an atomic
    add. ds/db/dbias are fp32 and zeroed by the launcher (every write is an atomic add, except dS when one
    program owns it).

    Staggered columns: each row tile sweeps its column tiles starting at a different one (rotated by its row-tile
    index), so the (M/BLOCK_M)·N·R atomic adds into dB (and the dbias ones) spread over dB's columns instead of
    every row tile hitting the same column tile at the same time.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    split_n = tl.num_programs(2)
    BLOCK_N: tl.constexpr = BLOCK_K
    HALF_DY: tl.constexpr = dy_ptr.dtype.element_ty != tl.float32  # exact in TF32 (precision.py)
    rows = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    ranks = index(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    row_ok = rows[:, None] < M
    rank_ok = ranks[None, :] < R
    s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                mask=row_ok & rank_ok, other=0.0).to(LORA_DOT)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    my_tiles = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid_split, split_n)  # column tiles of this slice
    for i in range(0, my_tiles):
        n0 = (pid_split + ((i + pid_m) % my_tiles) * split_n) * BLOCK_N
        cols = index(n0 + tl.arange(0, BLOCK_N), WIDE)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok & col_ok[None, :], other=0.0)
        if NEED_DS:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=col_ok[:, None] & rank_ok, other=0.0)
            ds = dot_fp32(dy.to(LORA_DOT), b.to(LORA_DOT), ds, LORA_PREC, HALF_DY, False)
        if NEED_DB:
            db = dot_fp32(tl.trans(dy.to(LORA_DOT)), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), LORA_PREC,
                          HALF_DY, False)
            tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + ranks[None, :] * stride_dbr, scaling * db,
                          mask=col_ok[:, None] & rank_ok, sem="relaxed")
        if HAS_DBIAS:
            if pid_r == 0:
                tl.atomic_add(dbias_ptr + cols, tl.sum(dy.to(tl.float32), axis=0), mask=col_ok, sem="relaxed")
    if NEED_DS:
        ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, scaling * ds, mask=row_ok & rank_ok, sem="relaxed")
        else:
            tl.store(ds_ptrs, scaling * ds, mask=row_ok & rank_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=DX_CONFIGS, key=["M_BUCKET", "N", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", GEMM_CONFIGS_FP32,
                                                                   kernel="lora_dx_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wk, stride_wn, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    seed_ptr, p, drop_scale, ARCH,
    HAS_DROPOUT: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[M, K] = dY[M, N] W + m ⊙ (dS[M, R] A[R, K]).

    The output tile is BLOCK_M × BLOCK_N over (M, K) and the reduction runs over N in BLOCK_K steps
    (the config names are shared with the forward GEMM). Grid: (cdiv(M, BLOCK_M) · cdiv(K, BLOCK_N),).
    """
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rows = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    k_start = pid_k * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < K

    # Rank-r term and its dropout mask first, then the base GEMM accumulates on top: one accumulator
    # (see lora_fwd_kernel).
    acc = rank_r_tile(ds_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(seed, rows, k_start, p, drop_scale, BLOCK_M, BLOCK_N)
    for n0 in range(0, N, BLOCK_K):
        ns = index(n0 + tl.arange(0, BLOCK_K), WIDE)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok & (ns[None, :] < N), other=0.0)
        w = tl.load(w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=(ns[:, None] < N) & col_ok, other=0.0)
        acc = tl.dot(dy.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "K", "R", "LORA_DOT", "ARCH"],
                 reset_to_zero=["da_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", SKINNY_CONFIGS_FP32,
                                                                   fp32_adapters=DA_CONFIGS_FP32_ADAPTERS,
                                                                   kernel="lora_da_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_da_kernel(
    ds_ptr, x_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    seed_ptr, p, drop_scale, ARCH,
    DA_ATOMIC: tl.constexpr, HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[R, K] (fp32) = dS[M, R]ᵀ (m ⊙ x)[M, K]. Grid: (cdiv(K, BLOCK_K), cdiv(R, BLOCK_R), SPLIT_M).

    The grid's third dimension splits the rows into SPLIT_M interleaved slices (a runtime value);
    ``DA_ATOMIC`` (SPLIT_M > 1): partial sums are atomic adds into da, zeroed by the launcher.
    """
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    pid_split = tl.program_id(2)
    split_m = tl.num_programs(2)
    k_start = tl.program_id(0) * BLOCK_K
    cols = index(k_start + tl.arange(0, BLOCK_K), WIDE)
    ranks = index(tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    col_ok = cols[None, :] < K
    rank_ok = ranks[None, :] < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_split * BLOCK_M, M, split_m * BLOCK_M):
        rows = index(m0 + tl.arange(0, BLOCK_M), WIDE)
        row_ok = rows[:, None] < M
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
                     mask=row_ok & rank_ok, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok & col_ok, other=0.0)
        if HAS_DROPOUT:  # the 0/1 keep mask: x stays exact (dot_fp32), 1/(1-p) scales dA once below
            x = x.to(tl.float32) * dropout_scale(seed, rows, k_start, p, 1.0, BLOCK_M, BLOCK_K)
        acc = dot_fp32(tl.trans(ds.to(LORA_DOT)), x.to(LORA_DOT), acc, LORA_PREC, False,
                       x_ptr.dtype.element_ty != tl.float32)
    if HAS_DROPOUT:
        acc *= drop_scale
    da_ptrs = da_ptr + ranks[:, None] * stride_dar + cols[None, :] * stride_dak
    da_mask = (ranks[:, None] < R) & col_ok
    if DA_ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")
    else:
        tl.store(da_ptrs, acc, mask=da_mask)
