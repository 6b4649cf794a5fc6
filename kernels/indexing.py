"""Offset arithmetic: int32 unless the launch reaches past 2³¹ elements.

Every kernel takes a ``WIDE`` constexpr that the launcher sets (``fused_lora.backends.triton_launch.wide_offsets``)
when some tensor of the launch spans 2³¹ elements or more from its first one (a 128k-vocab × 16k weight, dY of a long
sequence, x read column-major). Only then are index vectors int64: an int64 index makes every element offset of a
tile 64-bit, and that cost, not the arithmetic, is what shows: the in-place add kernels went from no stack to
8-48 B of spills per thread at 255 registers with int64 offsets everywhere (bench/compile_report.py, sm_80/sm_90).
Tensors below 2³¹ elements (every projection of a 7B model at 8k tokens) compile the int32 variant.
"""

import triton
import triton.language as tl


@triton.jit
def index(i, WIDE: tl.constexpr):
    """``i`` as the launch's offset type: int64 when ``WIDE``, else int32."""
    if WIDE:
        out = i.to(tl.int64)
    else:
        out = i.to(tl.int32)
    return out
