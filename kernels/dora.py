"""DoRA kernels (weight-decomposed low-rank adaptation, PEFT's ``use_dora=True``):

    y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,     g = magnitude / ‖W + s·B A‖  (row norm, per output)

g is a constant in backward (PEFT and the paper detach the norm). With P = x_d Wᵀ + s·S Bᵀ (S = x_d Aᵀ) the output is
``y = g ⊙ P + b`` when p = 0 (x_d = x), and ``y = (x − x_d) Wᵀ + g ⊙ P + b`` when p > 0: both are epilogues of the
base GEMM's accumulator(s). P is written out for the magnitude's gradient, d magnitude = Σ_rows dY ⊙ P / ‖·‖
(an M×N product: saving it costs one M×N write and read, recomputing it would be a second base GEMM in backward),
and only when the magnitude trains (``WRITE_P``).

Forward, 3 launches:
    ``dora_norm_kernel``  ‖W + s·B A‖ per row: each W tile plus its rank-r correction B_tile A_tile, squared and
                          summed in fp32 registers, B A never in memory, then the IEEE root (tl.sqrt_rn); a K split's
                          partial sums stored apart, summed and rooted by the launcher in a fixed order
    ``lora_down_kernel``  S = x Aᵀ (p = 0: LoRA's kernel), or
    ``dora_down_kernel``  S = x_d Aᵀ and x_d = keep ⊙ x written out (p > 0), for the forward GEMM's second operand
    ``dora_fwd_kernel``   P and y, g = magnitude/‖·‖ in the epilogue; with p > 0 each W tile feeds two accumulators
                          (x Wᵀ and x_d Wᵀ): one pass over W, not two GEMMs
Backward, 3 launches:
    ``dora_dy_kernel``    one pass over dY: dS = s·(g⊙dY) B, dB = s·(g⊙dY)ᵀ S, db = Σ dY, d magnitude = Σ dY⊙P / ‖·‖
                          (the column reduction rides on the dY tiles this pass reads anyway), and G for dX:
                          g⊙dY (p = 0) or (g − 1)⊙dY (p > 0), written in dY's dtype
    ``lora_dx_kernel``    dX = G W + dS A (p = 0: LoRA's kernel, G for dY), or
    ``dora_dx_kernel``    dX = dY W + m ⊙ (G W + dS A) (p > 0; two accumulators on the same W tiles)
    ``lora_da_kernel``    dA = dSᵀ x_d (LoRA's kernel)

The g scaling is applied where it costs nothing: on the accumulator in the forward epilogue, on the small B tile
(dS = s·dY (g⊙B)) and on the dB tile in the dY pass, so dY enters the dots unscaled (exact in TF32, ``precision.py``).
The mask is never stored beyond the forward: x_d lives only between ``dora_down_kernel`` and ``dora_fwd_kernel``;
backward regenerates the mask from the seed (``dropout.dropout_scale``). Dtype constexprs, offsets and runtime values
as in ``lora_forward``.
"""

import triton
import triton.language as tl

from .configs import CACHE_RESULTS, RUNTIME_VALUES, by_dtype, cfg, pick
from .dropout import dropout_scale
from .indexing import index
from .lora_forward import grouped_tile
from .precision import dot_fp32
from .rank_term import rank_r_tile

# ------------------------------------------------------------------------------------------------ launch configs
# DoRA's own lists (not LoRA's, which are tuned for those kernels), pruned with bench/compile_report.py: every config
# here compiles without spills on sm_80 and sm_90 (triton 3.6 and 3.9) unless configs.EXCLUDED names it for an arch.
_GEMM_INTERP = cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_SKINNY_INTERP = cfg(4, 1, BLOCK_M=32, BLOCK_K=32)
# The row norm: a W tile and a rank-r dot per step, one fp32 sum-of-squares tile; memory-bound on W (read once).
NORM_CONFIGS = pick([cfg(4, 3, BLOCK_N=64, BLOCK_K=64), cfg(4, 3, BLOCK_N=32, BLOCK_K=128),
                     cfg(8, 3, BLOCK_N=64, BLOCK_K=128)], cfg(4, 1, BLOCK_N=32, BLOCK_K=32))
NORM_CONFIGS_FP32 = pick([cfg(4, 3, BLOCK_N=64, BLOCK_K=32), cfg(4, 3, BLOCK_N=32, BLOCK_K=64)],
                         cfg(4, 1, BLOCK_N=32, BLOCK_K=32))
