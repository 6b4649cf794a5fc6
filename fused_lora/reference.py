"""Plain PyTorch reference for the fused LoRA linear layer.

    y = x Wᵀ + b + s · (m ⊙ x) Aᵀ Bᵀ

This is the definition every backend is tested against. It is written with eager autograd ops and
no tricks, so its gradients are the ground truth (computed in fp64 with ``upcast=torch.float64``).
"""

from __future__ import annotations

import torch


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_layout: str = "linear",
    *,
    dropout_mask: torch.Tensor | None = None,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference LoRA linear layer, same signature as :func:`fused_lora.fused_lora_linear`.

    ``dropout_mask`` is the *scaled* keep mask (values 0 or 1/(1-p)) of x's shape; pass the mask a
    backend used (``fused_lora.dropout_mask``) to compare gradients exactly. Without it, dropout is drawn
    with ``torch.nn.functional.dropout`` when ``training and dropout_p > 0``.

    ``upcast`` computes everything in that dtype (fp64 for the ground truth, fp32 for a "what an fp32
    framework would do" reference) and returns the result in that dtype. Without it the computation
    follows PEFT's dtype rules: the base GEMM in x's dtype, the LoRA branch in the adapters' dtype,
    the output in x's dtype.
    """
    out_dtype = x.dtype
    if upcast is not None:
        x, weight, lora_A, lora_B = (t.to(upcast) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(upcast) if bias is not None else None
        out_dtype = upcast
    w = weight if weight_layout == "linear" else weight.t()
    base = torch.nn.functional.linear(x, w.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    xa = x.to(lora_A.dtype)
    if dropout_mask is not None:
        xa = xa * dropout_mask.to(xa.dtype)
    elif training and dropout_p > 0:
        xa = torch.nn.functional.dropout(xa, dropout_p, training=True)
    lora = (xa @ lora_A.t()) @ lora_B.t()
    return (base + (lora * scaling).to(base.dtype)).to(out_dtype)
