"""Output and every gradient of fused_lora_linear against an fp64 reference, on both backends.

On CPU the "triton" backend runs the real kernels through Triton's interpreter (conftest.py), so
every kernel path (dtypes, layouts, dropout, bias, odd sizes, rank chunks) is exercised here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, assert_matches_references, reference_pair

from fused_lora import dropout_mask, fused_lora_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_problem(lead, K, N, r, dtype, layout, bias, adapter_dtype=None, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, dt=dtype, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dt)
    adapter_dtype = adapter_dtype or dtype
    x = rnd(*lead, K).requires_grad_()
    weight = rnd(N, K, scale=K**-0.5) if layout == "linear" else rnd(K, N, scale=K**-0.5)
    b = rnd(N).requires_grad_() if bias else None
    lora_A = rnd(r, K, dt=adapter_dtype, scale=K**-0.5).requires_grad_()
    lora_B = rnd(N, r, dt=adapter_dtype, scale=r**-0.5).requires_grad_()
    return x, weight, b, lora_A, lora_B


def run_and_check(x, weight, bias, lora_A, lora_B, scaling, p, layout, backend, seed=1234):
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout=layout,
                          dropout_seed=seed, backend=backend)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], lora_B.shape[0])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(grad_out)
    mask = None
    if p > 0:
        mask = dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, x.device, backend=backend)
        mask = mask.view(x.shape)
    ref, same = reference_pair(x, weight, bias, lora_A, lora_B, scaling, layout, mask, grad_out)
    assert_matches_references(y, x, weight, bias, lora_A, lora_B, ref, same)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_fp64_reference(backend, dtype, layout, p):
    # Odd sizes (not multiples of any tile), 3-D input; bias on for half of the cases of each layout.
    bias = (layout == "conv1d") != (p > 0)
    problem = make_problem((3, 13), 100, 72, 12, dtype, layout, bias, device=DEVICE)
    run_and_check(*problem, scaling=2.0, p=p, layout=layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [1, 12, 16, 64, 256])
def test_ranks(backend, r):
    # r=256 spans several 64-wide rank chunks in every kernel (forward epilogue loop, skinny-kernel grids).
    problem = make_problem((37,), 45, 33, r, torch.float32, "linear", True, device=DEVICE)
    run_and_check(*problem, scaling=16 / r, p=0.1, layout="linear", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_on_half_base(backend, dtype, p):
    problem = make_problem((2, 19), 64, 40, 8, dtype, "conv1d", True, adapter_dtype=torch.float32, device=DEVICE)
    run_and_check(*problem, scaling=0.5, p=p, layout="conv1d", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_non_contiguous_input_and_weight(backend, layout):
    x, weight, bias, lora_A, lora_B = make_problem((40,), 70, 52, 6, torch.float32, layout, True, device=DEVICE)
    # x: every other row of a wider buffer, and a column slice (row stride 140, not 70)
    wide = torch.randn(80, 140).to(DEVICE)
    x = wide[::2, 10:80].requires_grad_()
    assert not x.is_contiguous()
    # weight: a transposed view (strides swapped) must also be read in place
    weight = weight.t().contiguous().t()
    run_and_check(x, weight, bias, lora_A, lora_B, scaling=1.5, p=0.25, layout=layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    x, weight, bias, lora_A, lora_B = make_problem((2, 0), 30, 20, 4, torch.float32, "linear", True, device=DEVICE)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.1, backend=backend)
    assert y.shape == (2, 0, 20)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(lora_A.grad) == 0 and torch.count_nonzero(lora_B.grad) == 0
    assert torch.count_nonzero(bias.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_without_grad_and_frozen_bias(backend):
    x, weight, bias, lora_A, lora_B = make_problem((21,), 34, 18, 5, torch.float32, "linear", True, device=DEVICE)
    x.requires_grad_(False)
    bias.requires_grad_(False)
    run_and_check(x, weight, bias, lora_A, lora_B, scaling=1.0, p=0.1, layout="linear", backend=backend)
    assert x.grad is None and bias.grad is None


def test_backends_agree_without_dropout():
    problem = make_problem((5, 9), 48, 31, 7, torch.float32, "conv1d", True, device=DEVICE)
    outs = []
    for backend in BACKENDS:
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in problem]
        y = fused_lora_linear(*leaves, 0.7, 0.0, weight_layout="conv1d", backend=backend)
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves if t.requires_grad])
    for a, b in zip(*outs, strict=True):
        # fp32, different summation orders: agree to ~1e-6 of the largest value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_split_reductions_match_single_pass():
    """The split paths a GPU launch picks to fill its SMs: dS over N slices and dA over M slices (atomics), S over K
    slices (partial sums added in a fixed order)."""
    from fused_lora.backends import dropout_triton, lora_triton

    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 70, 66, 100, 20
    dy, x = torch.randn(M, N, generator=gen).to(DEVICE), torch.randn(M, K, generator=gen).to(DEVICE)
    lora_A, lora_B = torch.randn(r, K, generator=gen).to(DEVICE), torch.randn(N, r, generator=gen).to(DEVICE)
    s = torch.randn(M, r, generator=gen).to(DEVICE)
    single = lora_triton.lora_dy_pass(dy, lora_B, s, 0.5, True, True, True, split_n=1)
    split = lora_triton.lora_dy_pass(dy, lora_B, s, 0.5, True, True, True, split_n=3)
    for a, b in zip(single, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single[0], 0.5 * dy @ lora_B, rtol=1e-5, atol=1e-5)
    s_single = lora_triton.lora_down(x, lora_A, seed=11, p=0.3, split_k=1)
    s_split = lora_triton.lora_down(x, lora_A, seed=11, p=0.3, split_k=3)  # K slices summed in a fixed order
    torch.testing.assert_close(s_single, s_split, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_single, (x * dropout_triton.dropout_mask(11, (M, K), 0.3, x.device)) @ lora_A.t(),
                               rtol=1e-5, atol=1e-4)
    da_single = lora_triton.lora_da(single[0], x, lora_A, seed=11, p=0.3, split_m=1)
    da_split = lora_triton.lora_da(single[0], x, lora_A, seed=11, p=0.3, split_m=2)
    torch.testing.assert_close(da_single, da_split, rtol=1e-5, atol=1e-5)
    mask = dropout_triton.dropout_mask(11, (M, K), 0.3, x.device)
    torch.testing.assert_close(da_single, single[0].t() @ (x * mask), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nd_output_is_not_a_view(backend):
    """An N-D output is its own tensor, as nn.Linear's (torch.matmul's _unsafe_view): FSDP2 warns on module
    outputs that are views, and an in-place op on y must keep the gradients right."""
    x, weight, bias, lora_A, lora_B = make_problem((3, 5), 20, 12, 4, torch.float32, "linear", True, device=DEVICE)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend=backend)
    assert y.shape == (3, 5, 12) and y._base is None
    y.mul_(2.0)  # in place on the output: the gradient of every input doubles
    y.sum().backward()
    grads = [x.grad.clone(), lora_A.grad.clone(), lora_B.grad.clone(), bias.grad.clone()]
    for t in (x, lora_A, lora_B, bias):
        t.grad = None
    fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend=backend).sum().backward()
    for got, once in zip(grads, (x.grad, lora_A.grad, lora_B.grad, bias.grad), strict=True):
        torch.testing.assert_close(got, 2 * once)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_composed_path_matches_fp64_reference(dtype, layout, p, monkeypatch):
    """The kernels' other base GEMM (FUSED_LORA_GEMM=composed; what Turing GPUs run): cuBLAS's y and dX, with the
    rank-r terms added in place by lora_up_add_kernel / lora_dx_add_kernel."""
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    bias = (layout == "conv1d") != (p > 0)
    problem = make_problem((3, 13), 100, 72, 12, dtype, layout, bias, device=DEVICE)
    run_and_check(*problem, scaling=2.0, p=p, layout=layout, backend="triton")


@pytest.mark.parametrize(("r", "adapter_dtype"), [(1, torch.float32), (80, torch.bfloat16)])
def test_composed_path_ranks_and_fp32_adapters(r, adapter_dtype, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    problem = make_problem((37,), 45, 33, r, torch.bfloat16, "linear", True, adapter_dtype=adapter_dtype,
                           device=DEVICE)
    run_and_check(*problem, scaling=16 / r, p=0.1, layout="linear", backend="triton")