# S = x_d Aᵀ with x_d written: LoRA's S-kernel tiles.
DOWN_CONFIGS = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
                     cfg(8, 3, BLOCK_M=128, BLOCK_K=64)], _SKINNY_INTERP)
DOWN_CONFIGS_FP32 = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=32), cfg(8, 3, BLOCK_M=128, BLOCK_K=32),
                          cfg(4, 4, BLOCK_M=32, BLOCK_K=64)], _SKINNY_INTERP)
# One accumulator (p = 0): the LoRA forward GEMM's tiles (configs.GEMM_CONFIGS / GEMM_CONFIGS_FP32), and one more.
FWD_CONFIGS = pick([cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                    cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                    # one stage less: the r = 64 tiles (half adapters) in 99 KiB of shared memory (sm_86/89/120)
                    cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)], _GEMM_INTERP)
FWD_CONFIGS_FP32 = pick([cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)], _GEMM_INTERP)
# Two fp32 accumulators (forward with p > 0, dX with p > 0) and three operand tiles a stage (x, x_d, W; dY, G, W):
# 128×128 with 8 warps (64 accumulator registers a thread each) spilled 16-456 B per thread on sm_80 and 64-216 B on
# sm_90 (triton 3.9, every dtype pair): 32 accumulator values a thread each here. fp32 operands (3xTF32 splits both
# operands of both dots): 64×64×32 spilled 120-272 B with 4 warps and 48-176 B with 8 (sm_80/86/89/120), 32×64×32 has
# no HGMMA/tcgen05 on sm_90/sm_100 (32 rows); 64×32×32 w4 is clean everywhere (139-246 registers).
TWO_ACC_CONFIGS = pick([cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                        cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                        cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)], _GEMM_INTERP)
TWO_ACC_CONFIGS_FP32 = pick([cfg(4, 4, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)], _GEMM_INTERP)
# The dY pass (P tile read and G written beside LoRA's work): fp32 dY at 32×64 with 4 warps spilled 16 B on sm_80
# and 80 B on sm_90 (triton 3.9).
# (64×64 with 8 warps: rank 64 with half adapters on sm_80/86/89, where the three others spilled with one triton or
# the other.)
DY_CONFIGS = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
                   cfg(8, 3, BLOCK_M=128, BLOCK_K=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=64)], _SKINNY_INTERP)
DY_CONFIGS_FP32_ADAPTERS = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=32, BLOCK_K=64)],
                                _SKINNY_INTERP)
DY_CONFIGS_FP32 = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=32), cfg(4, 4, BLOCK_M=32, BLOCK_K=32)], _SKINNY_INTERP)


def _by_dropout(no_drop, drop):
    """``early_config_prune`` that hands the launch to ``no_drop`` or ``drop`` (``by_dtype`` prunes) by HAS_DROPOUT:
    the two-accumulator form needs its own tiles."""

    def prune(configs, named_args, **kwargs):
        return (drop if kwargs["HAS_DROPOUT"] else no_drop)(configs, named_args, **kwargs)

    return prune


