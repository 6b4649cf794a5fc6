"""DoRA on the Triton backend: the launchers of the DoRA kernels (``kernels/dora.py``) and the layer's two passes.

Forward, 3 launches: ``dora_norm`` (‖W + s·B A‖ per row), S (``lora_triton.lora_down`` when p = 0, ``dora_down``
when p > 0, which also writes x_d for the next launch), ``dora_forward_gemm`` (y and P). Backward, 3 launches:
``dora_dy_pass`` (dS, dB, dbias, d magnitude, G), dX (``lora_triton.lora_dx`` on G when p = 0, ``dora_dx`` when
p > 0), ``lora_triton.lora_da``. Plus the zero-fills of the atomics buffers, as in the LoRA launchers, and the sum of
the norm's K-split partials when it is split.

Conventions as the LoRA launchers (``triton_launch``); a kernel that cannot be built or launched hands the call to the
next path (``autograd/driver.py``).
"""

from __future__ import annotations

import torch

from ..bases import Pass
from ..call import Call, Operands, Seed
from ..dropout import drop_scale
from ..kernels.configs import m_bucket
from ..kernels.dora import dora_down_kernel, dora_dx_kernel, dora_dy_kernel, dora_fwd_kernel, dora_norm_kernel
from . import dora_torch
from .lora_triton import lora_da, lora_down, lora_dx
from .masks import keep
from .triton_launch import (
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    drop_args,
    rank_block,
    split_factor,
    unused,
    weight_strides,
    wide_offsets,
)


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              weight_layout: str, split_k: int | None = None) -> torch.Tensor:
    """‖W + scaling·B A‖ per output row, fp32 (N), without B A in memory: the squares summed in fp32 and the
    IEEE-rounded root. ``split_k`` slices of K (default: enough to fill the GPU when the row tiles alone do not), each
    slice's partial sums stored apart and summed here in a fixed order, then rooted (torch.sqrt: IEEE), no atomics:
    the same bits run after run."""
    N, R = lora_B.shape
    K = lora_A.shape[1]
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    if split_k is None:
        split_k = split_factor(cdiv(N, 64), cdiv(K, 256), weight.device)
    out = torch.empty((split_k, N), device=weight.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), split_k)
    dora_norm_kernel[grid](
        weight, lora_A, lora_B, out, N, K, R,
        stride_wk, stride_wn, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        scaling,
        ROOT=split_k == 1, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, weight.device),
        WIDE=wide_offsets(weight, lora_A, lora_B, out), BLOCK_R=rank_block(R, lora_A.dtype),
        ARCH=arch(weight.device),
    )
    return out.sum(0).sqrt_() if split_k > 1 else out[0]


def dora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S = dropout(x) Aᵀ fp32 M×r, x_d = keep ⊙ x in x's dtype M×K, unscaled) for p > 0."""
    M, K = x.shape
    R = lora_A.shape[0]
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    xd = torch.empty((M, K), device=x.device, dtype=x.dtype)
    block_r = rank_block(R, lora_A.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r))
    dora_down_kernel[grid](
        x, lora_A, s, xd, M, K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        xd.stride(0), xd.stride(1),
        *drop_args(seed, p, x.device),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, x.device),
        WIDE=wide_offsets(x, lora_A, s, xd), BLOCK_R=block_r,
        ARCH=arch(x.device),
    )
    return s, xd


def dora_forward_gemm(
    x: torch.Tensor, xd: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, norm: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, weight_layout: str,
    need_p: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y M×N in x's dtype, P = x_d Wᵀ + s·S Bᵀ M×N in the adapters' dtype), one Triton GEMM; ``xd`` (keep ⊙ x) when
    p > 0, else None. Without ``need_p`` (a frozen magnitude) P is neither allocated nor written: an empty tensor."""
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    P = torch.empty((M, N) if need_p else (0,), device=x.device, dtype=lora_B.dtype)
    p_arg, p_strides = (P, P.stride()) if need_p else (unused(x.device), (1, 1))
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    bias_arg = bias if bias is not None else unused(x.device)
    xd_arg = xd if xd is not None else x  # not read without dropout (HAS_DROPOUT off): x's strides keep the variant
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    dora_fwd_kernel[grid](
        x, xd_arg, weight, bias_arg, s, lora_B, norm, magnitude, y, p_arg,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), xd_arg.stride(0), xd_arg.stride(1), stride_wk, stride_wn, s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), *p_strides, bias_arg.stride(0),
        magnitude.stride(0),
        scaling, drop_scale(p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, WRITE_P=need_p, BASE_DOT=dot_dtype(x.dtype),
        BASE_PREC=dot_precision(x.dtype, x.device), LORA_DOT=dot_dtype(lora_B.dtype),
        LORA_PREC=dot_precision(lora_B.dtype, x.device),
        WIDE=wide_offsets(x, xd_arg, weight, bias_arg, s, lora_B, y, p_arg), BLOCK_R=rank_block(R, lora_B.dtype),
        ARCH=arch(x.device),
    )
    return y, P


def dora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, P: torch.Tensor, norm: torch.Tensor,
    magnitude: torch.Tensor, scaling: float, need_ds: bool, need_db: bool, need_dbias: bool, need_dmag: bool,
    write_g: bool, g_minus_one: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N, d magnitude fp32 N, G M×N in dY's dtype), each None
    when not needed. G = g⊙dY, or (g − 1)⊙dY with ``g_minus_one``."""
    M, N = dy.shape
    R = lora_B.shape[1]
    block_r = rank_block(R, lora_B.dtype)
    if split_n is None:
        split_n = split_factor(cdiv(M, 64) * cdiv(R, block_r), cdiv(N, 128), dy.device)
    f32 = {"device": dy.device, "dtype": torch.float32}
    nothing = unused(dy.device)
    ds = (torch.zeros((M, R), **f32) if split_n > 1 else torch.empty((M, R), **f32)) if need_ds else nothing
    db = torch.zeros((N, R), **f32) if need_db else nothing
    dbias = torch.zeros((N,), **f32) if need_dbias else nothing
    dmag = torch.zeros((N,), **f32) if need_dmag else nothing
    g = torch.empty((M, N), device=dy.device, dtype=dy.dtype) if write_g else nothing
    p_arg = P if need_dmag else nothing  # (P is an empty placeholder when the magnitude is frozen)
    strides = lambda t, on: (t.stride(0), t.stride(1)) if on else (1, 1)  # noqa: E731
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_n)
    dora_dy_kernel[grid](
        dy, lora_B, s, p_arg, norm, magnitude, ds, db, dbias, dmag, g, M, N, R, m_bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        *strides(P, need_dmag), magnitude.stride(0), *strides(ds, need_ds), *strides(db, need_db),
        *strides(g, write_g),
        scaling,
        DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db, NEED_DMAG=need_dmag,
        WRITE_G=write_g, G_MINUS_ONE=g_minus_one,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, dy.device),
        WIDE=wide_offsets(dy, lora_B, s, p_arg, ds, db, g), BLOCK_R=block_r,
        ARCH=arch(dy.device),
    )
    return tuple(t if on else None for t, on in ((ds, need_ds), (db, need_db), (dbias, need_dbias),
                                                 (dmag, need_dmag), (g, write_g)))


