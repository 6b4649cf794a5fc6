"""Triton kernels of the fused LoRA linear layer (installed as ``fused_lora.kernels``).

Forward, 2 launches:   ``lora_down_kernel``  S = dropout(x) Aᵀ
                       ``lora_fwd_kernel``   y = x Wᵀ + b + s·S Bᵀ
Backward, 3 launches:  ``lora_dy_kernel``    one pass over dY: dS = s·dY B, dB = s·dYᵀ S, db = Σ dY
                       ``lora_dx_kernel``    dX = dY W + m ⊙ (dS A)
                       ``lora_da_kernel``    dA = dSᵀ (m ⊙ x)
Composed path (the base GEMM is cuBLAS's or a quantized layer's own; ``lora_compose``):
                       ``lora_up_add_kernel``  y += s·S Bᵀ in place
                       ``lora_dx_add_kernel``  dX += m ⊙ (dS A) in place

The dropout mask m is never stored: every kernel that needs it regenerates it from a Philox seed
(``dropout.dropout_scale``). The launchers live in ``fused_lora.triton_ops``.
"""

from .configs import INTERPRET
from .dropout import dropout_mask_kernel, dropout_scale
from .lora_backward import lora_da_kernel, lora_dx_kernel, lora_dy_kernel
from .lora_compose import lora_dx_add_kernel, lora_up_add_kernel
from .lora_forward import lora_down_kernel, lora_fwd_kernel

__all__ = [
    "INTERPRET",
    "dropout_mask_kernel",
    "dropout_scale",
    "lora_da_kernel",
    "lora_down_kernel",
    "lora_dx_add_kernel",
    "lora_dx_kernel",
    "lora_dy_kernel",
    "lora_fwd_kernel",
    "lora_up_add_kernel",
]
