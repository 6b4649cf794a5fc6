"""QLoRA: the base GEMMs with W read straight from bitsandbytes' 4-bit storage, dequantized in registers.

bitsandbytes' ``Linear4bit`` keeps W (N×K, out×in) blockwise quantized:

- ``data``: W flattened row-major, two 4-bit codes a byte, the EVEN flat index in the HIGH nibble
  (``packed = (q[0::2] << 4) | q[1::2]``); element (n, k) is flat index n·K + k, so with an odd K a byte
  holds the last element of one row and the first of the next: everything here indexes by flat element;
- ``absmax``: one fp32 scale per ``blocksize`` consecutive flat elements (blocksize 32…4096, a power of 2);
  with double quantization (``NESTED``) a uint8 index per block instead, the real scale being
  ``code2[absmax[b]] · absmax2[b >> 8] + offset`` (state2's 256-entry code, one fp32 per 256 blocks);
- ``code``: the 16 fp32 values of NF4 or FP4, read through a pointer (once per program, then looked up in
  registers), so both types share one kernel.

A value is ``code[q] · scale`` in fp32, rounded to W's dtype (``W_DTYPE``: the quant state's dtype), then to
x's dtype, as ``bnb.matmul_4bit`` computes ``dequantize_4bit(W, state).to(x.dtype)``. The nested scale is
rounded after the product and again after the offset, as bitsandbytes computes it (dequantize_blockwise, then
``absmax += offset``): on a GPU the product is an explicit ``mul.rn.f32`` so that the compiler cannot contract
it with the add into one FMA (one rounding, not bitsandbytes' value).

    lora_fwd_4bit_kernel:  y  = x Wᵀ + b + s·S Bᵀ        (lora_fwd_kernel with W from 4-bit storage)
    lora_dx_4bit_kernel:   dX = dY W + m ⊙ (dS A)        (lora_dx_kernel likewise)
    dequantize_4bit_kernel: W (dense, W_DTYPE/out dtype)  (tests, merging an adapter into a dense copy)

No dequantized copy of W exists at any time: each program dequantizes the W tile it is about to multiply
(``load_w4_tile``; ``ALIGNED``, K a multiple of the blocksize, loads the scales per row of W, otherwise per element).
The rank-r term, dropout, dtype constexprs, offsets and autotuning follow lora_forward.py / lora_backward.py; the
config lists are their own (configs.Q4_GEMM_CONFIGS: BLOCK_K 32, the W tile being held in registers).
"""

import triton
import triton.language as tl

from .configs import (
    CACHE_RESULTS,
    DEQUANT_CONFIGS,
    INTERPRET,
    Q4_GEMM_CONFIGS,
    Q4_GEMM_CONFIGS_FP32,
    RUNTIME_VALUES,
    by_dtype,
)
from .dropout import dropout_scale
from .indexing import index
from .lora_forward import grouped_tile
from .precision import dot_fp32
from .rank_term import rank_r_tile