def dora_dx(dy: torch.Tensor, gm: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
            weight_layout: str, seed: int, p: float, out_dtype: torch.dtype) -> torch.Tensor:
    """dX = dY W + m ⊙ (G W + dS A), G = (g − 1)⊙dY (M×K, ``out_dtype``), one Triton GEMM."""
    M, N = dy.shape
    R, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    dora_dx_kernel[grid](
        dy, gm, weight, ds, lora_A, dx, M, N, K, R, m_bucket(M),
        dy.stride(0), dy.stride(1), gm.stride(0), gm.stride(1), stride_wk, stride_wn, ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        *drop_args(seed, p, dy.device),
        BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dy.device),
        WIDE=wide_offsets(dy, gm, weight, ds, lora_A, dx), BLOCK_R=rank_block(R, lora_A.dtype),
        ARCH=arch(dy.device),
    )
    return dx


# --------------------------------------------------------------------------------------- the layer, with fallback


def forward(t: Operands, call: Call, seed: Seed, keep_mask: torch.Tensor | None = None, need_p: bool = True
            ) -> tuple[torch.Tensor, ...]:
    """(y in x's dtype, S fp32 M×r, P M×N in the adapters' dtype, the row norms fp32 N). Three launches. Without
    ``need_p`` (the magnitude frozen: P serves only its gradient) P is not allocated or written: an empty tensor."""
    x, weight, lora_A, lora_B, p = t.x, t.weight, t.lora_A, t.lora_B, call.p
    if x.numel() == 0:  # a grid with a zero dimension is not a launch
        y, s, P, norm = dora_torch.forward(t, call, seed, keep(call.backend, seed, tuple(x.shape), p, x.device),
                                           need_p=need_p)
        return y, s.float(), P, norm
    norm = dora_norm(weight, lora_A, lora_B, call.scaling, call.layout)
    if p > 0:
        s, xd = dora_down(x, lora_A, seed, p)
    else:
        s, xd = lora_down(x, lora_A, seed, 0.0), None
    y, P = dora_forward_gemm(x, xd, weight, t.bias, s, lora_B, norm, t.magnitude, call.scaling, p, call.layout, need_p)
    return y, s, P, norm


def backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
             keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dX, dA fp32, dB fp32, dbias fp32, d magnitude fp32), None where not needed. Three launches."""
    x, weight, lora_A, p = t.x, t.weight, t.lora_A, call.p
    s, P, norm = saved
    need_dx, need_da, need_db, need_dbias, need_dmag = needs
    if x.numel() == 0 or dy.numel() == 0:
        return dora_torch.backward(t, call, saved, dy, needs, seed, keep(call.backend, seed, tuple(x.shape), p,
                                                                         x.device))
    dx = da = None
    ds, db, dbias, dmag, g = dora_dy_pass(dy, t.lora_B, s, P, norm, t.magnitude, call.scaling, need_dx or need_da,
                                          need_db, need_dbias, need_dmag, need_dx, p > 0)
    if need_dx:
        if p > 0:
            dx = dora_dx(dy, g, weight, ds, lora_A, call.layout, seed, p, x.dtype)
        else:  # dX = (g⊙dY) W + dS A: LoRA's kernel with G for dY
            dx = lora_dx(g, weight, ds, lora_A, call.layout, seed, 0.0, x.dtype)
    if need_da:
        da = lora_da(ds, x, lora_A, seed, p)
    return dx, da, db, dbias, dmag


FUSED = Pass(forward, backward)  # the dense kind's fused DoRA path


__all__ = ["FUSED", "backward", "dora_down", "dora_dx", "dora_dy_pass", "dora_forward_gemm", "dora_norm", "forward"]
