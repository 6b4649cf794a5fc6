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
from .fast_launch import LaunchSite
from .lora_triton import lora_da, lora_down, lora_dx
from .masks import keep
from .triton_launch import (
    F32,
    Fresh,
    Plan,
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    drop_args,
    rank_block,
    remember,
    split_factor,
    tf32_state,
    unused,
    weight_strides,
    wide_offsets,
)

_norm_plans: dict[tuple, Plan] = {}
_down_plans: dict[tuple, Plan] = {}
_forward_plans: dict[tuple, Plan] = {}
_dy_plans: dict[tuple, Plan] = {}
_dx_plans: dict[tuple, Plan] = {}


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              weight_layout: str, split_k: int | None = None) -> torch.Tensor:
    """‖W + scaling·B A‖ per output row, fp32 (N), without B A in memory: the squares summed in fp32 and the
    IEEE-rounded root. ``split_k`` slices of K (default: enough to fill the GPU when the row tiles alone do not), each
    slice's partial sums stored apart and summed here in a fixed order, then rooted (torch.sqrt: IEEE), no atomics:
    the same bits run after run."""
    device, a_dtype = weight.device, lora_A.dtype
    key = (weight.shape, weight.stride(), weight.dtype, lora_A.shape, lora_A.stride(), a_dtype, lora_B.shape,
           lora_B.stride(), lora_B.dtype, device, weight_layout, split_k, arch(device),
           tf32_state() if a_dtype is F32 else None, split_factor)
    plan = _norm_plans.get(key)
    if plan is None:
        plan = remember(_norm_plans, key, _norm_plan(weight, lora_A, lora_B, weight_layout, split_k, key[-2]))
    out = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=torch.float32)
    plan.site.launch(dora_norm_kernel, (weight, lora_A, lora_B, out, *plan.ints, scaling))
    return out.sum(0).sqrt_() if plan.split > 1 else out[0]


def _norm_plan(weight, lora_A, lora_B, weight_layout: str, split_k: int | None, tf32: bool | None) -> Plan:
    N, R = lora_B.shape
    K = lora_A.shape[1]
    device = weight.device
    if split_k is None:
        split_k = split_factor(cdiv(N, 64), cdiv(K, 256), device)
    out = Fresh((split_k, N))
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), split_k)
    site = LaunchSite(grid, dict(
        ROOT=split_k == 1, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(weight, lora_A, lora_B, out), BLOCK_R=rank_block(R, lora_A.dtype), ARCH=arch(device)),
        device)
    ints = (N, K, R, *weight_strides(weight, weight_layout), *lora_A.stride(), *lora_B.stride())
    return Plan(site, ints, (split_k, N), split_k)


def dora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: Seed, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S = dropout(x) Aᵀ fp32 M×r, x_d = keep ⊙ x in x's dtype M×K, unscaled) for p > 0."""
    device, a_dtype = x.device, lora_A.dtype
    key = (x.shape, x.stride(), x.dtype, lora_A.shape, lora_A.stride(), a_dtype, device, p, arch(device),
           tf32_state() if a_dtype is F32 else None)
    plan = _down_plans.get(key)
    if plan is None:
        plan = remember(_down_plans, key, _down_plan(x, lora_A, key[-1]))
    M, K, R = plan.shape
    s = torch.empty_strided((M, R), (R, 1), device=device, dtype=torch.float32)
    xd = torch.empty_strided((M, K), (K, 1), device=device, dtype=x.dtype)
    plan.site.launch(dora_down_kernel, (x, lora_A, s, xd, *plan.ints, *drop_args(seed, p, device)))
    return s, xd


def _down_plan(x, lora_A, tf32: bool | None) -> Plan:
    M, K = x.shape
    R = lora_A.shape[0]
    device = x.device
    s, xd = Fresh((M, R)), Fresh((M, K))
    block_r = rank_block(R, lora_A.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r))
    site = LaunchSite(grid, dict(
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(x, lora_A, s, xd), BLOCK_R=block_r, ARCH=arch(device)), device)
    ints = (M, K, R, m_bucket(M), *x.stride(), *lora_A.stride(), *s.stride(), *xd.stride())
    return Plan(site, ints, (M, K, R))


