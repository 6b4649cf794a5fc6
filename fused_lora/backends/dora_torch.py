"""DoRA on the PyTorch backend (CPU tensors, or anywhere it is forced, or a kernel cannot run): the dense kind's DoRA
PyTorch pass (``DENSE``). Its reference, ``dora_ref``, is in ``reference.py``.

    y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,     g = magnitude / ‖W + s·B A‖_row (detached)

The backend keeps what the kernels keep for backward (x, S = x_d Aᵀ, P = x_d Wᵀ + s·S Bᵀ, and the row norms, fp32):
no mask and no dropped copy of x; the mask is regenerated from the seed (``dropout.keep_mask``) in backward. P is the
M×N product the magnitude's gradient needs (Σ_rows dY ⊙ P / ‖·‖): keeping it is cheaper than a second base GEMM.
"""

from __future__ import annotations

import torch

from ..bases import Pass
from ..call import Call, Operands, Seed
from ..dropout import drop_scale, keep_mask
from ..reference import weight_nk
from .lora_torch import scaled_mm


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_layout: str) -> torch.Tensor:
    """‖W + s·B A‖ per output row (N), as PEFT's DoRA forward computes it (``DoraLinearLayer.get_lora_weight`` and
    ``get_weight_norm``, PEFT 0.21): the same ops in the same dtypes and layouts, so the same bits. B A is
    ``lora_B(lora_A(I))ᵀ`` in the adapters' dtype: ``lora_A(I) = I Aᵀ`` is Aᵀ exactly (one non-zero product per
    element), so it is formed as ``F.linear(Aᵀ, B)`` without the K×K identity; W is cast to the adapters' dtype; the
    norm is ``torch.linalg.norm`` over in_features, rounded to that dtype. An N×K temporary (the kernels form the sum
    tile by tile in registers). Returned in fp32 (exact), the quantity both backends save: then a magnitude initialised
    by PEFT's own computation (or ``reference.dora_weight_norm``, the same in the weight's dtype) gives g = m / ‖·‖ = 1
    exactly at init, as in PEFT."""
    ad = lora_A.dtype
    w = weight_nk(weight, weight_layout)  # out×in, a view for Conv1D (PEFT's transpose(weight, fan_in_fan_out))
    w_a = w if w.dtype == ad else w.to(ad)
    lora_weight = torch.nn.functional.linear(lora_A.t().contiguous(), lora_B).t()
    norm = torch.linalg.norm(w_a + scaling * lora_weight, dim=1).to(ad)
    return norm if norm.dtype == torch.float32 else norm.float()


def forward(t: Operands, call: Call, seed: Seed, keep: torch.Tensor | None = None, need_p: bool = True
            ) -> tuple[torch.Tensor, ...]:
    """Returns (y M×N in x's dtype, S M×r and P M×N in the adapters' dtype, the row norms N fp32: ``weight_norm``).
    ``keep``: a boolean keep mask to use instead of this backend's (the kernels' mask, when a kernel failed and this
    path stands in). Without ``need_p`` (the magnitude frozen: P serves only its gradient) P is not formed: an empty
    tensor.

    PEFT's computation (``DoraLinearVariant.forward``): result = base(x) = x Wᵀ + b by ``addmm`` (``nn.Linear``'s and
    ``Conv1D``'s own op), base_result = result − b (p = 0) or x_d Wᵀ in the adapters' dtype (p > 0), and

        y = result + (g − 1) ⊙ base_result + g ⊙ s·S Bᵀ,      P = base_result + s·S Bᵀ

    in fp32 (one rounding to x's dtype at the end); at p = 0 as y = g ⊙ result − (g − 1) ⊙ b + g ⊙ s·S Bᵀ, the same
    sum with no M×N base_result beside y when P is not wanted. At init (g = 1 exactly, B = 0) y is the base layer's
    output bit for bit either way, as PEFT's is. s·S Bᵀ enters y once, with g folded into B (an N×r product)."""
    x, weight, bias, lora_A, lora_B, magnitude = t.x, t.weight, t.bias, t.lora_A, t.lora_B, t.magnitude
    scaling, p, weight_layout = call.scaling, call.p, call.layout
    ad = lora_A.dtype
    norm = weight_norm(weight, lora_A, lora_B, scaling, weight_layout)
    g = magnitude.float() / norm
    w_t = weight_nk(weight, weight_layout).t()  # K×N view
    x_a = x if x.dtype == ad else x.to(ad)
    b_x = None if bias is None else (bias if bias.dtype == x.dtype else bias.to(x.dtype))
    result = x @ w_t if b_x is None else torch.addmm(b_x, x, w_t)
    P = None
    if p == 0:
        s = x_a @ lora_A.t()
        if need_p:  # base_result + s·S Bᵀ, before y takes result over
            P = result.to(ad, copy=True) if b_x is None else result - b_x
            P = P if P.dtype == ad else P.to(ad)
        y = result if result.dtype == torch.float32 else result.float()
        y.mul_(g)
        if b_x is not None:
            y.sub_((g - 1.0) * b_x)
    else:
        if keep is None:
            keep = keep_mask(seed, tuple(x.shape), p, x.device)
        xk = x_a * keep  # keep ⊙ x (NaN·0 stays NaN, as nn.Dropout); 1/(1-p) goes on the M×N and M×r products
        scale = drop_scale(p)
        w_ad = w_t if w_t.dtype == ad else w_t.to(ad)  # PEFT computes x_d Wᵀ in the adapters' dtype
        s = scaled_mm(xk, lora_A.t(), scale)
        base = scaled_mm(xk, w_ad, scale)  # x_d Wᵀ (an M×N transient even when P is not wanted)
        del xk
        y = result if result.dtype == torch.float32 else result.float()
        y.addcmul_(base, g - 1.0)
        if need_p:
            P = base
    if P is not None:
        P.addmm_(s, lora_B.t(), alpha=scaling)
    f32 = lambda t: t if t.dtype == torch.float32 else t.float()  # noqa: E731
    y.addmm_(f32(s), (f32(lora_B) * g[:, None]).t(), alpha=scaling)
    if P is None:
        P = x.new_empty(0, dtype=ad)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), s, P, norm


def backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dX, dA, dB, dbias fp32, d magnitude), None where not needed; g constant:

        dS = s·(g⊙dY) B    dB = s·(g⊙dY)ᵀ S    dA = dSᵀ x_d    db = Σ dY    dmag = Σ_rows dY ⊙ P / ‖·‖
        dX = (g⊙dY) W + dS A                     (p = 0)
        dX = dY W + m ⊙ (((g − 1)⊙dY) W + dS A)  (p > 0)

    g scales the small B and dB instead of dY (no M×N temporary for them); 1/(1-p) is folded into dS and (g − 1).
    ``saved``: the forward's (S, P, the row norms)."""
    x, weight, lora_A, lora_B, magnitude = t.x, t.weight, t.lora_A, t.lora_B, t.magnitude
    s, P, norm = saved
    scaling, p, weight_layout = call.scaling, call.p, call.layout
    need_dx, need_da, need_db, need_dbias, need_dmag = needs
    ad = lora_B.dtype
    g = magnitude.float() / norm  # the forward's g, bit for bit
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


DENSE = Pass(forward, backward)  # the dense kind's DoRA PyTorch path
