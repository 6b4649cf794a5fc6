"""The rank-r product every GEMM-shaped kernel starts from: a BLOCK_M × BLOCK_N fp32 tile of L Rᵀ with L (M×R) and
Rᵀ read through strides, R looped in BLOCK_R chunks. Forward: S Bᵀ (y's rank-r term; ``lora_fwd_kernel``,
``lora_up_add_kernel``, ``lora_fwd_4bit_kernel``); backward: dS A (dX's; ``lora_dx_kernel``, ``lora_dx_add_kernel``,
``lora_dx_4bit_kernel``, ``dora_dx_kernel``). Inlined by Triton into each kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from .indexing import index


@triton.jit
def rank_r_tile(l_ptr, r_ptr, rows, cols, row_ok, col_ok, R, stride_lm, stride_lr, stride_rr, stride_rc,
                LORA_DOT: tl.constexpr, LORA_PREC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Σ_r L[rows, r] · Rt[r, cols] in fp32 (masked rows, columns and ranks read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = index(r0 + tl.arange(0, BLOCK_R), WIDE)
        left = tl.load(l_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr,
                       mask=row_ok & (rs[None, :] < R), other=0.0)
        right = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rc,
                        mask=(rs[:, None] < R) & col_ok, other=0.0)
        acc = tl.dot(left.to(LORA_DOT), right.to(LORA_DOT), acc, input_precision=LORA_PREC)
    return acc
