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
from .fast_launch import LaunchSite
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
    plan_drop,
    rank_block,
    remember,
    skinny_rank_block,
    split_factor,
    tf32_state,
    unused,
    weight_strides,
    wide_offsets,
)

__all__ = ["COMPOSED", "FUSED", "composed_backward", "composed_forward", "fused_backward", "fused_forward", "lora_da",
           "lora_down", "lora_dx", "lora_dx_add", "lora_dy_pass", "lora_forward", "lora_up_add"]


_down_plans: dict[tuple, Plan] = {}
_forward_plans: dict[tuple, Plan] = {}
_up_add_plans: dict[tuple, Plan] = {}
_dy_plans: dict[tuple, Plan] = {}
_dx_plans: dict[tuple, Plan] = {}
_dx_add_plans: dict[tuple, Plan] = {}
_da_plans: dict[tuple, Plan] = {}


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: Seed, p: float, split_k: int | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ in fp32 (M×r). ``split_k`` slices of K (default: enough to fill the GPU when the row tiles
    alone do not), summed in a fixed order."""
    device, a_dtype = x.device, lora_A.dtype
    key = (x.shape, x.stride(), lora_A.shape, lora_A.stride(), x.dtype, a_dtype, device, p, split_k, arch(device),
           tf32_state() if a_dtype is F32 else None, split_factor)
    plan = _down_plans.get(key)
    if plan is None:
        plan = remember(_down_plans, key, _down_plan(x, lora_A, p, split_k, key[-2]))
    out = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=torch.float32)
    plan.site.launch(lora_down_kernel, (x, lora_A, out, *plan.ints, *(plan.drop or drop_args(seed, p, device))))
    return out.sum(0) if plan.split > 1 else out


def _down_plan(x: torch.Tensor, lora_A: torch.Tensor, p: float, split_k: int | None, tf32: bool | None) -> Plan:
    M, K = x.shape
    R = lora_A.shape[0]
    device = x.device
    block_r = skinny_rank_block(R, device)
    if split_k is None:
        split_k = split_factor(cdiv(M, 64) * cdiv(R, block_r), cdiv(K, 256), device, cap=8)
    shape = (split_k, M, R) if split_k > 1 else (M, R)
    out = Fresh(shape)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_k)
    site = LaunchSite(grid, dict(
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(x, lora_A, out), BLOCK_R=block_r, ARCH=arch(device)), device)
    ints = (M, K, R, m_bucket(M), *x.stride(), *lora_A.stride(), out.stride(-2), out.stride(-1),
            out.stride(0) if split_k > 1 else 0)
    return Plan(site, ints, shape, split_k, plan_drop(p, device))


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, weight_layout: str,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N), one Triton GEMM."""
    device, x_dtype, b_dtype = x.device, x.dtype, lora_B.dtype
    key = (x.shape, x.stride(), weight.shape, weight.stride(), weight.dtype,
           None if bias is None else (bias.shape, bias.stride(), bias.dtype), s.shape, s.stride(), s.dtype,
           lora_B.shape, lora_B.stride(), x_dtype, b_dtype, device, weight_layout, arch(device),
           tf32_state() if x_dtype is F32 or b_dtype is F32 else None)
    plan = _forward_plans.get(key)
    if plan is None:
        plan = remember(_forward_plans, key, _forward_plan(x, weight, bias, s, lora_B, weight_layout, key[-1]))
    y = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=x_dtype)
    plan.site.launch(lora_fwd_kernel, (x, weight, plan.nothing if bias is None else bias, s, lora_B, y, *plan.ints,
                                       scaling))
    return y


def _forward_plan(x, weight, bias, s, lora_B, weight_layout: str, tf32: bool | None) -> Plan:
    M, K = x.shape
    N, R = lora_B.shape
    device = x.device
    nothing = unused(device)
    bias_arg = bias if bias is not None else nothing
    y = Fresh((M, N))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        HAS_BIAS=bias is not None, BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, device, tf32),
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(x, weight, bias_arg, s, lora_B, y), BLOCK_R=rank_block(R, lora_B.dtype),
        ARCH=arch(device)), device)
    ints = (M, N, K, R, m_bucket(M), *x.stride(), *weight_strides(weight, weight_layout), *s.stride(),
            *lora_B.stride(), *y.stride(), bias_arg.stride(0))
    return Plan(site, ints, (M, N), nothing=nothing)


