"""The pure-PyTorch backend: same semantics as the Triton kernels, for CPU tensors (and anywhere a
user forces it).

Like the kernels it keeps no M×K tensor beside x for backward: the dropout mask is regenerated from a
seeded ``torch.Generator`` in backward (once, shared by dX and dA) instead of saving the mask or the
dropped copy of x as PEFT does. The base GEMM and the rank-r update are chained with in-place
``addmm_`` so y is written once when the adapters share x's dtype.
"""

from __future__ import annotations

import torch


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The scaled keep mask (fp32, 0 or 1/(1-p)) this backend uses for ``seed``; M×K."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    mask = torch.empty(shape, device=device, dtype=torch.float32)
    return mask.bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


def _dropped(x: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    if p == 0:
        return x
    return x * dropout_mask(seed, tuple(x.shape), p, x.device).to(dtype)


def _base_weight(weight: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """Wᵀ (K×N) as a view: ``x @ _base_weight(...)`` is the base layer's GEMM."""
    return weight.t() if weight_layout == "linear" else weight


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y M×N in x's dtype, S = dropout(x) Aᵀ M×r in the adapters' dtype)."""
    w_t = _base_weight(weight, weight_layout)
    y = torch.addmm(bias.to(x.dtype), x, w_t) if bias is not None else x @ w_t
    s = _dropped(x, seed, p, lora_A.dtype) @ lora_A.t()
    if lora_B.dtype == y.dtype:
        y.addmm_(s, lora_B.t(), alpha=scaling)
    else:  # fp32 adapters on a half base: the update is computed in fp32, then rounded once (as PEFT)
        y.add_((s @ lora_B.t()).mul_(scaling).to(y.dtype))
    return y, s


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Returns (dX, dA, dB, dbias), None where not needed."""
    dx = da = db = dbias = None
    dy_lora = dy.to(lora_B.dtype)
    if need_db:
        db = (dy_lora.t() @ s.to(lora_B.dtype)).mul_(scaling)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    if not (need_dx or need_da):
        return dx, da, db, dbias
    ds = (dy_lora @ lora_B).mul_(scaling)
    mask = dropout_mask(seed, tuple(x.shape), p, x.device) if p > 0 else None
    if need_da:
        x_d = x.to(lora_A.dtype) if mask is None else x.to(lora_A.dtype) * mask.to(lora_A.dtype)
        da = ds.t() @ x_d
    if need_dx:
        w_t = _base_weight(weight, weight_layout)
        dx = dy @ w_t.t()
        if mask is None and lora_A.dtype == dx.dtype:
            dx.addmm_(ds, lora_A)
        else:
            update = ds @ lora_A
            if mask is not None:
                update.mul_(mask.to(update.dtype))
            dx.add_(update.to(dx.dtype))
    return dx, da, db, dbias