def dora_forward_gemm(
    x: torch.Tensor, xd: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, norm: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, weight_layout: str,
    need_p: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y M×N in x's dtype, P = x_d Wᵀ + s·S Bᵀ M×N in the adapters' dtype), one Triton GEMM; ``xd`` (keep ⊙ x) when
    p > 0, else None. Without ``need_p`` (a frozen magnitude) P is neither allocated nor written: an empty tensor."""
    device, x_dtype, b_dtype = x.device, x.dtype, lora_B.dtype
    key = (x.shape, x.stride(), None if xd is None else (xd.shape, xd.stride(), xd.dtype), weight.shape,
           weight.stride(), weight.dtype, None if bias is None else (bias.shape, bias.stride(), bias.dtype), s.shape,
           s.stride(), s.dtype, lora_B.shape, lora_B.stride(), norm.shape, norm.stride(), norm.dtype, magnitude.shape,
           magnitude.stride(), magnitude.dtype, x_dtype, b_dtype, device, p, weight_layout, need_p, arch(device),
           tf32_state() if x_dtype is F32 or b_dtype is F32 else None)
    plan = _forward_plans.get(key)
    if plan is None:
        plan = remember(_forward_plans, key, _forward_plan(x, xd, weight, bias, s, lora_B, magnitude, p,
                                                           weight_layout, need_p, key[-1]))
    M, N = plan.shape
    nothing = plan.nothing
    y = torch.empty_strided((M, N), (N, 1), device=device, dtype=x_dtype)
    P = torch.empty_strided((M, N), (N, 1), device=device, dtype=b_dtype) if need_p else torch.empty(
        (0,), device=device, dtype=b_dtype)
    plan.site.launch(dora_fwd_kernel, (x, x if xd is None else xd, weight, nothing if bias is None else bias, s,
                                       lora_B, norm, magnitude, y, P if need_p else nothing, *plan.ints, scaling,
                                       plan.extra))
    return y, P


def _forward_plan(x, xd, weight, bias, s, lora_B, magnitude, p: float, weight_layout: str, need_p: bool,
                  tf32: bool | None) -> Plan:
    M, K = x.shape
    N, R = lora_B.shape
    device = x.device
    nothing = unused(device)
    y = Fresh((M, N))
    p_arg = Fresh((M, N)) if need_p else nothing
    bias_arg = bias if bias is not None else nothing
    xd_arg = xd if xd is not None else x  # not read without dropout (HAS_DROPOUT off): x's strides keep the variant
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, WRITE_P=need_p, BASE_DOT=dot_dtype(x.dtype),
        BASE_PREC=dot_precision(x.dtype, device, tf32), LORA_DOT=dot_dtype(lora_B.dtype),
        LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(x, xd_arg, weight, bias_arg, s, lora_B, y, p_arg), BLOCK_R=rank_block(R, lora_B.dtype),
        ARCH=arch(device)), device)
    ints = (M, N, K, R, m_bucket(M), *x.stride(), *xd_arg.stride(), *weight_strides(weight, weight_layout),
            *s.stride(), *lora_B.stride(), *y.stride(), *(p_arg.stride() if need_p else (1, 1)), bias_arg.stride(0),
            magnitude.stride(0))
    return Plan(site, ints, (M, N), nothing=nothing, extra=drop_scale(p))


def dora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, P: torch.Tensor, norm: torch.Tensor,
    magnitude: torch.Tensor, scaling: float, need_ds: bool, need_db: bool, need_dbias: bool, need_dmag: bool,
    write_g: bool, g_minus_one: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N, d magnitude fp32 N, G M×N in dY's dtype), each None
    when not needed. G = g⊙dY, or (g − 1)⊙dY with ``g_minus_one``."""
    device, b_dtype = dy.device, lora_B.dtype
    key = (dy.shape, dy.stride(), dy.dtype, lora_B.shape, lora_B.stride(), b_dtype, s.shape, s.stride(), s.dtype,
           (P.shape, P.stride(), P.dtype) if need_dmag else None, norm.shape, norm.stride(), norm.dtype,
           magnitude.shape, magnitude.stride(), magnitude.dtype, device, need_ds, need_db, need_dbias, need_dmag,
           write_g, g_minus_one, split_n, arch(device), tf32_state() if b_dtype is F32 else None, split_factor)
    plan = _dy_plans.get(key)
    if plan is None:
        plan = remember(_dy_plans, key, _dy_plan(dy, lora_B, s, P, magnitude, need_ds, need_db, need_dbias, need_dmag,
                                                 write_g, g_minus_one, split_n, key[-2]))
    M, N, R = plan.shape
    f32 = torch.float32
    nothing = plan.nothing
    if not need_ds:
        ds = nothing
    elif plan.split > 1:  # atomics
        ds = torch.zeros((M, R), device=device, dtype=f32)
    else:
        ds = torch.empty_strided((M, R), (R, 1), device=device, dtype=f32)
    db = torch.zeros((N, R), device=device, dtype=f32) if need_db else nothing
    dbias = torch.zeros((N,), device=device, dtype=f32) if need_dbias else nothing
    dmag = torch.zeros((N,), device=device, dtype=f32) if need_dmag else nothing
    g = torch.empty_strided((M, N), (N, 1), device=device, dtype=dy.dtype) if write_g else nothing
    plan.site.launch(dora_dy_kernel, (dy, lora_B, s, P if need_dmag else nothing, norm, magnitude, ds, db, dbias,
                                      dmag, g, *plan.ints, scaling))
    return tuple(t if on else None for t, on in ((ds, need_ds), (db, need_db), (dbias, need_dbias),
                                                 (dmag, need_dmag), (g, write_g)))