_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _mul_rn(a, b):
    """fp32 a·b rounded once, never fused with a following add (PTX ``mul.rn`` is exempt from FMA contraction,
    which Triton's default ``enable_fp_fusion`` applies to a plain ``a * b + c``). numpy never contracts."""
    if _INTERPRETED:
        out = a * b
    else:
        out = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def round_rn(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in ``DTYPE``, rounded to nearest even (the GPU's ``cvt.rn``). Triton's interpreter truncates
    fp32 → bf16 (triton 3.9: ``cast_impl`` converts with no rounding mode; 1.17742 became 1.171875, not 1.1796875):
    interpreted, the bf16 rounding is done here on the bits first, which makes that cast exact. Finite x only."""
    if _INTERPRETED:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask,
                 NESTED: tl.constexpr, QBLOCK2_LOG2: tl.constexpr):
    """fp32 scales of quantization blocks ``blocks`` (0 where ``mask`` is off)."""
    if NESTED:
        q2 = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        scale = _mul_rn(tl.load(code2_ptr + q2), tl.load(absmax2_ptr + (blocks >> QBLOCK2_LOG2), mask=mask, other=0.0))
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return scale


@triton.jit
def load_w4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code, ns, k0, N, K,
                 S: tl.constexpr, KN: tl.constexpr, W_DTYPE: tl.constexpr, NESTED: tl.constexpr,
                 QBLOCK_LOG2: tl.constexpr, QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr):
    """The W tile over rows ``ns`` (along N) and columns k0 … k0+S-1 (along K), dequantized and rounded to
    ``W_DTYPE``. ``KN``: as Wᵀ's tile [S, len(ns)] (the forward's x Wᵀ); else as W's [len(ns), S] (dX = dY W).
    ``code``: the 16 code values, loaded once per program. Elements outside N×K are finite garbage: the other
    operand's masked zeros (along K) or the output mask (along N) discard them.

    Per element: one byte load, a nibble, a register lookup of the code (``tl.gather``) and its block's scale.
    ``ALIGNED`` (K a multiple of the blocksize: every real model's layers; k0 is a multiple of S): every row starts
    a block, so a row's S elements span J = max(1, S / blocksize) blocks at fixed columns, and the scales are loaded
    per row of W (J vectors), not per element. Otherwise the scale is gathered per element: the rows' J = (S-1) //
    blocksize + 2 possible blocks, selected per element, took 168-255 registers and spilled 16-192 B per thread
    (triton 3.6, sm_80/sm_100); the per-element gathers cost shared memory instead (Triton's pipeliner stages them:
    84 KiB at 64×64×32 with 5 stages), so unaligned launches take the 64×64 tiles only (``prune_4bit``).
    (Per-element gathers of the code were staged the same way: 369 KiB at 128×128×64 with 4 stages on sm_90,
    triton 3.9; the register lookup has none.)"""
    ks = k0 + tl.arange(0, S)
    row_start = ns * K  # flat index of W[n, 0]
    n_ok = ns < N
    if KN:
        flat = row_start[None, :] + ks[:, None]
        mask = n_ok[None, :] & (ks[:, None] < K)
    else:
        flat = row_start[:, None] + ks[None, :]
        mask = n_ok[:, None] & (ks[None, :] < K)
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    q = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)  # in 0..15 everywhere (masked bytes read as 0)
    if KN:
        w = tl.gather(tl.broadcast_to(code[:, None], (16, ns.shape[0])), q, 0)
    else:
        w = tl.gather(tl.broadcast_to(code[None, :], (ns.shape[0], 16)), q, 1)
    if ALIGNED:
        first = (row_start + k0) >> QBLOCK_LOG2  # each row's block at column k0
        last = (row_start + (K - 1)) >> QBLOCK_LOG2  # the row's last block: past it (k >= K) nothing is loaded
        s0 = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first, n_ok, NESTED, QBLOCK2_LOG2)
        scale = tl.broadcast_to(s0[None, :] if KN else s0[:, None], w.shape)
        J: tl.constexpr = ((S - 1) >> QBLOCK_LOG2) + 1  # S and blocksize are powers of two: max(1, S / blocksize)
        col_slot = tl.arange(0, S) >> QBLOCK_LOG2
        slot = col_slot[:, None] if KN else col_slot[None, :]
        for j in tl.static_range(1, J):
            sj = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first + j, n_ok & (first + j <= last),
                              NESTED, QBLOCK2_LOG2)
            scale = tl.where(slot == j, sj[None, :] if KN else sj[:, None], scale)
    else:
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat >> QBLOCK_LOG2, mask,
                             NESTED, QBLOCK2_LOG2)
    if W_DTYPE == tl.float32:  # W is the fp32 product itself: keep it from being contracted into a later
        w = _mul_rn(w, scale)      # subtraction (3xTF32's b - b_hi), so that the dot sees bitsandbytes' W
    else:
        w = round_rn(w * scale, W_DTYPE)
    return w


@triton.jit
def as_operand(w, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT: tl.constexpr):
    """W's tile (in W's dtype) as the other operand's dtype, then the dot's: bitsandbytes' ``.to(x.dtype)``."""
    if W_DTYPE != X_DTYPE:
        w = round_rn(w.to(tl.float32), X_DTYPE)
    return w.to(DOT)


def prune_4bit(base: str, kernel: str):
    """``configs.by_dtype``'s pruning (own lists, configs.Q4_GEMM_CONFIGS: the W tile lives in registers, the dense
    lists spilled), and for an unaligned W (``ALIGNED`` off: per-element scale gathers, load_w4_tile) the tiles of at
    most 64×64 only, whose staged gathers fit every GPU's shared memory (84 KiB at 64×64×32 with 5 stages; 128 KiB
    at 128×128×32 with 4, over sm_86/89/120's 99 KiB)."""
    by = by_dtype(base, Q4_GEMM_CONFIGS_FP32, kernel=kernel)

    def prune(configs, named_args, **kwargs):
        if not kwargs["ALIGNED"]:  # (the fp32 list has only such tiles)
            configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return by(configs, named_args, **kwargs)

    return prune


@triton.autotune(cache_results=CACHE_RESULTS, configs=Q4_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R", "NESTED", "QBLOCK_LOG2", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_4bit("x_ptr", "lora_fwd_4bit_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_fwd_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, stride_bias,
    scaling, ARCH,
    HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, NESTED: tl.constexpr, QBLOCK_LOG2: tl.constexpr,
    QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] Wᵀ + bias + scaling · S[M, R] B[N, R]ᵀ, W (N×K) from its 4-bit storage (module doc).
    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    cols = index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N

    # Rank-r term first, then the base GEMM accumulates on top: one fp32 accumulator (lora_fwd_kernel).
    acc = rank_r_tile(s_ptr, b_ptr, rows, cols, row_ok, col_ok, R, stride_sm, stride_sr, stride_br, stride_bn,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    acc *= scaling
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    code = tl.load(code_ptr + tl.arange(0, 16))
    for k0 in range(0, K, BLOCK_K):
        ks = index(k0 + tl.arange(0, BLOCK_K), WIDE)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok & (ks[None, :] < K), other=0.0)
        w = load_w4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code, cols, k0, N, K,
                         BLOCK_K, True, W_DTYPE, NESTED, QBLOCK_LOG2, QBLOCK2_LOG2, ALIGNED)
        # W in W's dtype, then x's (bnb: dequantize_4bit(...).to(x.dtype)). With fp32 x and a half W_DTYPE, W is
        # exact in TF32: 3xTF32 then needs two products, not three (precision.dot_fp32).
        acc = dot_fp32(x.to(BASE_DOT), as_operand(w, W_DTYPE, X_DTYPE, BASE_DOT), acc, BASE_PREC, False,
                       W_DTYPE != tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             round_rn(acc, y_ptr.dtype.element_ty), mask=row_ok & col_ok)


