"""fp32 dots on tensor cores at about fp32 accuracy.

With fp32 adapters (LoRALinear's and PEFT's default on a bf16/fp16 base) and TF32 switched off in
PyTorch, the launchers ask for ``"tf32x3"``: 3xTF32, a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with
x = x_hi + x_lo, x_hi the TF32 part (tensor cores, error ~2⁻²¹ relative instead of TF32's 2⁻¹¹). IEEE fp32
dots run on the FMA units at a fraction of the speed and spill (bench/compile_report.py).

When one operand is an upcast bf16/fp16 value it is already exact in TF32 (8 or 11 significant bits ≤ TF32's
11), so its ``_lo`` is zero and the third product is wasted: ``dot_fp32`` then does the other two itself.
That is a third fewer MMAs and, where the exact operand is the large streamed tile (dY, x), none of its
split registers: the dy pass with 3xTF32 spilled 40-352 B per thread on sm_90, with this it does not.
"""

import triton
import triton.language as tl


@triton.jit
def _tf32_hi(x):
    # The low 13 of fp32's 23 mantissa bits cleared: exactly representable in TF32; x - hi is exact in fp32.
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot_fp32(a, b, acc, PREC: tl.constexpr, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr):
    """acc + a @ b. ``A_EXACT`` / ``B_EXACT``: that operand holds upcast half values; with
    ``PREC == "tf32x3"`` the other one is split and two TF32 products are summed, small part first."""
    if PREC == "tf32x3" and A_EXACT:
        b_hi = _tf32_hi(b)
        acc = tl.dot(a, b - b_hi, acc, input_precision="tf32")
        acc = tl.dot(a, b_hi, acc, input_precision="tf32")
    elif PREC == "tf32x3" and B_EXACT:
        a_hi = _tf32_hi(a)
        acc = tl.dot(a - a_hi, b, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc
