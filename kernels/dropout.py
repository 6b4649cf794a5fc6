"""Counter-based dropout: the mask is a pure function of (seed, row, column), so the backward
kernels regenerate it instead of reading a saved one.

Element (row, col) keeps its value when ``u >= p``, where u is output ``col % 4`` of
Philox4x32-10 with key ``seed`` and counter ``(col // 4, row, 0, 0)``: one Philox call feeds four
adjacent columns, a quarter of the integer work of one call per element. Rows and columns are
32-bit counters each, so the mask is defined for up to 2³² × 2³² elements (no 2³¹ offset limit).
"""

import triton
import triton.language as tl


@triton.jit
def dropout_scale(seed, rows, col_start, p, scale, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """fp32 tile [BLOCK_ROWS, BLOCK_COLS] of ``scale`` (= 1/(1-p)) where kept and 0 where dropped.

    ``rows`` holds the tile's row indices, ``col_start`` (a multiple of 4) its first column.
    """
    groups = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    c0 = (groups[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + groups[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, zero, zero)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_ROWS, BLOCK_COLS))
    u = tl.random.uint_to_uniform_float(bits)
    return tl.where(u >= p, scale, 0.0)


@triton.jit
def dropout_mask_kernel(out_ptr, M, K, stride_om, stride_ok, seed, p, scale,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the scaled mask the LoRA kernels use (for tests and for users who want to inspect it)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m = dropout_scale(seed, rows, pid_k * BLOCK_K, p, scale, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok
    tl.store(ptrs, m, mask=(rows[:, None] < M) & (cols[None, :] < K))
