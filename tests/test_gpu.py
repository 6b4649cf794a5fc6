"""CUDA-only checks: bf16 at realistic sizes, 64-bit offsets, TF32 switch. Skipped on CPU (conftest.py).

Run on a lent GPU with bench/run_gpu.sh (or `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_torch_error, atol_for, reference_pair
from test_functional import make_problem, run_and_check

from fused_lora import dropout_mask, fused_lora_linear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize(("M", "K", "N", "r"), [(4096, 4096, 4096, 16), (2048, 768, 2304, 8), (1000, 2048, 5000, 64)])
def test_realistic_sizes(dtype, layout, M, K, N, r):
    problem = make_problem((M,), K, N, r, dtype, layout, True, device="cuda")
    run_and_check(*problem, scaling=2.0, p=0.1, layout=layout, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_fp32_adapters_realistic(dtype):
    problem = make_problem((8, 512), 2048, 2048, 16, dtype, "linear", False, adapter_dtype=torch.float32,
                           device="cuda")
    run_and_check(*problem, scaling=2.0, p=0.1, layout="linear", backend="triton")


def test_64bit_offsets():
    """M·K and M·N past 2³¹ elements: pointer offsets and dropout counters must not wrap."""
    free, _ = torch.cuda.mem_get_info()
    M, K, N, r = (1 << 20) + 3, 2112, 2112, 4  # M·K ≈ 2.2e9 > 2³¹
    if free < 6 * M * K * 2:
        pytest.skip("not enough GPU memory for the 64-bit offset test")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(N, K, device="cuda", generator=gen) * K**-0.5).bfloat16()
    a = (torch.randn(r, K, device="cuda", generator=gen) * K**-0.5).bfloat16().requires_grad_()
    b = (torch.randn(N, r, device="cuda", generator=gen) * r**-0.5).bfloat16().requires_grad_()
    y = fused_lora_linear(x, w, None, a, b, 2.0, 0.1, dropout_seed=5)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Check the last rows (the ones past 2³¹ elements) against fp64 on a slice.
    tail = slice(M - 37, M)
    mask = dropout_mask(5, (M, K), 0.1, "cuda")[tail]
    ref, same = reference_pair(x[tail].detach(), w, None, a.detach().requires_grad_(), b.detach().requires_grad_(),
                               2.0, "linear", mask, dy[tail])
    assert_within_torch_error("y tail", y[tail], same["y"], ref["y"], atol_for(torch.bfloat16, 1.0))
    assert_within_torch_error("dx tail", x.grad[tail], same["dx"], ref["dx"], atol_for(torch.bfloat16, 1.0))
    kept = (mask > 0).float().mean().item()
    assert abs(kept - 0.9) < 0.01


def test_tf32_follows_torch_switch():
    problem = make_problem((512,), 1024, 1024, 16, torch.float32, "linear", False, device="cuda")
    x, w, _, a, b = problem
    ref = (x.double() @ w.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t())
    y = fused_lora_linear(x, w, None, a, b, 2.0)
    assert (y.double() - ref).abs().max().item() < 1e-3  # 3xTF32 by default: about fp32 accuracy