def _dy_plan(dy, lora_B, s, P, magnitude, need_ds: bool, need_db: bool, need_dbias: bool, need_dmag: bool,
             write_g: bool, g_minus_one: bool, split_n: int | None, tf32: bool | None) -> Plan:
    M, N = dy.shape
    R = lora_B.shape[1]
    device = dy.device
    block_r = rank_block(R, lora_B.dtype)
    if split_n is None:
        split_n = split_factor(cdiv(M, 64) * cdiv(R, block_r), cdiv(N, 128), device)
    nothing = unused(device)
    ds = Fresh((M, R)) if need_ds else nothing
    db = Fresh((N, R)) if need_db else nothing
    g = Fresh((M, N)) if write_g else nothing
    p_arg = P if need_dmag else nothing  # (P is an empty placeholder when the magnitude is frozen)
    strides = lambda t, on: t.stride() if on else (1, 1)  # noqa: E731
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_n)
    site = LaunchSite(grid, dict(
        DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db, NEED_DMAG=need_dmag,
        WRITE_G=write_g, G_MINUS_ONE=g_minus_one,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(dy, lora_B, s, p_arg, ds, db, g), BLOCK_R=block_r, ARCH=arch(device)), device)
    ints = (M, N, R, m_bucket(M), *dy.stride(), *lora_B.stride(), *s.stride(), *strides(P, need_dmag),
            magnitude.stride(0), *strides(ds, need_ds), *strides(db, need_db), *strides(g, write_g))
    return Plan(site, ints, (M, N, R), split_n, nothing=nothing)


def dora_dx(dy: torch.Tensor, gm: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
            weight_layout: str, seed: Seed, p: float, out_dtype: torch.dtype) -> torch.Tensor:
    """dX = dY W + m ⊙ (G W + dS A), G = (g − 1)⊙dY (M×K, ``out_dtype``), one Triton GEMM."""
    device, dy_dtype, a_dtype = dy.device, dy.dtype, lora_A.dtype
    key = (dy.shape, dy.stride(), gm.shape, gm.stride(), gm.dtype, weight.shape, weight.stride(), weight.dtype,
           ds.shape, ds.stride(), ds.dtype, lora_A.shape, lora_A.stride(), dy_dtype, a_dtype, device, weight_layout, p,
           out_dtype, arch(device), tf32_state() if dy_dtype is F32 or a_dtype is F32 else None)
    plan = _dx_plans.get(key)
    if plan is None:
        plan = remember(_dx_plans, key, _dx_plan(dy, gm, weight, ds, lora_A, weight_layout, out_dtype, key[-1]))
    dx = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=out_dtype)
    plan.site.launch(dora_dx_kernel, (dy, gm, weight, ds, lora_A, dx, *plan.ints, *drop_args(seed, p, device)))
    return dx


def _dx_plan(dy, gm, weight, ds, lora_A, weight_layout: str, out_dtype: torch.dtype, tf32: bool | None) -> Plan:
    M, N = dy.shape
    R, K = lora_A.shape
    device = dy.device
    dx = Fresh((M, K))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, device, tf32),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(dy, gm, weight, ds, lora_A, dx), BLOCK_R=rank_block(R, lora_A.dtype), ARCH=arch(device)),
        device)
    ints = (M, N, K, R, m_bucket(M), *dy.stride(), *gm.stride(), *weight_strides(weight, weight_layout),
            *ds.stride(), *lora_A.stride(), *dx.stride())
    return Plan(site, ints, (M, K))


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
