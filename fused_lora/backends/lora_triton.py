"""LoRA on the Triton backend: the launchers of the LoRA kernels and the two ways to run the layer with them.

    forward:  S = dropout(x) Aᵀ (lora_down), then y                   backward: dS, dB, dbias (lora_dy_pass), dX, dA
    "fused":     y = x Wᵀ + b + s·S Bᵀ, one Triton GEMM (lora_forward)            dX = dY W + m ⊙ (dS A) (lora_dx)
    "composed":  y = base(x) by cuBLAS / the quantized layer, += s·S Bᵀ (lora_up_add)  dX = base's dX, += m ⊙ (dS A)

Forward 2 launches, backward 3 (plus the base's own GEMM when composed). Turing GPUs take the composed path (Triton
lowers ``tl.dot`` to FMA there, no tensor cores), and it is the base for layers whose weight is not a dense matrix.
Which one a call takes is the router's choice (``dispatch.py``; ``auto``: ``path_choice``); a kernel that cannot run
hands the call to the next path (``autograd/driver.py``). The passes (``FUSED``, ``COMPOSED``) take the call record
and the call's tensors (``fused_lora.call``); the launchers take tensors. Launch conventions: ``triton_launch``.
"""

from __future__ import annotations

import torch

from ..bases import Pass
from ..call import Call, Operands, Seed
from ..kernels.configs import m_bucket
from ..kernels.lora_backward import lora_da_kernel, lora_dx_kernel, lora_dy_kernel
from ..kernels.lora_compose import lora_dx_add_kernel, lora_up_add_kernel
from ..kernels.lora_forward import lora_down_kernel, lora_fwd_kernel
from . import lora_torch
from .dense_base import DenseBase
from .masks import keep
from .triton_launch import (
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    drop_args,
    rank_block,
    skinny_rank_block,
    split_factor,
    unused,
    weight_strides,
    wide_offsets,
)

__all__ = ["COMPOSED", "FUSED", "composed_backward", "composed_forward", "fused_backward", "fused_forward", "lora_da",
           "lora_down", "lora_dx", "lora_dx_add", "lora_dy_pass", "lora_forward", "lora_up_add"]


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float, split_k: int | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ in fp32 (M×r). ``split_k`` slices of K (default: enough to fill the GPU when the row tiles
    alone do not), summed in a fixed order."""
    M, K = x.shape
    R = lora_A.shape[0]
    block_r = skinny_rank_block(R, x.device)
    if split_k is None:
        split_k = split_factor(cdiv(M, 64) * cdiv(R, block_r), cdiv(K, 256), x.device, cap=8)
    out = torch.empty((split_k, M, R) if split_k > 1 else (M, R), device=x.device, dtype=torch.float32)
    stride_ss = out.stride(0) if split_k > 1 else 0
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_k)
    lora_down_kernel[grid](
        x, lora_A, out, M, K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(-2), out.stride(-1), stride_ss,
        *drop_args(seed, p, x.device),
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, x.device),
        WIDE=wide_offsets(x, lora_A, out), BLOCK_R=block_r,
        ARCH=arch(x.device),
    )
    return out.sum(0) if split_k > 1 else out


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, weight_layout: str,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N), one Triton GEMM."""
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    bias_arg = bias if bias is not None else unused(x.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    lora_fwd_kernel[grid](
        x, weight, bias_arg, s, lora_B, y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), stride_wk, stride_wn, s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), bias_arg.stride(0),
        scaling,
        HAS_BIAS=bias is not None, BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, x.device),
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, x.device),
        WIDE=wide_offsets(x, weight, bias_arg, s, lora_B, y), BLOCK_R=rank_block(R, lora_B.dtype),
        ARCH=arch(x.device),
    )
    return y


def lora_up_add(y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y += scaling · S Bᵀ in place (y: the base layer's M×N output); returns y."""
    M, N = y.shape
    R = lora_B.shape[1]
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))
    lora_up_add_kernel[grid](
        y, s, lora_B, M, N, R, m_bucket(M),
        y.stride(0), y.stride(1), s.stride(0), s.stride(1), lora_B.stride(0), lora_B.stride(1),
        scaling,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, y.device),
        WIDE=wide_offsets(y, s, lora_B), BLOCK_R=rank_block(R, lora_B.dtype, y.device),
        ARCH=arch(y.device),
    )
    return y


def lora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
    need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N), each None when not needed."""
    M, N = dy.shape
    R = lora_B.shape[1]
    block_r = skinny_rank_block(R, dy.device)
    m_programs = cdiv(M, 64) * cdiv(R, block_r)
    if split_n is None:
        split_n = split_factor(m_programs, cdiv(N, 128), dy.device)
    f32 = {"device": dy.device, "dtype": torch.float32}
    nothing = unused(dy.device)
    ds = (torch.zeros((M, R), **f32) if split_n > 1 else torch.empty((M, R), **f32)) if need_ds else nothing
    db = torch.zeros((N, R), **f32) if need_db else nothing
    dbias = torch.zeros((N,), **f32) if need_dbias else nothing
    ds_strides = (ds.stride(0), ds.stride(1)) if need_ds else (1, 1)
    db_strides = (db.stride(0), db.stride(1)) if need_db else (1, 1)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_n)
    lora_dy_kernel[grid](
        dy, lora_B, s, ds, db, dbias, M, N, R, m_bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        *ds_strides, *db_strides,
        scaling,
        DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, dy.device),
        WIDE=wide_offsets(dy, lora_B, s, ds, db), BLOCK_R=block_r,
        ARCH=arch(dy.device),
    )
    return (ds if need_ds else None), (db if need_db else None), (dbias if need_dbias else None)


def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
    weight_layout: str, seed: int, p: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``), one Triton GEMM."""
    M, N = dy.shape
    R, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    stride_wk, stride_wn = weight_strides(weight, weight_layout)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    lora_dx_kernel[grid](
        dy, weight, ds, lora_A, dx, M, N, K, R, m_bucket(M),
        dy.stride(0), dy.stride(1), stride_wk, stride_wn, ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        *drop_args(seed, p, dy.device),
        HAS_DROPOUT=p > 0, BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dy.device),
        WIDE=wide_offsets(dy, weight, ds, lora_A, dx), BLOCK_R=rank_block(R, lora_A.dtype),
        ARCH=arch(dy.device),
    )
    return dx


