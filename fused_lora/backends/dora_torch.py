"""DoRA on the PyTorch backend of :class:`fused_lora.autograd.dora.DoRALinearFunction` (CPU tensors, or anywhere it is
forced, or a kernel cannot run). Its reference, ``dora_ref``, is in ``reference.py``.

    y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,     g = magnitude / ‖W + s·B A‖_row (detached)

The backend keeps what the kernels keep for backward (x, S = x_d Aᵀ, P = x_d Wᵀ + s·S Bᵀ, and the squared row norms):
no mask and no dropped copy of x; the mask is regenerated from the seed (``dropout.keep_mask``) in backward. P is the
M×N product the magnitude's gradient needs (Σ_rows dY ⊙ P / ‖·‖): keeping it is cheaper than a second base GEMM.
"""

from __future__ import annotations

import torch

from ..dropout import drop_scale, keep_mask
from ..reference import weight_nk
from .lora_torch import scaled_mm


def norm_sq(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
            weight_layout: str) -> torch.Tensor:
    """‖W + s·B A‖² per output row, fp32 (N). B A is formed in fp32 (an N×K temporary; the kernels form it tile by
    tile in registers)."""
    w = weight_nk(weight, weight_layout)
    v = torch.addmm(w.float(), lora_B.float(), lora_A.float(), alpha=scaling)
    return v.mul_(v).sum(1)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
            lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
            *, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Returns (y M×N in x's dtype, S M×r and P M×N in the adapters' dtype, sq N fp32). ``keep``: a boolean keep mask to
    use instead of this backend's (the kernels' mask, when a kernel failed and this path stands in)."""
    ad = lora_A.dtype
    sq = norm_sq(weight, lora_A, lora_B, scaling, weight_layout)
    g = magnitude.float() / sq.sqrt()
    w_t = weight_nk(weight, weight_layout).t()  # K×N view
    x_a = x if x.dtype == ad else x.to(ad)
    if p == 0:
        s = x_a @ lora_A.t()
        base = x @ w_t
        P = base if base.dtype == ad else base.to(ad)
        P.addmm_(s, lora_B.t(), alpha=scaling)
        y = P * g  # fp32 for half P: one rounding to x's dtype below
        if bias is not None:
            y += bias
        return (y if y.dtype == x.dtype else y.to(x.dtype)), s, P, sq
    if keep is None:
        keep = keep_mask(seed, tuple(x.shape), p, x.device)
    xk = x_a * keep  # keep ⊙ x (NaN·0 stays NaN, as nn.Dropout); 1/(1-p) goes on the M×N and M×r products
    scale = drop_scale(p)
    w_ad = w_t if w_t.dtype == ad else w_t.to(ad)  # PEFT computes x_d Wᵀ in the adapters' dtype too
    s = scaled_mm(xk, lora_A.t(), scale)
    P = scaled_mm(xk, w_ad, scale)
    del xk
    # y = x Wᵀ + b + (g − 1) ⊙ x_d Wᵀ + g ⊙ s·S Bᵀ = (x Wᵀ − x_d Wᵀ) + g ⊙ P + b, with T = s·S Bᵀ only in P (the
    # kernels' epilogue, and why: kernels/dora.py)
    y = x @ w_t
    if y.dtype != ad:
        y = y.to(ad)
    y.sub_(P)
    P.addmm_(s, lora_B.t(), alpha=scaling)  # x_d Wᵀ + s·S Bᵀ
    y.addcmul_(P, g if y.dtype == torch.float32 else g.to(y.dtype))
    if bias is not None:
        y += bias
    return (y if y.dtype == x.dtype else y.to(x.dtype)), s, P, sq


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             magnitude: torch.Tensor, s: torch.Tensor, P: torch.Tensor, sq: torch.Tensor, scaling: float, p: float,
             seed: int, weight_layout: str, need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
             need_dmag: bool, *, keep: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dX, dA, dB, dbias fp32, d magnitude), None where not needed; g constant:

        dS = s·(g⊙dY) B    dB = s·(g⊙dY)ᵀ S    dA = dSᵀ x_d    db = Σ dY    dmag = Σ_rows dY ⊙ P / ‖·‖
        dX = (g⊙dY) W + dS A                     (p = 0)
        dX = dY W + m ⊙ (((g − 1)⊙dY) W + dS A)  (p > 0)

    g scales the small B and dB instead of dY (no M×N temporary for them); 1/(1-p) is folded into dS and (g − 1)."""
    ad = lora_B.dtype
    norm = sq.sqrt()
    g = magnitude.float() / norm
    g_ad = g if ad == torch.float32 else g.to(ad)
    dy_a = dy if dy.dtype == ad else dy.to(ad)
    drop = drop_scale(p) if p > 0 else 1.0
    dx = da = db = dbias = dmag = None
    if need_db:
        db = (dy_a.t() @ (s if s.dtype == ad else s.to(ad))).mul_((scaling * g_ad)[:, None])
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    if need_dmag:
        dmag = (dy_a * (P if P.dtype == ad else P.to(ad))).sum(0, dtype=torch.float32).div_(norm)
        dmag = dmag if dmag.dtype == magnitude.dtype else dmag.to(magnitude.dtype)
    if not (need_dx or need_da):
        return dx, da, db, dbias, dmag
    ds = scaled_mm(dy_a, lora_B * g_ad[:, None], scaling * drop)
    if p > 0 and keep is None:
        keep = keep_mask(seed, tuple(x.shape), p, x.device)
    if need_da:
        x_a = x if x.dtype == ad else x.to(ad)
        da = ds.t() @ (x_a if p == 0 else x_a * keep)
    if need_dx:
        w = weight_nk(weight, weight_layout)  # N×K
        lora_dx = ds @ lora_A
        if lora_dx.dtype != dy.dtype:
            lora_dx = lora_dx.to(dy.dtype)
        if p == 0:
            dx = torch.addmm(lora_dx, (dy.float() * g).to(dy.dtype), w)
        else:
            branch = torch.addmm(lora_dx, (dy.float() * ((g - 1.0) * drop)).to(dy.dtype), w)
            dx = (dy @ w).addcmul_(branch, keep)
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
    return dx, da, db, dbias, dmag
