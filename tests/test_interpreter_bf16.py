"""The bf16 workaround under Triton's interpreter, tested both ways.

The interpreter holds bf16 as uint16 and computes tl.dot on the bit patterns (triton#11584). The
kernels therefore cast half operands to fp32 right before tl.dot when interpreting (triton_launch.dot_dtype):
products of half values are exact in fp32, which is what a tensor core computes. These tests prove the bug
is still there (if upstream fixes it, the first test fails and the workaround can go) and that the
kernels' bf16 path is right despite it (test_functional.py checks it against fp64 in full).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fused_lora.backends import triton_launch
from fused_lora.kernels.configs import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="only meaningful under TRITON_INTERPRET=1")


@triton.jit
def _raw_dot(a_ptr, b_ptr, c_ptr, UPCAST: tl.constexpr):
    idx = tl.arange(0, 16)
    a = tl.load(a_ptr + idx[:, None] * 16 + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * 16 + idx[None, :])
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    tl.store(c_ptr + idx[:, None] * 16 + idx[None, :], tl.dot(a, b))


def _run(upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).bfloat16()
    b = torch.randn(16, 16, generator=gen).bfloat16()
    c = torch.empty(16, 16)
    _raw_dot[(1,)](a, b, c, UPCAST=upcast)
    return c, a.float() @ b.float()


def test_upstream_bf16_dot_is_still_wrong_in_the_interpreter():
    got, expected = _run(upcast=False)
    assert not torch.allclose(got, expected, rtol=1e-2, atol=1e-2), (
        "Triton's interpreter now computes bf16 tl.dot correctly: the fp32 upcast in triton_launch.dot_dtype "
        "is no longer needed under the interpreter")


def test_upcast_operands_give_the_exact_product():
    got, expected = _run(upcast=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_kernels_use_fp32_dots_when_interpreting():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert triton_launch.dot_dtype(dtype) == tl.float32
