"""Forward kernels: S = dropout(x) Aᵀ, then y = x Wᵀ + b + s·S Bᵀ with the rank-r term folded into
the base GEMM's fp32 accumulator (one write of y, no M×N temporary).

Offsets are int32, or int64 in the ``WIDE`` variant a launch that reaches past 2³¹ elements compiles
(``indexing.index``). The runtime values that change from call to call (M, the M bucket) are not specialized by
the JIT (``configs.RUNTIME_VALUES``), so a new batch length never compiles a new variant; the dropout seed is read
from device memory (``seed_ptr``, one int64), so a captured CUDA graph draws a new one at each replay.

Dtype handling is passed in as constexprs chosen by the launcher:
- ``BASE_DOT`` / ``LORA_DOT``: the dtype each operand is cast to right before ``tl.dot`` (x's dtype
  for the base GEMM, the adapters' dtype for the rank-r GEMMs, as PyTorch/PEFT compute them). Under
  the interpreter half types map to fp32 (it computes bf16 dots on the bit patterns, triton#11584): the products of
  two half values are exact in fp32, so this is what a tensor core computes, not an approximation.
- ``*_PREC``: ``"tf32x3"`` or ``"tf32"`` for fp32 operands, following ``torch.backends.cuda.matmul.allow_tf32``
  (``precision.dot_fp32``: 3xTF32, or two TF32 products when one operand is an upcast half value).
"""

import triton
import triton.language as tl

from .configs import (
    CACHE_RESULTS,
    DOWN_CONFIGS_FP32_ADAPTERS,
    DOWN_CONFIGS_HALF_ADAPTERS,
    GEMM_CONFIGS,
    GEMM_CONFIGS_FP32,
    RUNTIME_VALUES,
    SKINNY_CONFIGS,
    SKINNY_CONFIGS_FP32,
    SKINNY_CONFIGS_TURING,
    by_dtype,
)
from .dropout import dropout_scale
from .indexing import index
from .precision import dot_fp32
from .rank_term import rank_r_tile


@triton.autotune(cache_results=CACHE_RESULTS, configs=SKINNY_CONFIGS, key=["M_BUCKET", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", SKINNY_CONFIGS_FP32,
                                                                   fp32_adapters=DOWN_CONFIGS_FP32_ADAPTERS,
                                                                   half_adapters=DOWN_CONFIGS_HALF_ADAPTERS,
                                                                   kernel="lora_down_kernel",
                                                                   turing=SKINNY_CONFIGS_TURING)})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_down_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_ss,
    seed_ptr, p, drop_scale, ARCH,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[M, R] (fp32) = (m ⊙ x)[M, K] @ A[R, K]ᵀ. Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R), SPLIT_K).

    Split-K: when the row tiles alone leave SMs idle (M = 2048 tokens is 32 programs of 64 rows on a 132-SM
    H100), the grid's third dimension splits K into SPLIT_K interleaved slices; slice k writes its partial S to
    ``s_ptr + k·stride_ss`` and the launcher sums the slices (a fixed order: S stays bitwise reproducible, which
    atomics would not). SPLIT_K = 1 writes S itself.
    """
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    ranks = index(tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    pid_k = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, tl.num_programs(2) * BLOCK_K):
        cols = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if HAS_DROPOUT:  # the 0/1 keep mask: x stays exact (dot_fp32), 1/(1-p) scales S once below
            x = x.to(tl.float32) * dropout_scale(seed, rows, k0, p, 1.0, BLOCK_M, BLOCK_K)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc = dot_fp32(x.to(LORA_DOT), a_t.to(LORA_DOT), acc, LORA_PREC, x_ptr.dtype.element_ty != tl.float32, False)
    if HAS_DROPOUT:
        acc *= drop_scale
    tl.store(s_ptr + index(pid_k, WIDE) * stride_ss + rows[:, None] * stride_sm + ranks[None, :] * stride_sr, acc,
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile (m, n) of program ``pid`` in grouped order: GROUP_M row-tiles share each column sweep, so
    the weight tiles they read stay in L2 (Triton matmul tutorial)."""
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.autotune(cache_results=CACHE_RESULTS, configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", GEMM_CONFIGS_FP32,
                                                                   kernel="lora_fwd_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_bias,
    scaling, ARCH,
    HAS_BIAS: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] Wᵀ + bias + scaling · S[M, R] B[N, R]ᵀ.

    W is read through (stride_wk, stride_wn) so both nn.Linear (N×K) and Conv1D (K×N) weights are
    used in place. Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # Row and column offsets are 64-bit in both variants (int32 ones made the 8-warp 128×128 tile spill 16 B on
    # sm_80 with fp32 adapters, bench/compile_report.py); WIDE widens the loop's K offsets.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N

    # The rank-r term goes into the accumulator first, then the base GEMM accumulates on top: one fp32
    # BLOCK_M×BLOCK_N accumulator instead of two. (Two spilled 856 B of stack per thread at 128×256,
    # 8 warps, on sm_90: bench/compile_report.py.)
    acc = rank_r_tile(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc *= scaling
    for k0 in range(0, K, BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & col_ok, other=0.0)
        acc = tl.dot(x.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)
