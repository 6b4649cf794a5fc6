"""Counter-based dropout: the mask is a pure function of (seed, row, column), so the backward
kernels regenerate it instead of reading a saved one.

Element (row, col) keeps its value when ``u >= p``. One Philox4x32-10 call, key ``seed`` and counter
``(col // 4, row, 0, 0)``, feeds the four adjacent columns of a group, a quarter of the integer work of
one call per element. Its outputs (r0, r1, r2, r3) land on columns 4g, 4g+1, 4g+2, 4g+3 in the order
**r0, r2, r1, r3** (``tl.join(tl.join(r0, r1), tl.join(r2, r3))`` puts the pair index innermost, and the
reshape flattens it first), and u = ``tl.random.uint_to_uniform_float`` of that word. Rows and columns are
32-bit counters each, so the mask is defined for up to 2³² × 2³² elements (no 2³¹ offset limit).
``tests/test_dropout.py`` recomputes masks with a plain-Python Philox from this description.
"""

import triton
import triton.language as tl

from .configs import RUNTIME_VALUES
from .indexing import index


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


@triton.jit(do_not_specialize=[*RUNTIME_VALUES, "ROW0"])
def dropout_mask_kernel(out_ptr, M, K, stride_om, stride_ok, seed_ptr, p, scale, ROW0,
                        WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the scaled mask the LoRA kernels use on rows ROW0 … ROW0 + M − 1 of x (for tests, users who want to
    inspect it, the PyTorch path standing in for the kernels, and the self-check, which reads a few rows at a time)."""
    seed = tl.load(seed_ptr)  # from device memory: a captured CUDA graph reads each replay's seed
    rows = index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    col_start = tl.program_id(1) * BLOCK_K
    cols = index(col_start + tl.arange(0, BLOCK_K), WIDE)
    m = dropout_scale(seed, rows + ROW0, col_start, p, scale, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok
    tl.store(ptrs, m, mask=(rows[:, None] < M) & (cols[None, :] < K))
