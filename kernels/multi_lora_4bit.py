"""Several LoRA adapters on one bitsandbytes 4-bit base (multi_lora.py's segments, lora_4bit.py's storage): the two base
GEMMs with W read once from its 4-bit storage and dequantized in registers for all segments, each row tile's own
adapter in the accumulator.

    multi_lora_fwd_4bit_kernel:  y_i  = x_i Wᵀ + b(_i) + s_i·S_i B_iᵀ      (lora_fwd_4bit_kernel, segmented)
    multi_lora_dx_4bit_kernel:   dX_i = dY_i W + m_i ⊙ (dS_i A_i)          (lora_dx_4bit_kernel, segmented)

The W tile loader, its rounding and the config pruning are lora_4bit.py's own (``load_w4_tile``, ``as_operand``,
``round_rn``, ``prune_4bit``); the segment search, packed S/dS and tables are multi_lora.py's. S, dS, dA and dB come from the
dense multi-adapter kernels: only these two read W.
"""

import triton
import triton.language as tl

from .configs import CACHE_RESULTS, MULTI_Q4_GEMM_CONFIGS, Q4_GEMM_CONFIGS
from .dropout import dropout_scale
from .indexing import index
from .lora_4bit import as_operand, load_w4_tile, prune_4bit, round_rn
from .lora_forward import grouped_tile
from .multi_lora import SEGMENT_RUNTIME_VALUES, segment_ranks, segment_rows, segment_tile
from .precision import dot_fp32
from .rank_term import rank_r_tile


@triton.autotune(cache_results=CACHE_RESULTS, configs=MULTI_Q4_GEMM_CONFIGS,
                 key=["M_BUCKET", "N", "K", "R_MAX", "NESTED", "QBLOCK_LOG2", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_4bit("x_ptr", "multi_lora_fwd_4bit_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_fwd_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    seg_ptr, scal_ptr,
    M, N, K, n_seg, R_MAX, M_BUCKET,
    stride_xm, stride_xk, stride_bn, stride_br, stride_ym, stride_yn, stride_bias_seg, stride_bias, ARCH,
    HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, NESTED: tl.constexpr, QBLOCK_LOG2: tl.constexpr,
    QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y_i = x_i Wᵀ + bias[i] + s_i · S_i B_iᵀ, W (N×K) from its 4-bit storage. ``bias_ptr``: (n_seg, N), row i the
    bias of segment i. Grid: ((cdiv(M, BLOCK_M) + n_seg) · cdiv(N, BLOCK_N),)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M) + n_seg, tl.cdiv(N, BLOCK_N), GROUP_M)
    seg, tile = segment_tile(pid_m, seg_ptr, n_seg, BLOCK_M)
    if seg >= n_seg:
        return
    start, length, local = segment_rows(seg_ptr, seg, tile, BLOCK_M)
    r_lo, r, s_off = segment_ranks(seg_ptr, seg, n_seg)
    rows = index(start + local, WIDE)
    cols = index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    row_ok = local[:, None] < length
    col_ok = cols[None, :] < N

    acc = rank_r_tile(s_ptr + s_off, b_ptr + r_lo * stride_br, local, cols, row_ok, col_ok, r, r, 1, stride_br,
                      stride_bn, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc *= tl.load(scal_ptr + seg)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    code = tl.load(code_ptr + tl.arange(0, 16))
    for k0 in range(0, K, BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok & (ks[None, :] < K), other=0.0)
        w = load_w4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code, cols, k0, N, K,
                         BLOCK_K, True, W_DTYPE, NESTED, QBLOCK_LOG2, QBLOCK2_LOG2, ALIGNED)
        acc = dot_fp32(x.to(BASE_DOT), as_operand(w, W_DTYPE, X_DTYPE, BASE_DOT), acc, BASE_PREC, False,
                       W_DTYPE != tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + seg * stride_bias_seg + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             round_rn(acc, y_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=Q4_GEMM_CONFIGS,
                 key=["M_BUCKET", "N", "K", "R_MAX", "NESTED", "QBLOCK_LOG2", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_4bit("dy_ptr", "multi_lora_dx_4bit_kernel")})
@triton.jit(do_not_specialize=SEGMENT_RUNTIME_VALUES)
def multi_lora_dx_4bit_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, ds_ptr, a_ptr, dx_ptr,
    seg_ptr, scal_ptr, seed_ptr,
    M, N, K, n_seg, R_MAX, M_BUCKET,
    stride_dym, stride_dyn, stride_ar, stride_ak, stride_dxm, stride_dxk, ARCH,
    HAS_DROPOUT: tl.constexpr, W_DTYPE: tl.constexpr, NESTED: tl.constexpr, QBLOCK_LOG2: tl.constexpr,
    QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX_i = dY_i W + m_i ⊙ (dS_i A_i), W (N×K) from its 4-bit storage; output tiles over (M, K), the reduction over
    N in BLOCK_K steps. Grid: ((cdiv(M, BLOCK_M) + n_seg) · cdiv(K, BLOCK_N),)."""
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

    acc = rank_r_tile(ds_ptr + s_off, a_ptr + r_lo * stride_ar, local, cols, row_ok, col_ok, r, r, 1, stride_ar,
                      stride_ak, LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(tl.load(seed_ptr + seg), local, k_start, tl.load(scal_ptr + n_seg + seg),
                             tl.load(scal_ptr + 2 * n_seg + seg), BLOCK_M, BLOCK_N)
    DY_DTYPE: tl.constexpr = dy_ptr.dtype.element_ty
    code = tl.load(code_ptr + tl.arange(0, 16))
    for n0 in range(0, N, BLOCK_K):
        ns = index(n0 + tl.arange(0, BLOCK_K), WIDE)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok & (ns[None, :] < N), other=0.0)
        w = load_w4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code, ns, index(k_start, WIDE), N, K,
                         BLOCK_N, False, W_DTYPE, NESTED, QBLOCK_LOG2, QBLOCK2_LOG2, ALIGNED)
        acc = dot_fp32(dy.to(BASE_DOT), as_operand(w, W_DTYPE, DY_DTYPE, BASE_DOT), acc, BASE_PREC, False,
                       W_DTYPE != tl.float32)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             round_rn(acc, dx_ptr.dtype.element_ty), mask=row_ok & col_ok)