def lora_up_add(y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y += scaling · S Bᵀ in place (y: the base layer's M×N output); returns y."""
    device, b_dtype = y.device, lora_B.dtype
    key = (y.shape, y.stride(), y.dtype, s.shape, s.stride(), s.dtype, lora_B.shape, lora_B.stride(), b_dtype, device,
           arch(device), tf32_state() if b_dtype is F32 else None)
    plan = _up_add_plans.get(key)
    if plan is None:
        plan = remember(_up_add_plans, key, _up_add_plan(y, s, lora_B, key[-1]))
    plan.site.launch(lora_up_add_kernel, (y, s, lora_B, *plan.ints, scaling))
    return y


def _up_add_plan(y, s, lora_B, tf32: bool | None) -> Plan:
    M, N = y.shape
    R = lora_B.shape[1]
    device = y.device
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))
    site = LaunchSite(grid, dict(
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(y, s, lora_B), BLOCK_R=rank_block(R, lora_B.dtype, device), ARCH=arch(device)), device)
    return Plan(site, (M, N, R, m_bucket(M), *y.stride(), *s.stride(), *lora_B.stride()))


def lora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
    need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N), each None when not needed."""
    device, b_dtype = dy.device, lora_B.dtype
    key = (dy.shape, dy.stride(), dy.dtype, lora_B.shape, lora_B.stride(), b_dtype, s.shape, s.stride(), s.dtype,
           device, need_ds, need_db, need_dbias, split_n, arch(device), tf32_state() if b_dtype is F32 else None,
           split_factor)
    plan = _dy_plans.get(key)
    if plan is None:
        plan = remember(_dy_plans, key, _dy_plan(dy, lora_B, s, need_ds, need_db, need_dbias, split_n, key[-2]))
    M, N, R = plan.shape
    nothing = plan.nothing
    if not need_ds:
        ds = nothing
    elif plan.split > 1:  # atomics
        ds = torch.zeros((M, R), device=device, dtype=torch.float32)
    else:
        ds = torch.empty_strided((M, R), (R, 1), device=device, dtype=torch.float32)
    db = torch.zeros((N, R), device=device, dtype=torch.float32) if need_db else nothing
    dbias = torch.zeros((N,), device=device, dtype=torch.float32) if need_dbias else nothing
    plan.site.launch(lora_dy_kernel, (dy, lora_B, s, ds, db, dbias, *plan.ints, scaling))
    return (ds if need_ds else None), (db if need_db else None), (dbias if need_dbias else None)


def _dy_plan(dy, lora_B, s, need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None,
             tf32: bool | None) -> Plan:
    M, N = dy.shape
    R = lora_B.shape[1]
    device = dy.device
    block_r = skinny_rank_block(R, device)
    if split_n is None:
        split_n = split_factor(cdiv(M, 64) * cdiv(R, block_r), cdiv(N, 128), device)
    nothing = unused(device)
    ds = Fresh((M, R)) if need_ds else nothing
    db = Fresh((N, R)) if need_db else nothing
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r), split_n)
    site = LaunchSite(grid, dict(
        DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(dy, lora_B, s, ds, db), BLOCK_R=block_r, ARCH=arch(device)), device)
    ints = (M, N, R, m_bucket(M), *dy.stride(), *lora_B.stride(), *s.stride(),
            *(ds.stride() if need_ds else (1, 1)), *(db.stride() if need_db else (1, 1)))
    return Plan(site, ints, (M, N, R), split_n, nothing=nothing)


def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
    weight_layout: str, seed: Seed, p: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``), one Triton GEMM."""
    device, dy_dtype, a_dtype = dy.device, dy.dtype, lora_A.dtype
    key = (dy.shape, dy.stride(), weight.shape, weight.stride(), weight.dtype, ds.shape, ds.stride(), ds.dtype,
           lora_A.shape, lora_A.stride(), dy_dtype, a_dtype, device, weight_layout, p, out_dtype, arch(device),
           tf32_state() if dy_dtype is F32 or a_dtype is F32 else None)
    plan = _dx_plans.get(key)
    if plan is None:
        plan = remember(_dx_plans, key, _dx_plan(dy, weight, ds, lora_A, weight_layout, p, out_dtype, key[-1]))
    dx = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=out_dtype)
    plan.site.launch(lora_dx_kernel, (dy, weight, ds, lora_A, dx, *plan.ints,
                                      *(plan.drop or drop_args(seed, p, device))))
    return dx