# ------------------------------------------------------------------------------------------------------- forward
@triton.jit
def _rank_r_term(acc, s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
                 LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scaling · S[rows] B[cols]ᵀ, over rank chunks of BLOCK_R."""
    for r0 in range(0, R, BLOCK_R):
        rs = index(r0 + tl.arange(0, BLOCK_R), WIDE)
        s = tl.load(s_ptr + rows[:, None] * stride_sm + rs[None, :] * stride_sr, mask=row_ok & (rs[None, :] < R),
                    other=0.0)
        b_t = tl.load(b_ptr + rs[:, None] * stride_br + cols[None, :] * stride_bn, mask=(rs[:, None] < R) & col_ok,
                      other=0.0)
        acc = tl.dot((s * scaling).to(LORA_DOT), b_t.to(LORA_DOT), acc, input_precision=LORA_PREC)
    return acc


@triton.autotune(cache_results=CACHE_RESULTS, configs=NORM_CONFIGS, key=["N", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("w_ptr", NORM_CONFIGS_FP32,
                                                                   kernel="dora_norm_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_wk, stride_wn, stride_ar, stride_ak, stride_bn, stride_br,
    scaling, ARCH,
    ROOT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[split, N] (fp32, SPLIT_K × N contiguous) = Σ_k (W[n, k] + scaling·(B A)[n, k])² over this program's K
    slice; ``ROOT`` (one slice, SPLIT_K 1): the norm itself, the IEEE-rounded root of the sum (tl.sqrt_rn; tl.sqrt is
    sqrt.approx.ftz.f32 on sm_90).

    Grid: (cdiv(N, BLOCK_N), SPLIT_K); the K slices are interleaved (a runtime value, as the dy pass's split). Each
    program stores its partial sums in its own row of out (no atomics), and the launcher sums the rows in a fixed order
    and takes the root: the norm is the same bits run after run and in a checkpointed recompute, whatever order the
    programs run in (fp32 atomics made it depend on that order). W is read through (stride_wk, stride_wn): either
    layout, in place.
    """
    pid_split = tl.program_id(1)
    split_k = tl.num_programs(1)
    ns = index(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    n_ok = ns[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(pid_split * BLOCK_K, K, split_k * BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        k_ok = ks[None, :] < K
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = index(r0 + tl.arange(0, BLOCK_R), WIDE)
            b = tl.load(b_ptr + ns[:, None] * stride_bn + rs[None, :] * stride_br, mask=n_ok & (rs[None, :] < R),
                        other=0.0)
            a = tl.load(a_ptr + rs[:, None] * stride_ar + ks[None, :] * stride_ak, mask=(rs[:, None] < R) & k_ok,
                        other=0.0)
            ba = tl.dot(b.to(LORA_DOT), a.to(LORA_DOT), ba, input_precision=LORA_PREC)
        w = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :] * stride_wk, mask=n_ok & k_ok, other=0.0)
        v = w.to(tl.float32) + scaling * ba
        acc += v * v
    total = tl.sum(acc, axis=1)
    if ROOT:
        total = tl.sqrt_rn(total)
    tl.store(out_ptr + pid_split * N + ns, total, mask=ns < N)


@triton.autotune(cache_results=CACHE_RESULTS, configs=DOWN_CONFIGS, key=["M_BUCKET", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("x_ptr", DOWN_CONFIGS_FP32,
                                                                   kernel="dora_down_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dora_down_kernel(
    x_ptr, a_ptr, s_ptr, xd_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_xdm, stride_xdk,
    seed_ptr, p, drop_scale, ARCH,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[M, R] (fp32) = (m ⊙ x) Aᵀ, and x_d[M, K] = keep ⊙ x in x's dtype (exact: the 0/1 mask, not yet scaled by
    1/(1-p)), written by the programs of the first rank chunk. Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    pid_r = tl.program_id(1)
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    ranks = index(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    row_ok = rows[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        col_ok = cols[None, :] < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=row_ok & col_ok, other=0.0)
        x = x.to(tl.float32) * dropout_scale(seed, rows, k0, p, 1.0, BLOCK_M, BLOCK_K)
        if pid_r == 0:
            tl.store(xd_ptr + rows[:, None] * stride_xdm + cols[None, :] * stride_xdk,
                     x.to(xd_ptr.dtype.element_ty), mask=row_ok & col_ok)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc = dot_fp32(x.to(LORA_DOT), a_t.to(LORA_DOT), acc, LORA_PREC, x_ptr.dtype.element_ty != tl.float32, False)
    acc *= drop_scale
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr, acc, mask=row_ok & (ranks[None, :] < R))


@triton.autotune(cache_results=CACHE_RESULTS, configs=pick(FWD_CONFIGS + TWO_ACC_CONFIGS, _GEMM_INTERP),
                 key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "ARCH"],
                 prune_configs_by={"early_config_prune": _by_dropout(
                     by_dtype("x_ptr", FWD_CONFIGS_FP32, FWD_CONFIGS, FWD_CONFIGS, kernel="dora_fwd_kernel"),
                     by_dtype("x_ptr", TWO_ACC_CONFIGS_FP32, TWO_ACC_CONFIGS, TWO_ACC_CONFIGS,
                              kernel="dora_fwd_kernel"))})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dora_fwd_kernel(
    x_ptr, xd_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, norm_ptr, mag_ptr, y_ptr, p_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_xdm, stride_xdk, stride_wk, stride_wn, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_pm, stride_pn, stride_bias, stride_mag,
    scaling, drop_scale, ARCH,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_P: tl.constexpr, BASE_DOT: tl.constexpr,
    BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """P[M, N] = x_d Wᵀ + s·S Bᵀ (P's dtype: the adapters'), and y[M, N] = g ⊙ P + b (p = 0, x_d = x) or
    (x − x_d) Wᵀ + g ⊙ P + b (p > 0), g = magnitude / norm (``dora_norm_kernel``'s). P is stored only with ``WRITE_P``
    (it serves the magnitude's gradient alone: a frozen magnitude needs no M×N write besides y).

    p > 0: every W tile is dotted with the x tile and the x_d tile (keep ⊙ x, written by ``dora_down_kernel``; scaled
    by drop_scale = 1/(1-p) at the end) into two accumulators. The rank-r term T = s·S Bᵀ goes into P only, after the
    K loop: y = x Wᵀ + (g − 1) ⊙ x_d Wᵀ + g ⊙ T written as (x − x_d) Wᵀ + g ⊙ P needs T once. (Carrying T in both
    accumulators, y = (x Wᵀ + T) + (g − 1) ⊙ P, cancels T against (g − 1)·T when g ≪ 1: 8× PEFT's fp32 error at
    s = 16, g ≈ 0.05 in tests/test_dora.py.) Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit, as lora_fwd_kernel's
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # the rank-r term first, as lora_fwd_kernel: then this is LoRA's GEMM (same shared memory: with the term
        # after the K loop the r = 64 tiles took 104-160 KiB, over the 99 KiB of sm_86/89/120)
        acc = _rank_r_term(acc, s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_bn,
                           stride_br, scaling, LORA_DOT, LORA_PREC, WIDE, BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        k_ok = ks[None, :] < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=(ks[:, None] < K) & col_ok,
                    other=0.0)
        acc = tl.dot(x.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
        if HAS_DROPOUT:
            xd = tl.load(xd_ptr + rows[:, None] * stride_xdm + ks[None, :] * stride_xdk, mask=row_ok & k_ok,
                         other=0.0)
            acc_p = tl.dot(xd.to(BASE_DOT), w.to(BASE_DOT), acc_p, input_precision=BASE_PREC)
    if HAS_DROPOUT:
        acc_p *= drop_scale
        acc -= acc_p  # (x − x_d) Wᵀ
        acc_p = _rank_r_term(acc_p, s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_bn,
                             stride_br, scaling, LORA_DOT, LORA_PREC, WIDE, BLOCK_R)
    else:
        acc_p = acc
    if WRITE_P:
        tl.store(p_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn, acc_p.to(p_ptr.dtype.element_ty),
                 mask=row_ok & col_ok)
    mag = tl.load(mag_ptr + cols * stride_mag, mask=cols < N, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + cols, mask=cols < N, other=1.0)
    # IEEE-rounded quotient, as PyTorch's (PEFT's g): a plain / compiles to div.full.f32 on sm_90
    # (tests/test_compile_targets.py reads the PTX); the same g as the dY pass's, bit for bit
    g = tl.div_rn(mag, norm)[None, :]
    if HAS_DROPOUT:
        acc += g * acc_p
    else:
        acc = g * acc_p
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok & col_ok)


# ------------------------------------------------------------------------------------------------------ backward
@triton.autotune(cache_results=CACHE_RESULTS, configs=DY_CONFIGS, key=["M_BUCKET", "N", "R", "ARCH"],
                 reset_to_zero=["ds_ptr", "db_ptr", "dbias_ptr", "dmag_ptr"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", DY_CONFIGS_FP32,
                                                                   fp32_adapters=DY_CONFIGS_FP32_ADAPTERS,
                                                                   kernel="dora_dy_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, p_ptr, norm_ptr, mag_ptr, ds_ptr, db_ptr, dbias_ptr, dmag_ptr, g_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_pm, stride_pn, stride_mag,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr, stride_gm, stride_gn,
    scaling, ARCH,
    DS_ATOMIC: tl.constexpr, HAS_DBIAS: tl.constexpr, NEED_DS: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DMAG: tl.constexpr, WRITE_G: tl.constexpr, G_MINUS_ONE: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One pass over dY (M×N) with g = magnitude/norm per column (IEEE divisions, as the forward's):

        dS = s·(g⊙dY) B          (M×R; g on the B tile)           dB = s·(g⊙dY)ᵀ S   (N×R; g on the dB tile)
        db = Σ_rows dY           (N)                               dmag = Σ_rows dY ⊙ P / norm   (N)
        G  = g⊙dY, or (g − 1)⊙dY with G_MINUS_ONE (p > 0)          (M×N in G's dtype, for dX)

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R), SPLIT_N), as ``lora_dy_kernel``; the column reductions (db, dmag) and
    G come from the first rank chunk's programs only. ds/db/dbias/dmag are fp32 and zeroed by the launcher.
    """
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    split_n = tl.num_programs(2)
    BLOCK_N: tl.constexpr = BLOCK_K
    HALF_DY: tl.constexpr = dy_ptr.dtype.element_ty != tl.float32  # exact in TF32 (precision.py)
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    ranks = index(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), WIDE)
    row_ok = rows[:, None] < M
    rank_ok = ranks[None, :] < R
    s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                mask=row_ok & rank_ok, other=0.0).to(LORA_DOT)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(pid_split * BLOCK_N, N, split_n * BLOCK_N):
        cols = index(n0 + tl.arange(0, BLOCK_N), WIDE)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok & col_ok[None, :], other=0.0)
        mag = tl.load(mag_ptr + cols * stride_mag, mask=col_ok, other=0.0).to(tl.float32)
        norm = tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
        g = tl.div_rn(mag, norm)  # the forward's g, bit for bit
        if NEED_DS:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=col_ok[:, None] & rank_ok, other=0.0)
            b = b.to(tl.float32) * g[:, None]
            ds = dot_fp32(dy.to(LORA_DOT), b.to(LORA_DOT), ds, LORA_PREC, HALF_DY, False)
        if NEED_DB:
            db = dot_fp32(tl.trans(dy.to(LORA_DOT)), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), LORA_PREC,
                          HALF_DY, False)
            tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + ranks[None, :] * stride_dbr,
                          (scaling * g)[:, None] * db, mask=col_ok[:, None] & rank_ok, sem="relaxed")
        if pid_r == 0:
            if HAS_DBIAS:
                tl.atomic_add(dbias_ptr + cols, tl.sum(dy.to(tl.float32), axis=0), mask=col_ok, sem="relaxed")
            if NEED_DMAG:
                pt = tl.load(p_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                             mask=row_ok & col_ok[None, :], other=0.0)
                tl.atomic_add(dmag_ptr + cols, tl.div_rn(tl.sum(dy.to(tl.float32) * pt.to(tl.float32), axis=0), norm),
                              mask=col_ok, sem="relaxed")
            if WRITE_G:
                if G_MINUS_ONE:
                    gd = dy.to(tl.float32) * (g - 1.0)[None, :]
                else:
                    gd = dy.to(tl.float32) * g[None, :]
                tl.store(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, gd.to(g_ptr.dtype.element_ty),
                         mask=row_ok & col_ok[None, :])
    if NEED_DS:
        ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr
        if DS_ATOMIC:
            tl.atomic_add(ds_ptrs, scaling * ds, mask=row_ok & rank_ok, sem="relaxed")
        else:
            tl.store(ds_ptrs, scaling * ds, mask=row_ok & rank_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=TWO_ACC_CONFIGS, key=["M_BUCKET", "N", "K", "R", "ARCH"],
                 prune_configs_by={"early_config_prune": by_dtype("dy_ptr", TWO_ACC_CONFIGS_FP32,
                                                                   kernel="dora_dx_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dora_dx_kernel(
    dy_ptr, gm_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_gmm, stride_gmn, stride_wk, stride_wn, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    seed_ptr, p, drop_scale, ARCH,
    BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[M, K] = dY W + m ⊙ (G W + dS A), G = (g − 1)⊙dY (from ``dora_dy_kernel``), m the scaled dropout mask
    regenerated from the seed in the epilogue. Each W tile feeds both accumulators. Output tile BLOCK_M × BLOCK_N
    over (M, K), reduction over N in BLOCK_K steps (as ``lora_dx_kernel``). Grid: (cdiv(M, BLOCK_M) · cdiv(K, BLOCK_N),).
    """
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rows = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    k_start = pid_k * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < K

    acc_m = rank_r_tile(ds_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = index(n0 + tl.arange(0, BLOCK_K), WIDE)
        n_ok = ns[None, :] < N
        w = tl.load(w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk, mask=(ns[:, None] < N) & col_ok,
                    other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn, mask=row_ok & n_ok, other=0.0)
        acc = tl.dot(dy.to(BASE_DOT), w.to(BASE_DOT), acc, input_precision=BASE_PREC)
        gm = tl.load(gm_ptr + rows[:, None] * stride_gmm + ns[None, :] * stride_gmn, mask=row_ok & n_ok, other=0.0)
        acc_m = tl.dot(gm.to(BASE_DOT), w.to(BASE_DOT), acc_m, input_precision=BASE_PREC)
    acc += acc_m * dropout_scale(seed, rows, k_start, p, drop_scale, BLOCK_M, BLOCK_N)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)
