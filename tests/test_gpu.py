"""CUDA-only checks, skipped without CUDA (conftest.py); the second-GPU test needs two. Run on a lent GPU with
bench/run_gpu.sh (or `pytest -m gpu`).

`-m check` (what `bash bench/run_gpu.sh check` runs, with FUSED_LORA_AUTOTUNE=0 so that each kernel compiles one
config) holds the tests most likely to fail on a first GPU, most telling first, in file order:

1. fp32 adapters on a bf16 base (3xTF32 rank-r dots), and TF32 through PyTorch's new API and the legacy flag;
2. offsets past 2³¹ elements, on real tensors;
3. non-contiguous inputs (strided x and bias, transposed weight, strided and transposed adapters);
4. one dropout mask in the forward and the backward kernels, the one ``fused_lora.dropout_mask`` gives for the seed;
   CUDA graphs: forward + backward captured, two replays take two masks, each right; reduce-overhead really graphs;
5. a layer on cuda:1 while cuda:0 is current (skipped with one GPU);
6. every dtype × weight layout at one real size, and the composed GEMM path once (names hold ``real_size``:
   run_gpu.sh runs these in a second process beside 1-5, so that both compile at once).

The rest (bf16/fp16 at several realistic sizes, the TF32 default) runs in `bash bench/run_gpu.sh tests`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_within_torch_error, atol_for, reference_pair
from test_functional import make_problem, run_and_check

from fused_lora import dropout_mask, fused_lora_linear
from fused_lora.backends import triton_launch

pytestmark = pytest.mark.gpu
check = pytest.mark.check

# ----------------------------------------------------------------------------------------------- precision

PRECISION_MODES = ["default-3xtf32", "tf32-new-api", "tf32-legacy-flag"]


@contextlib.contextmanager
def fp32_matmul_precision(mode: str):
    """``default-3xtf32``: nothing set (the kernels' fp32 dots run 3xTF32, cuBLAS IEEE fp32); ``tf32-new-api``:
    ``torch.backends.fp32_precision = "tf32"`` (what ``TrainingArguments(tf32=True)`` sets; reading the legacy flag
    then raises); ``tf32-legacy-flag``: ``torch.backends.cuda.matmul.allow_tf32 = True``. PyTorch's own matmuls (the
    tests' same-dtype references) follow the same switch."""
    new_before = torch.backends.fp32_precision
    if mode == "default-3xtf32":
        yield
        return
    legacy_before = torch.backends.cuda.matmul.allow_tf32 if new_before == "none" else None
    try:
        if mode == "tf32-new-api":
            torch.backends.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
        yield
    finally:
        # Setting the legacy flag gives cuda.matmul a precision of its own ("ieee" once set back to False) that a later
        # torch.backends.fp32_precision = "tf32" would not override, so it is put back to inheriting; and the flag
        # must agree with the new API's value or reading it raises.
        torch.backends.fp32_precision = new_before
        if legacy_before is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy_before
            if not legacy_before:  # "ieee" (set by the flag) → inheriting again; with the flag True this would raise
                torch.backends.cuda.matmul.fp32_precision = "none"


@check
@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_fp32_adapters_on_bf16_base(mode):
    """PEFT's and LoRALinear's default on a bf16 base: fp32 adapters, whose rank-r dots run 3xTF32 on tensor cores
    (about fp32 accuracy), or TF32 when PyTorch allows it, by either switch."""
    with fp32_matmul_precision(mode):
        want = "tf32x3" if mode == "default-3xtf32" else "tf32"
        assert triton_launch.dot_precision(torch.float32, torch.device("cuda")) == want
        problem = make_problem((8, 512), 2048, 2048, 16, torch.bfloat16, "linear", False,
                               adapter_dtype=torch.float32, device="cuda")
        run_and_check(*problem, scaling=2.0, p=0.1, layout="linear", backend="triton")


@check
@pytest.mark.parametrize("mode", PRECISION_MODES[1:])
def test_fp32_base_follows_the_tf32_switch(mode):
    """fp32 x and W: 3xTF32 by default (about fp32 accuracy); with TF32 switched on by either API the kernels take
    it too (error ~1e-3 here, vs ~1e-6): a switch that is not followed, or that crashes the call, fails."""
    x, w, _, a, b = make_problem((512,), 1024, 1024, 16, torch.float32, "linear", False, device="cuda")
    ref = x.double() @ w.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    err = lambda y: (y.double() - ref).abs().max().item()
    exact = err(fused_lora_linear(x, w, None, a, b, 2.0, backend="triton"))
    with fp32_matmul_precision(mode):
        assert triton_launch.dot_precision(torch.float32, x.device) == "tf32"
        fast = err(fused_lora_linear(x, w, None, a, b, 2.0, backend="triton"))
    assert exact < 1e-3, f"3xTF32 error {exact:.3g}"
    assert 4 * exact < fast < 5e-2, f"TF32 error {fast:.3g} vs 3xTF32's {exact:.3g}: the switch was not followed"


# ------------------------------------------------------------------------------------------ 64-bit offsets


@check
def test_64bit_offsets():
    """M·K and M·N past 2³¹ elements: pointer offsets and dropout counters must not wrap. The last rows (past 2³¹
    elements) of y and dX against fp64; dA and dB, sums over every row, against fp64 accumulated over row chunks."""
    free, _ = torch.cuda.mem_get_info()
    M, K, N, r = (1 << 20) + 3, 2112, 2112, 4  # M·K ≈ 2.2e9 > 2³¹
    if free < 16 * M * K:  # x, dX, y, dY in bf16, the fp32 mask, the reference's chunks
        pytest.skip(f"not enough GPU memory for the 64-bit offset test ({free / 2**30:.0f} GiB free)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(N, K, device="cuda", generator=gen) * K**-0.5).bfloat16()
    a = (torch.randn(r, K, device="cuda", generator=gen) * K**-0.5).bfloat16().requires_grad_()
    b = (torch.randn(N, r, device="cuda", generator=gen) * r**-0.5).bfloat16().requires_grad_()
    y = fused_lora_linear(x, w, None, a, b, 2.0, 0.1, dropout_seed=5, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    full_mask = dropout_mask(5, (M, K), 0.1, "cuda", backend="triton")
    # Check the last rows (the ones past 2³¹ elements) against fp64 on a slice.
    tail = slice(M - 37, M)
    mask = full_mask[tail]
    ref, same = reference_pair(x[tail].detach().requires_grad_(), w, None, a.detach().requires_grad_(),
                               b.detach().requires_grad_(), 2.0, "linear", mask, dy[tail])
    assert_within_torch_error("y tail", y[tail], same["y"], ref["y"], atol_for(torch.bfloat16, 1.0))
    assert_within_torch_error("dx tail", x.grad[tail], same["dx"], ref["dx"], atol_for(torch.bfloat16, 1.0))
    kept = (mask > 0).float().mean().item()
    assert abs(kept - 0.9) < 0.01
    # dA = s·(dY B)ᵀ (m ⊙ x) and dB = s·dYᵀ (m ⊙ x) Aᵀ read every row: a wrapped offset in the last ~3% of the rows
    # moves them by ~25%; bf16 rounding of the result is 0.4%.
    da_ref = torch.zeros(r, K, dtype=torch.float64, device="cuda")
    db_ref = torch.zeros(N, r, dtype=torch.float64, device="cuda")
    a64, b64 = a.detach().double(), b.detach().double()
    for start in range(0, M, 1 << 16):
        rows = slice(start, min(start + (1 << 16), M))
        xd = x.detach()[rows].double() * full_mask[rows].double()
        dy64 = dy[rows].double()
        da_ref += 2.0 * (dy64 @ b64).t() @ xd
        db_ref += 2.0 * dy64.t() @ (xd @ a64.t())
    for name, got, want in (("dA", a.grad, da_ref), ("dB", b.grad, db_ref)):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3 * want.abs().max().item(), msg=name)


# --------------------------------------------------------------------------------------- memory layouts


@check
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_non_contiguous_inputs(layout):
    """Every pointer read through its strides at a real size: x every other row of a wider buffer and a column
    window of it, the weight transposed in memory, a strided bias, adapters transposed and strided views."""
    M, K, N, r = 2048, 1024, 1536, 16
    _, weight, _, _, _ = make_problem((M,), K, N, r, torch.bfloat16, layout, False, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()
    x = rnd(2 * M, K + 64)[::2, 32:32 + K].requires_grad_()
    weight = weight.t().contiguous().t()
    bias = rnd(2 * N)[::2].requires_grad_()
    lora_A = rnd(K, 2 * r, scale=K**-0.5)[:, ::2].t().requires_grad_()
    lora_B = rnd(2 * N, r, scale=r**-0.5)[::2].requires_grad_()
    assert x.stride() == (2 * (K + 64), 1) and bias.stride() == (2,)
    assert lora_A.stride() == (2, 2 * r) and lora_B.stride() == (2 * r, 1)
    assert weight.stride() == (1, weight.shape[0])
    run_and_check(x, weight, bias, lora_A, lora_B, scaling=2.0, p=0.1, layout=layout, backend="triton")


# ------------------------------------------------------------------------------------------------ dropout


@check
def test_one_dropout_mask_in_forward_and_backward():
    """Identity adapters (r = K = N) and a zero base weight make every result show its mask: y = m ⊙ x (the down
    kernel's), dX = m ⊙ dY (the dX kernel's), dA = dB = dYᵀ (m ⊙ x) (the dA kernel's, and S as the dy pass reads
    it), all with fused_lora.dropout_mask(seed); at a size where the backward splits its reductions over the SMs."""
    M, K, p, seed = 8192, 128, 0.3, 1234  # r = K = 128: eight 16-rank chunks of fp32 adapters
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.rand(M, K, device="cuda", generator=gen) + 0.5).bfloat16().requires_grad_()  # no zeros
    dy = (torch.rand(M, K, device="cuda", generator=gen) + 0.5).bfloat16()
    eye = torch.eye(K, device="cuda")  # fp32 adapters on a bf16 base: LoRALinear's default
    lora_A, lora_B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    zero = torch.zeros(K, K, device="cuda", dtype=torch.bfloat16)
    y = fused_lora_linear(x, zero, None, lora_A, lora_B, 1.0, p, dropout_seed=seed, backend="triton")
    y.backward(dy)
    mask = dropout_mask(seed, (M, K), p, "cuda", backend="triton")
    kept = mask != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.01
    assert torch.equal(y.detach() != 0, kept), "the forward used another mask than dropout_mask(seed)"
    assert torch.equal(x.grad != 0, kept), "the dX kernel used another mask than the forward"
    xd = x.detach().double() * mask.double()
    torch.testing.assert_close(y.detach().double(), xd, rtol=1e-2, atol=0)  # bf16 output
    torch.testing.assert_close(x.grad.double(), dy.double() * mask.double(), rtol=1e-2, atol=0)
    dyt_xd = dy.double().t() @ xd
    for name, grad in (("dA", lora_A.grad), ("dB", lora_B.grad)):
        torch.testing.assert_close(grad.double(), dyt_xd, rtol=1e-4, atol=1e-4 * dyt_xd.abs().max().item(),
                                   msg=f"{name}: the backward used another mask than the forward")


@check
def test_cuda_graph_replays_take_new_masks_each_right():
    """Forward + backward captured in a CUDA graph with the dropout seed drawn inside: two replays use two
    masks, and each replay's outputs and gradients equal an eager call with that replay's seed (read back from the
    graph's seed tensor)."""
    from fused_lora import draw_dropout_seed

    torch.manual_seed(0)
    M, K, N, r, p = 1024, 1024, 1024, 16, 0.3
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    a = (torch.randn(r, K, device="cuda") * K**-0.5).requires_grad_()
    b = (torch.randn(N, r, device="cuda") * r**-0.5).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xs = x.clone().requires_grad_()

    def step():
        seed = draw_dropout_seed("cuda")
        y = fused_lora_linear(xs, w, None, a, b, 2.0, p, dropout_seed=seed, backend="triton")
        return (seed, y, *torch.autograd.grad(y, (xs, a, b), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, tunes, self-checks and caches before the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([t.clone() for t in static])
    seeds = [int(rep[0]) for rep in replays]
    assert seeds[0] != seeds[1], "every replay must draw a new seed"
    assert not torch.equal(replays[0][1], replays[1][1]), "two replays used one mask"
    for seed, rep in zip(seeds, replays, strict=True):
        y = fused_lora_linear(xs, w, None, a, b, 2.0, p, dropout_seed=seed, backend="triton")
        eager = (y, *torch.autograd.grad(y, (xs, a, b), dy))
        for name, got, want in zip(("y", "dx", "dA", "dB"), rep[1:], eager, strict=True):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-5 * scale,
                                       msg=f"{name}: a replay differs from the eager call with its seed")


@check
def test_reduce_overhead_runs_cuda_graphs_with_fresh_masks():
    """torch.compile(mode="reduce-overhead") on a LoRALinear with dropout: no CPU op in the graph (the seed is drawn on
    the GPU), so inductor really uses CUDA graphs (no cudagraph skip), and steps draw different masks."""
    from torch._dynamo.utils import counters

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(512, 512, r=8, lora_dropout=0.1, init_lora_weights=False).cuda()
    x = torch.randn(256, 512, device="cuda")
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead")
    outs = []
    for _ in range(4):
        y = compiled(x)
        y.sum().backward()
        outs.append(y.detach().clone())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not torch.equal(outs[-1], outs[-2]), "two steps used one dropout mask"


# ------------------------------------------------------------------------------------------------ devices


@check
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_the_second_gpu_while_the_first_is_current():
    """Triton launches on the current device: a layer living on cuda:1 must run there (triton_launch.on_device) and
    match."""
    problem = make_problem((1024,), 1024, 1024, 16, torch.bfloat16, "linear", True, device="cuda:1")
    with torch.cuda.device(0):
        y = run_and_check(*problem, scaling=2.0, p=0.1, layout="linear", backend="triton")
        assert torch.cuda.current_device() == 0
    assert y.device == torch.device("cuda", 1)


# ------------------------------------------------------------------------------------------- real sizes


@check
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_each_dtype_and_layout_at_a_real_size(dtype, layout):
    problem = make_problem((2048,), 2048, 2048, 16, dtype, layout, True, device="cuda")
    run_and_check(*problem, scaling=2.0, p=0.1, layout=layout, backend="triton")


@check
def test_composed_gemm_at_a_real_size(monkeypatch):
    """FUSED_LORA_GEMM=composed (what Turing takes): cuBLAS's base GEMMs plus the in-place rank-r kernels."""
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    problem = make_problem((2048,), 2048, 2048, 16, torch.bfloat16, "linear", True, device="cuda")
    run_and_check(*problem, scaling=2.0, p=0.1, layout="linear", backend="triton")


# ---------------------------------------------------------------------------------- the rest (`tests`)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize(("M", "K", "N", "r"), [(4096, 4096, 4096, 16), (2048, 768, 2304, 8), (1000, 2048, 5000, 64)])
def test_realistic_sizes(dtype, layout, M, K, N, r):
    problem = make_problem((M,), K, N, r, dtype, layout, True, device="cuda")
    run_and_check(*problem, scaling=2.0, p=0.1, layout=layout, backend="triton")


def test_tf32_follows_torch_switch():
    problem = make_problem((512,), 1024, 1024, 16, torch.float32, "linear", False, device="cuda")
    x, w, _, a, b = problem
    ref = (x.double() @ w.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t())
    y = fused_lora_linear(x, w, None, a, b, 2.0)
    assert (y.double() - ref).abs().max().item() < 1e-3  # 3xTF32 by default: about fp32 accuracy