def _dx_plan(dy, weight, ds, lora_A, weight_layout: str, p: float, out_dtype: torch.dtype,
             tf32: bool | None) -> Plan:
    M, N = dy.shape
    R, K = lora_A.shape
    device = dy.device
    dx = Fresh((M, K))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        HAS_DROPOUT=p > 0, BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, device, tf32),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(dy, weight, ds, lora_A, dx), BLOCK_R=rank_block(R, lora_A.dtype), ARCH=arch(device)),
        device)
    ints = (M, N, K, R, m_bucket(M), *dy.stride(), *weight_strides(weight, weight_layout), *ds.stride(),
            *lora_A.stride(), *dx.stride())
    return Plan(site, ints, (M, K), drop=plan_drop(p, device))


def lora_dx_add(dx: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, seed: Seed, p: float) -> torch.Tensor:
    """dX += m ⊙ (dS A) in place (dX: the base layer's input gradient, M×K); returns dX."""
    device, a_dtype = dx.device, lora_A.dtype
    key = (dx.shape, dx.stride(), dx.dtype, ds.shape, ds.stride(), ds.dtype, lora_A.shape, lora_A.stride(), a_dtype,
           device, p, arch(device), tf32_state() if a_dtype is F32 else None)
    plan = _dx_add_plans.get(key)
    if plan is None:
        plan = remember(_dx_add_plans, key, _dx_add_plan(dx, ds, lora_A, p, key[-1]))
    plan.site.launch(lora_dx_add_kernel, (dx, ds, lora_A, *plan.ints, *(plan.drop or drop_args(seed, p, device))))
    return dx


def _dx_add_plan(dx, ds, lora_A, p: float, tf32: bool | None) -> Plan:
    M, K = dx.shape
    R = lora_A.shape[0]
    device = dx.device
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(K, meta["BLOCK_N"]))
    site = LaunchSite(grid, dict(
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(dx, ds, lora_A), BLOCK_R=rank_block(R, lora_A.dtype, device), ARCH=arch(device)), device)
    ints = (M, K, R, m_bucket(M), *dx.stride(), *ds.stride(), *lora_A.stride())
    return Plan(site, ints, drop=plan_drop(p, device))


def lora_da(
    ds: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, seed: Seed, p: float,
    split_m: int | None = None,
) -> torch.Tensor:
    """dA = dSᵀ (m ⊙ x) in fp32 (r×K)."""
    device, a_dtype = x.device, lora_A.dtype
    key = (ds.shape, ds.stride(), ds.dtype, x.shape, x.stride(), x.dtype, lora_A.shape, a_dtype, device, p, split_m,
           arch(device), tf32_state() if a_dtype is F32 else None, split_factor)
    plan = _da_plans.get(key)
    if plan is None:
        plan = remember(_da_plans, key, _da_plan(ds, x, lora_A, p, split_m, key[-2]))
    if plan.split > 1:  # atomics
        da = torch.zeros(plan.shape, device=device, dtype=torch.float32)
    else:
        da = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=torch.float32)
    plan.site.launch(lora_da_kernel, (ds, x, da, *plan.ints, *(plan.drop or drop_args(seed, p, device))))
    return da


def _da_plan(ds, x, lora_A, p: float, split_m: int | None, tf32: bool | None) -> Plan:
    M, K = x.shape
    R = lora_A.shape[0]
    device = x.device
    block_r = skinny_rank_block(R, device)
    if split_m is None:
        split_m = split_factor(cdiv(K, 64) * cdiv(R, block_r), cdiv(M, 128), device)
    da = Fresh((R, K))
    grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r), split_m)
    site = LaunchSite(grid, dict(
        DA_ATOMIC=split_m > 1, HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype),
        LORA_PREC=dot_precision(lora_A.dtype, device, tf32), WIDE=wide_offsets(ds, x, da), BLOCK_R=block_r,
        ARCH=arch(device)), device)
    ints = (M, K, R, m_bucket(M), *ds.stride(), *x.stride(), *da.stride())
    return Plan(site, ints, (R, K), split_m, plan_drop(p, device))


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
