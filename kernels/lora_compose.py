"""Kernels of the composed path: the base layer's GEMM is someone else's (cuBLAS, or a quantized layer's own
matmul), and the rank-r term is added in place into its result.

    lora_up_add_kernel:  y  += s · S Bᵀ          (forward; y holds base(x))
    lora_dx_add_kernel:  dX += m ⊙ (dS A)        (backward; dX holds the base layer's input gradient)

Each reads and writes its M×N (M×K) tile once, with the rank-r product computed in registers: no M×N
temporary, unlike ``result + lora_B(lora_A(x)) * scaling``. The fp32 result is rounded to the output dtype
once, as PEFT rounds its fp32-adapter sum once. S, dS and the forward/backward kernels of the rank-r branch
are ``lora_down_kernel``, ``lora_dy_kernel`` and ``lora_da_kernel``, shared with the fused path.

Both are autotuned on the output they add into: ``restore_value`` makes the autotuner copy it before each benchmark
run and put it back after (triton 3.6 and 3.9), so the first call of a key adds the term once, not once per benchmark
run besides (tests/test_autotune_first_call.py). The copy is made only while a new key is tuned.
"""

import triton
import triton.language as tl

from .configs import ADD_CONFIGS, CACHE_RESULTS, RUNTIME_VALUES, by_dtype
from .dropout import dropout_scale
from .indexing import index
from .rank_term import rank_r_tile


@triton.autotune(cache_results=CACHE_RESULTS, configs=ADD_CONFIGS, key=["M_BUCKET", "N", "R", "ARCH"], restore_value=["y_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("y_ptr", ADD_CONFIGS,
                                                                   kernel="lora_up_add_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_up_add_kernel(
    y_ptr, s_ptr, b_ptr,
    M, N, R, M_BUCKET,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br,
    scaling, ARCH,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[M, N] += scaling · S[M, R] B[N, R]ᵀ. Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    cols = index(tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    acc = rank_r_tile(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=row_ok & col_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=ADD_CONFIGS, key=["M_BUCKET", "K", "R", "ARCH"], restore_value=["dx_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("dx_ptr", ADD_CONFIGS,
                                                                    kernel="lora_dx_add_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_dx_add_kernel(
    dx_ptr, ds_ptr, a_ptr,
    M, K, R, M_BUCKET,
    stride_dxm, stride_dxk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    seed_ptr, p, drop_scale, ARCH,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dX[M, K] += m ⊙ (dS[M, R] A[R, K]), the mask regenerated from the seed. Grid: (cdiv(M, BLOCK_M),
    cdiv(K, BLOCK_N)); BLOCK_N is the tile width along K (the config names are shared with the forward)."""
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    k_start = tl.program_id(1) * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < K
    acc = rank_r_tile(ds_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(seed, rows, k_start, p, drop_scale, BLOCK_M, BLOCK_N)
    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
    dx = tl.load(dx_ptrs, mask=row_ok & col_ok, other=0.0)
    tl.store(dx_ptrs, (dx.to(tl.float32) + acc).to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)
