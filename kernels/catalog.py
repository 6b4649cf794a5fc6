"""Every Triton kernel of the package, by name: the index of ``kernels/`` (installed as ``fused_lora.kernels``).

The folder has no ``__init__.py`` on purpose: the import name ``kernels`` belongs to HF's ``kernels`` package, which
transformers imports, and a ``kernels/__init__.py`` at the project root would shadow it whenever the root is on
``sys.path`` (``python -c``, ``python -m pytest``, a notebook). Import the kernels through their files
(``fused_lora.kernels.lora_forward``) or this catalog.

Forward, 2 launches:   ``lora_down_kernel``  S = dropout(x) Aᵀ
                       ``lora_fwd_kernel``   y = x Wᵀ + b + s·S Bᵀ
Backward, 3 launches:  ``lora_dy_kernel``    one pass over dY: dS = s·dY B, dB = s·dYᵀ S, db = Σ dY
                       ``lora_dx_kernel``    dX = dY W + m ⊙ (dS A)
                       ``lora_da_kernel``    dA = dSᵀ (m ⊙ x)
QLoRA (W read from bitsandbytes' 4-bit storage and dequantized in registers; ``lora_4bit``):
                       ``lora_fwd_4bit_kernel``  y = x Wᵀ + b + s·S Bᵀ
                       ``lora_dx_4bit_kernel``   dX = dY W + m ⊙ (dS A)
                       ``dequantize_4bit_kernel`` W (dense), for tests and merges
DoRA (``dora``; forward 3 launches, backward 3, with lora_down/lora_dx/lora_da where they fit):
                       ``dora_norm_kernel``  ‖W + s·B A‖² per row, B A never in memory
                       ``dora_down_kernel``  S = x_d Aᵀ and x_d (p > 0)
                       ``dora_fwd_kernel``   P = x_d Wᵀ + s·S Bᵀ, y = g ⊙ P + b (+ (x − x_d) Wᵀ when p > 0)
                       ``dora_dy_kernel``    dS, dB, db, d magnitude and G = g⊙dY (or (g − 1)⊙dY) in one pass
                       ``dora_dx_kernel``    dX = dY W + m ⊙ (G W + dS A) (p > 0)
Composed path (the base GEMM is cuBLAS's or a quantized layer's own; ``lora_compose``):
                       ``lora_up_add_kernel``  y += s·S Bᵀ in place
                       ``lora_dx_add_kernel``  dX += m ⊙ (dS A) in place
Several adapters on one base (``multi_lora``, ``multi_lora_4bit``): the rows in contiguous segments, one per adapter,
each row tile taking its own segment's adapter (rank, scaling, dropout seed, bias); W read once for all segments:
                       ``multi_lora_down_kernel``     S_i = dropout_i(x_i) A_iᵀ
                       ``multi_lora_fwd_kernel``      y_i = x_i Wᵀ + b(_i) + s_i·S_i B_iᵀ
                       ``multi_lora_up_add_kernel``   y_i += s_i·S_i B_iᵀ in place (composed)
                       ``multi_lora_dy_kernel``       one pass over dY: dS_i, dB_i, Σ_rows dY_i
                       ``multi_lora_dx_kernel``       dX_i = dY_i W + m_i ⊙ (dS_i A_i)
                       ``multi_lora_dx_add_kernel``   dX_i += m_i ⊙ (dS_i A_i) in place (composed)
                       ``multi_lora_da_kernel``       dA_i = dS_iᵀ (m_i ⊙ x_i)
                       ``multi_lora_fwd_4bit_kernel`` / ``multi_lora_dx_4bit_kernel``  the two GEMMs from 4-bit storage

The dropout mask m is never stored: every kernel that needs it regenerates it from a Philox seed
(``dropout.dropout_scale``). The launchers live in ``fused_lora/backends/`` (``lora_triton``, ``dora_triton``,
``bnb4_triton``, ``dropout_triton``, ``multi_triton``, ``multi_bnb4_triton``).
"""

from .dora import dora_down_kernel, dora_dx_kernel, dora_dy_kernel, dora_fwd_kernel, dora_norm_kernel
from .dropout import dropout_mask_kernel, dropout_scale
from .lora_4bit import dequantize_4bit_kernel, lora_dx_4bit_kernel, lora_fwd_4bit_kernel
from .lora_backward import lora_da_kernel, lora_dx_kernel, lora_dy_kernel
from .lora_compose import lora_dx_add_kernel, lora_up_add_kernel
from .lora_forward import lora_down_kernel, lora_fwd_kernel
from .multi_lora import (
    multi_lora_da_kernel,
    multi_lora_down_kernel,
    multi_lora_dx_add_kernel,
    multi_lora_dx_kernel,
    multi_lora_dy_kernel,
    multi_lora_fwd_kernel,
    multi_lora_up_add_kernel,
)
from .multi_lora_4bit import multi_lora_dx_4bit_kernel, multi_lora_fwd_4bit_kernel

__all__ = [
    "dora_down_kernel",
    "dora_dx_kernel",
    "dora_dy_kernel",
    "dora_fwd_kernel",
    "dora_norm_kernel",
    "dequantize_4bit_kernel",
    "dropout_mask_kernel",
    "dropout_scale",
    "lora_da_kernel",
    "lora_down_kernel",
    "lora_dx_4bit_kernel",
    "lora_dx_add_kernel",
    "lora_dx_kernel",
    "lora_dy_kernel",
    "lora_fwd_4bit_kernel",
    "lora_fwd_kernel",
    "lora_up_add_kernel",
    "multi_lora_da_kernel",
    "multi_lora_down_kernel",
    "multi_lora_dx_4bit_kernel",
    "multi_lora_dx_add_kernel",
    "multi_lora_dx_kernel",
    "multi_lora_dy_kernel",
    "multi_lora_fwd_4bit_kernel",
    "multi_lora_fwd_kernel",
    "multi_lora_up_add_kernel",
]

KERNELS = {name: globals()[name] for name in __all__ if name.endswith("_kernel")}
