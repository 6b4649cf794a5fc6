"""The functional API: ``fused_lora_linear`` (checked inputs, then the router) and ``dropout_mask``.

    y = x Wᵀ + b + scaling · B A dropout(x)            (DoRA with ``magnitude=``)

Every autograd mode works: ``backward(create_graph=True)`` takes a differentiable backward made of plain ops
(same mask); under torch.func transforms (grad, vmap, jvp) and forward-mode AD the call runs PEFT's plain ops
instead of the Function (same semantics; ``nn.functional.dropout`` draws the mask there). What runs a call is the
router's choice (``dispatch.py``).
"""

from __future__ import annotations

import torch

from .backends import masks
from .dispatch import dora_call, lora_call, resolve_backend
from .dropout import draw_dropout_seed
from .validation import autocast_inputs, check_inputs, check_magnitude

__all__ = ["draw_dropout_seed", "dropout_mask", "fused_lora_linear"]


def fused_lora_linear(
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
    dropout_seed: int | torch.Tensor | None = None,
    backend: str | None = None,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ`` with a frozen ``weight``; DoRA when ``magnitude`` is
    given.

    Args:
        x: (..., in_features); any leading dims, may be non-contiguous or have zero rows.
        weight: out×in (``weight_layout="linear"``) or in×out (``"conv1d"``, GPT-2's Conv1D); frozen.
        bias: (out_features,) or None; it gets a gradient when it requires grad.
        lora_A: r×in; lora_B: out×r (PEFT's orientation); x's dtype or float32.
        scaling: alpha/r (or alpha/sqrt(r) for rsLoRA).
        dropout_p: dropout on the LoRA branch only, applied when ``training``; in [0, 1] (1: the branch
            contributes nothing and its adapters get zero gradients, as with ``nn.Dropout(p=1)`` in PEFT).
        dropout_seed: seed of the dropout mask (see :func:`dropout_mask`): an int, or a one-element int64 tensor on
            x's device (``draw_dropout_seed(device)``; the kernels read it from device memory, so a CUDA graph captured
            around the call with the draw inside takes a new mask at each replay); drawn from PyTorch's generator of
            x's device when None.
        backend: "auto" (default), "triton" or "torch"; overrides ``FUSED_LORA_BACKEND``.
        magnitude: (out_features,), DoRA's ``lora_magnitude_vector`` (the adapters' dtype or float32): then
            ``y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ scaling · (x_d Aᵀ) Bᵀ`` with g = magnitude / ‖W + scaling·B A‖
            per output row (detached), PEFT's DoRA (``autograd/dora.py``, ``docs/dora.md``).
    Returns:
        (..., out_features) in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, weight_layout)
    if magnitude is not None:
        check_magnitude(magnitude, lora_A, lora_B)
        return dora_call(x, weight, bias, lora_A, lora_B, magnitude, float(scaling),
                         float(dropout_p) if training else 0.0, weight_layout, dropout_seed, backend)
    return lora_call(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p) if training else 0.0,
                     weight_layout, dropout_seed, backend)


def dropout_mask(
    seed: int | torch.Tensor, shape: tuple[int, int], p: float, device: torch.device | str = "cpu",
    backend: str | None = None
) -> torch.Tensor:
    """The scaled keep mask (fp32; 0 or 1/(1-p)) a backend applies to a 2-D (tokens×in_features) input
    for ``seed``. Feed it to ``lora_linear_ref(..., dropout_mask=...)`` to reproduce a dropout run."""
    device = torch.device(device)
    if p == 0:
        return torch.ones(tuple(shape), device=device, dtype=torch.float32)
    return masks.scaled(resolve_backend(backend, device), seed, tuple(shape), p, device)
