"""The dropout mask: reproducible from its seed, the right keep-rate, never stored, never drawn at p=0."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE

from fused_lora import dropout_mask, fused_lora_linear, lora_linear_ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_a_function_of_the_seed(backend):
    a = dropout_mask(5, (40, 72), 0.3, DEVICE, backend=backend)
    assert torch.equal(a, dropout_mask(5, (40, 72), 0.3, DEVICE, backend=backend))
    assert not torch.equal(a, dropout_mask(6, (40, 72), 0.3, DEVICE, backend=backend))
    values = a.unique()
    assert len(values) == 2 and values[0] == 0
    torch.testing.assert_close(values[1].item(), 1 / 0.7)


def test_kernel_mask_depends_only_on_row_and_column():
    # Counter-based: element (i, j) is the same whatever the tensor's shape or the kernels' tiling,
    # so forward and backward kernels with different tile shapes agree on it.
    big = dropout_mask(9, (70, 130), 0.5, DEVICE, backend="triton")
    small = dropout_mask(9, (33, 61), 0.5, DEVICE, backend="triton")
    assert torch.equal(big[:33, :61], small)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_matches(backend, p):
    n_rows, n_cols = 128, 256
    mask = dropout_mask(123, (n_rows, n_cols), p, DEVICE, backend=backend)
    kept = (mask > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (n_rows * n_cols))
    assert abs(kept - (1 - p)) < 5 * sigma, f"keep rate {kept:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    # no structure along rows or columns: each column's keep-rate is plausible too
    per_col = (mask > 0).double().mean(0)
    col_sigma = math.sqrt(p * (1 - p) / n_rows)
    assert (per_col - (1 - p)).abs().max() < 6 * col_sigma


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_uses_the_seeded_mask(backend):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 24, generator=gen).to(DEVICE), torch.randn(16, 24, generator=gen).to(DEVICE)
    a, b = torch.randn(4, 24, generator=gen).to(DEVICE), torch.randn(16, 4, generator=gen).to(DEVICE)
    y = fused_lora_linear(x, w, None, a, b, 1.0, 0.4, dropout_seed=77, backend=backend)
    mask = dropout_mask(77, (22, 24), 0.4, DEVICE, backend=backend).view(x.shape)
    torch.testing.assert_close(y, lora_linear_ref(x, w, None, a, b, 1.0, dropout_mask=mask), rtol=1e-5, atol=1e-5)
    y_nodrop = lora_linear_ref(x, w, None, a, b, 1.0)
    assert not torch.allclose(y, y_nodrop, atol=1e-3), "dropout had no effect"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_random_numbers_without_dropout(backend):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 24, generator=gen).to(DEVICE), torch.randn(16, 24, generator=gen).to(DEVICE)
    a, b = torch.randn(4, 24, generator=gen).to(DEVICE), torch.randn(16, 4, generator=gen).to(DEVICE)
    state = torch.random.get_rng_state()
    y0 = fused_lora_linear(x, w, None, a, b, 1.0, 0.0, backend=backend)
    y_eval = fused_lora_linear(x, w, None, a, b, 1.0, 0.5, training=False, backend=backend)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(y0, y_eval)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_follows_torch_manual_seed(backend):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 24, generator=gen).to(DEVICE), torch.randn(16, 24, generator=gen).to(DEVICE)
    a, b = torch.randn(4, 24, generator=gen).to(DEVICE), torch.randn(16, 4, generator=gen).to(DEVICE)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        outs.append(fused_lora_linear(x, w, None, a, b, 1.0, 0.5, backend=backend))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], fused_lora_linear(x, w, None, a, b, 1.0, 0.5, backend=backend))


# ------------------------------------------------------------------------- CUDA graphs: what a CPU can show
# A captured CUDA graph replays its kernels with the same arguments, pointers included, and PyTorch's CUDA generator
# rewrites the memory of the draws inside the graph at each replay. So dropout is right under capture when the seed is
# drawn on the device inside the call and the kernels read it from memory when they run, with no host read in between.
# tests/test_gpu.py (run by bench/run_gpu.sh check) captures and replays for real.


def test_the_kernels_read_the_seed_from_device_memory_when_they_run():
    """The same launch (the same seed tensor, as a graph replay has) after the seed's memory changed: the new seed's
    mask."""
    from fused_lora.backends import dropout_triton

    seed = torch.tensor([11], device=DEVICE)
    first = dropout_triton.dropout_mask(seed, (40, 72), 0.3, DEVICE)
    seed.fill_(12)  # what the graph's generator does to the draw's memory before a replay
    second = dropout_triton.dropout_mask(seed, (40, 72), 0.3, DEVICE)
    assert not torch.equal(first, second)
    assert torch.equal(first, dropout_mask(11, (40, 72), 0.3, DEVICE, backend="triton"))
    assert torch.equal(second, dropout_mask(12, (40, 72), 0.3, DEVICE, backend="triton"))


def test_the_triton_path_never_reads_the_seed_on_the_host():
    """No .item() (a host sync, which a CUDA graph capture forbids) and no host-made tensor on the Triton path: the
    seed is drawn on x's device and stays there, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(28, 40, device=DEVICE)
    a = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    b = torch.randn(28, 4, device=DEVICE, requires_grad=True)
    fused_lora_linear(x, w, None, a, b, 2.0, 0.3, backend="triton").sum().backward()  # warm-up: cached buffers
    with Ops():
        fused_lora_linear(x, w, None, a, b, 2.0, 0.3, backend="triton").sum().backward()
    assert "randint" in ops and "_local_scalar_dense" not in ops and "lift_fresh" not in ops, ops


def test_the_seed_is_drawn_from_the_devices_generator_and_a_tensor_seed_works():
    from fused_lora import draw_dropout_seed

    torch.manual_seed(3)
    drawn = draw_dropout_seed(DEVICE)
    torch.manual_seed(3)
    assert drawn.device.type == DEVICE.type and torch.equal(drawn, torch.randint(0, 2**31 - 1, (1,), device=DEVICE))
    x = torch.randn(6, 40, device=DEVICE)
    w, a, b = torch.randn(28, 40, device=DEVICE), torch.randn(4, 40, device=DEVICE), torch.randn(28, 4, device=DEVICE)
    for backend in BACKENDS:
        by_int = fused_lora_linear(x, w, None, a, b, 2.0, 0.3, dropout_seed=int(drawn), backend=backend)
        by_tensor = fused_lora_linear(x, w, None, a, b, 2.0, 0.3, dropout_seed=drawn, backend=backend)
        assert torch.equal(by_int, by_tensor)