def lora_dx_add(dx: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dX += m ⊙ (dS A) in place (dX: the base layer's input gradient, M×K); returns dX."""
    M, K = dx.shape
    R = lora_A.shape[0]
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(K, meta["BLOCK_N"]))
    lora_dx_add_kernel[grid](
        dx, ds, lora_A, M, K, R, m_bucket(M),
        dx.stride(0), dx.stride(1), ds.stride(0), ds.stride(1), lora_A.stride(0), lora_A.stride(1),
        *drop_args(seed, p, dx.device),
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dx.device),
        WIDE=wide_offsets(dx, ds, lora_A), BLOCK_R=rank_block(R, lora_A.dtype, dx.device),
        ARCH=arch(dx.device),
    )
    return dx


def lora_da(
    ds: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float,
    split_m: int | None = None,
) -> torch.Tensor:
    """dA = dSᵀ (m ⊙ x) in fp32 (r×K)."""
    M, K = x.shape
    R = lora_A.shape[0]
    block_r = skinny_rank_block(R, x.device)
    if split_m is None:
        split_m = split_factor(cdiv(K, 64) * cdiv(R, block_r), cdiv(M, 128), x.device)
    alloc = torch.zeros if split_m > 1 else torch.empty
    da = alloc((R, K), device=x.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r), split_m)
    lora_da_kernel[grid](
        ds, x, da, M, K, R, m_bucket(M),
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1),
        *drop_args(seed, p, x.device),
        DA_ATOMIC=split_m > 1, HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype),
        LORA_PREC=dot_precision(lora_A.dtype, x.device), WIDE=wide_offsets(ds, x, da), BLOCK_R=block_r,
        ARCH=arch(x.device),
    )
    return da


# ------------------------------------------------------------------------------------------ the layer, two ways


def forward_with(t: Operands, call: Call, seed: Seed, base_gemm) -> tuple[torch.Tensor, torch.Tensor]:
    """S = dropout(x) Aᵀ by ``lora_down``, then ``base_gemm(S)`` → y with the rank-r term in it. Returns (y, S fp32).
    Shared by the dense paths here and the fused 4-bit path (``bnb4_triton``)."""
    x = t.x
    if x.numel() == 0 or t.lora_B.shape[0] == 0:  # a grid with a zero dimension is not a launch
        y, s = lora_torch.composed_forward(t, call, seed, keep(call.backend, seed, tuple(x.shape), call.p, x.device))
        return y, s.float()
    s = lora_down(x, t.lora_A, seed, call.p)
    return base_gemm(s), s


def backward_with(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
                  base_dx) -> tuple[torch.Tensor | None, ...]:
    """One pass over dY (dS, dB, dbias), ``base_dx(dS)`` → dX with m ⊙ (dS A) in it, dA. Returns (dX, dA fp32, dB fp32,
    dbias fp32), None where not needed."""
    x, s = t.x, saved[0]
    need_dx, need_da, need_db, need_dbias = needs
    if x.numel() == 0 or dy.numel() == 0:
        return lora_torch.composed_backward(t, call, saved, dy, needs, seed,
                                            keep(call.backend, seed, tuple(x.shape), call.p, x.device))
    dx = da = None
    ds, db, dbias = lora_dy_pass(dy, t.lora_B, s, call.scaling, need_dx or need_da, need_db, need_dbias)
    if need_dx:
        dx = base_dx(ds)
    if need_da:
        da = lora_da(ds, x, t.lora_A, seed, call.p)
    return dx, da, db, dbias


def fused_forward(t: Operands, call: Call, seed: Seed, keep_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense base (either layout), the fused path: two launches. Returns (y M×N in x's dtype, S M×r fp32)."""
    return forward_with(t, call, seed, lambda s: lora_forward(t.x, t.weight, t.bias, s, t.lora_B, call.scaling,
                                                              call.layout))


def fused_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
                   keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """Dense base, the fused path: at most three launches. Returns (dX, dA fp32, dB fp32, dbias fp32), None where not
    needed."""
    return backward_with(t, call, saved, dy, needs, seed,
                         lambda ds: lora_dx(dy, t.weight, ds, t.lora_A, call.layout, seed, call.p, t.x.dtype))


def composed_forward(t: Operands, call: Call, seed: Seed, keep_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) (the base's own GEMM: cuBLAS, bitsandbytes) + the rank-r term added in place: the base + 2
    launches. ``t.base``: the base object (a dense one for a dense weight when None)."""
    base = t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)
    return forward_with(t, call, seed, lambda s: lora_up_add(base.forward(t.x), s, t.lora_B, call.scaling))


def composed_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
                      keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """dX = the base's input gradient with m ⊙ (dS A) added in place; dA, dB, dbias as the fused path. 3 launches."""
    base = t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)
    return backward_with(t, call, saved, dy, needs, seed,
                         lambda ds: lora_dx_add(base.input_grad(dy, t.x.dtype), ds, t.lora_A, seed, call.p))


FUSED = Pass(fused_forward, fused_backward)  # the dense kind's fused path
COMPOSED = Pass(composed_forward, composed_backward)  # any base object's composed path