@triton.autotune(cache_results=CACHE_RESULTS, configs=Q4_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R", "NESTED", "QBLOCK_LOG2", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_4bit("dy_ptr", "lora_dx_4bit_kernel")})
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def lora_dx_4bit_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    seed_ptr, p, drop_scale, ARCH,
    HAS_DROPOUT: tl.constexpr, W_DTYPE: tl.constexpr, NESTED: tl.constexpr, QBLOCK_LOG2: tl.constexpr,
    QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr, BASE_DOT: tl.constexpr, BASE_PREC: tl.constexpr,
    LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[M, K] = dY[M, N] W + m ⊙ (dS[M, R] A[R, K]), W (N×K) from its 4-bit storage (module doc).

    As lora_dx_kernel: the output tile is BLOCK_M × BLOCK_N over (M, K), the reduction runs over N in BLOCK_K
    steps. Grid: (cdiv(M, BLOCK_M) · cdiv(K, BLOCK_N),).
    """
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rows = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    k_start = pid_k * BLOCK_N
    cols = index(k_start + tl.arange(0, BLOCK_N), WIDE)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < K

    acc = rank_r_tile(ds_ptr, a_ptr, rows, cols, row_ok, col_ok, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                      LORA_DOT, LORA_PREC, WIDE, BLOCK_R, BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        acc *= dropout_scale(seed, rows, k_start, p, drop_scale, BLOCK_M, BLOCK_N)
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


@triton.autotune(cache_results=CACHE_RESULTS, configs=DEQUANT_CONFIGS, key=["ARCH"])
@triton.jit(do_not_specialize=RUNTIME_VALUES)
def dequantize_4bit_kernel(
    w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K, ARCH,
    NESTED: tl.constexpr, QBLOCK_LOG2: tl.constexpr, QBLOCK2_LOG2: tl.constexpr, ALIGNED: tl.constexpr,
    WIDE: tl.constexpr, KN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (contiguous N×K) = W dequantized, rounded to out's dtype (the quant state's, as
    bitsandbytes.functional.dequantize_4bit returns it), through the GEMMs' own tile loader (``KN``: in the
    forward's orientation, else dX's), so that tests check it bit for bit. Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    ns = index(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    k0 = index(tl.program_id(1) * BLOCK_K, WIDE)
    ks = k0 + tl.arange(0, BLOCK_K)
    code = tl.load(code_ptr + tl.arange(0, 16))
    w = load_w4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code, ns, k0, N, K,
                     BLOCK_K, KN, out_ptr.dtype.element_ty, NESTED, QBLOCK_LOG2, QBLOCK2_LOG2, ALIGNED)
    if KN:
        tl.store(out_ptr + ns[None, :] * K + ks[:, None], w, mask=(ns[None, :] < N) & (ks[:, None] < K))
    else:
        tl.store(out_ptr + ns[:, None] * K + ks[None, :], w, mask=(ns[:, None] < N) & (ks[None, :] < K))
