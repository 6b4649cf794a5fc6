"""The launch fast path (fused_lora/backends/fast_launch.py) against triton's own launch path, on a CPU.

Triton's real path runs here: a stand-in CUDA driver (tests/fake_cuda.py) makes triton compile every kernel for sm_90
and hand each launch to a launcher that records it. Each test compares what the fast path hands the launcher (the
compiled function, grid, stream, hooks, every argument) with what ``Autotuner.run`` / ``JITFunction.run`` hand it for
the same call, and counts which path ran (``JITFunction.run`` calls). It needs a process without the interpreter
(``triton.jit`` decides at import): under the suite's ``TRITON_INTERPRET=1`` one test runs this file in a process of
its own with ``TRITON_INTERPRET=0``; ``.ci/triton36_fast_launch.sh`` runs it with triton 3.6 (the GPU machines').
A cold run compiles ~25 kernels (26 s with triton 3.6, 40 s with 3.9 on 2 cores); triton's cache makes later runs take
seconds. On CUDA (no stand-in), one test checks that a layer's fast launches give the bits triton's launches give.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from helpers import CUDA
from torch.utils._python_dispatch import TorchDispatchMode

from fused_lora import hardware
from fused_lora.backends import fast_launch, triton_launch
from fused_lora.kernels import configs

ROOT = Path(__file__).resolve().parents[1]
REAL_JIT = not configs.INTERPRET and not CUDA  # this process compiles with the stand-in driver
needs_real_jit = pytest.mark.skipif(not REAL_JIT, reason="runs in a process without the interpreter (see below)")


# --------------------------------------------------------------------------------------- either process


def test_tf32_state_is_hardwares_answer():
    """The launchers' fast TF32 read gives ``hardware.tf32_enabled``'s answer under both PyTorch APIs."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        for value in ("tf32", "ieee", "none"):
            matmul.fp32_precision = value
            assert triton_launch.tf32_state() == hardware.tf32_enabled(), value
        matmul.fp32_precision = "none"
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert triton_launch.tf32_state() == hardware.tf32_enabled() == flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        matmul.fp32_precision = before


@pytest.mark.skipif(not configs.INTERPRET, reason="the interpreter's process")
def test_off_under_the_interpreter():
    """No compiled kernel to call: every launch is the interpreter's, nothing is kept."""
    from fused_lora.backends import lora_triton

    assert not fast_launch.enabled()
    fast_launch.set_enabled(True)
    assert not fast_launch.enabled()
    x, A = torch.randn(5, 16), torch.randn(4, 16)
    for _ in range(2):
        lora_triton.lora_down(x, A, None, 0.0)
    assert all(not plan.site.entries for plan in lora_triton._down_plans.values())


@pytest.mark.skipif(not configs.INTERPRET or CUDA, reason="starts the real-JIT process from the interpreter's")
def test_in_a_process_without_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "0", "FUSED_LORA_BACKEND": "torch"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(Path(__file__))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= len(LAUNCHERS) + 10 and "failed" not in summary and "error" not in summary, summary


@pytest.mark.gpu
def test_on_a_gpu_fast_launches_compute_what_triton_s_launches_do(monkeypatch):
    """On CUDA: from the second call on no launch goes through JITFunction.run, and a layer's forward + backward gives
    the same bits with the fast path on and off (the same compiled kernels, arguments and stream)."""
    from triton.runtime.jit import JITFunction

    from fused_lora import fused_lora_linear

    normal = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: normal.append(1) or real_run(self, *a, **k))
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 64, generator=gen).cuda().bfloat16().requires_grad_()
    w, b = (torch.randn(48, 64, generator=gen) / 8).cuda().bfloat16(), torch.randn(48, generator=gen).cuda().bfloat16()
    A = (torch.randn(8, 64, generator=gen) / 8).cuda().requires_grad_()
    B = torch.randn(48, 8, generator=gen).cuda().requires_grad_()
    dy = torch.randn(3, 37, 48, generator=gen).cuda().bfloat16()

    def call():
        y = fused_lora_linear(x, w, b, A, B, 2.0, 0.1, dropout_seed=5, backend="triton")
        grads = torch.autograd.grad(y, (x, A, B), dy)
        return [y.detach(), *grads]

    try:
        call()
        normal.clear()
        fast = call()
        assert not normal, f"{len(normal)} launches went through JITFunction.run"
        fast_launch.set_enabled(False)
        slow = call()
        assert len(normal) >= 5
    finally:
        fast_launch.set_enabled(True)
    for a, b_ in zip(fast, slow, strict=True):
        assert torch.equal(a, b_) or a.dtype == torch.float32  # dA/dB use fp32 atomics: order may differ
        torch.testing.assert_close(a, b_)


# ------------------------------------------------------------------------------------- the real-JIT process

if REAL_JIT:
    from fake_cuda import describe, fake_cuda, package_on_fake_gpu
    from triton.runtime.jit import JITFunction

    from fused_lora import fused_lora_linear
    from fused_lora.backends import bnb4_triton, dora_triton, dropout_triton, lora_triton
    from fused_lora.backends.bnb4_triton import Packed4bit


@pytest.fixture
def gpu(monkeypatch):
    """The stand-in GPU, fused_lora routing CPU tensors as on an sm_90 GPU, one config per kernel (compile time; the
    autotuning test turns it back on), and ``gpu.normal``: the JITFunction.run calls so far. Triton's on-disk cache of
    autotuning results is off here: a test that counts benchmarks must not find an earlier run's result."""
    monkeypatch.setattr(configs, "AUTOTUNE", False)
    from triton.runtime.autotuner import Autotuner

    from fused_lora.kernels import catalog

    for name in catalog.__all__:
        kernel = getattr(catalog, name)
        if isinstance(kernel, Autotuner):
            monkeypatch.setattr(kernel, "cache_results", False)
    real_run = JITFunction.run
    with fake_cuda() as fake, package_on_fake_gpu():
        fake.normal = 0

        def counting(self, *args, **kwargs):
            fake.normal += 1
            return real_run(self, *args, **kwargs)

        monkeypatch.setattr(JITFunction, "run", counting)
        fast_launch.set_enabled(True)
        yield fake
    fast_launch.set_enabled(True)


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def _pack(N: int, K: int, nested: bool, gen) -> Packed4bit:
    """A random 4-bit weight (blocksize 64, NF4 codes): the kernels never read it here, only its layout matters."""
    blocks = -(-N * K // 64)
    fields = dict(data=torch.randint(0, 256, (-(-N * K // 2),), dtype=torch.uint8, generator=gen),
                  absmax=torch.rand(blocks, generator=gen), code=torch.linspace(-1, 1, 16), blocksize=64,
                  shape=(N, K), dtype=torch.bfloat16, quant_type="nf4")
    if nested:
        fields.update(absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen),
                      absmax2=torch.rand(-(-blocks // 256), generator=gen), code2=torch.linspace(-1, 1, 256),
                      offset=torch.zeros(1))
    return Packed4bit(**fields)


M, K, N, R = 37, 40, 48, 8
P = 0.1


def _launchers() -> dict:
    """name → a function of (generator) that makes fresh inputs and returns (call, inputs): ``call()`` launches once.
    bf16 activations with fp32 adapters (the precision and dtype paths), dropout on where a kernel has it."""
    bf16 = torch.bfloat16
    seed = torch.tensor([1234], dtype=torch.int64)

    def make(name, gen):
        x, dy = _rand(M, K, dtype=bf16, gen=gen), _rand(M, N, dtype=bf16, gen=gen)
        w = _rand(N, K, dtype=bf16, gen=gen)
        A, B, bias = _rand(R, K, gen=gen), _rand(N, R, gen=gen), _rand(N, dtype=bf16, gen=gen)
        s, ds = _rand(M, R, gen=gen), _rand(M, R, gen=gen)
        norm, mag = _rand(N, gen=gen).abs() + 1, _rand(N, gen=gen)
        pack = _pack(N, K, nested=True, gen=gen)
        calls = {
            "lora_down": lambda: lora_triton.lora_down(x, A, seed, P),
            "lora_forward": lambda: lora_triton.lora_forward(x, w, bias, s, B, 2.0, "linear"),
            "lora_up_add": lambda: lora_triton.lora_up_add(dy, s, B, 2.0),
            "lora_dy_pass": lambda: lora_triton.lora_dy_pass(dy, B, s, 2.0, True, True, True),
            "lora_dx": lambda: lora_triton.lora_dx(dy, w, ds, A, "linear", seed, P, bf16),
            "lora_dx_add": lambda: lora_triton.lora_dx_add(x, ds, A, seed, P),
            "lora_da": lambda: lora_triton.lora_da(ds, x, A, seed, P),
            "dropout_mask": lambda: dropout_triton.dropout_mask(seed, (M, K), P, x.device),
            "dora_norm": lambda: dora_triton.dora_norm(w, A, B, 2.0, "linear"),
            "dora_down": lambda: dora_triton.dora_down(x, A, seed, P),
            "dora_forward_gemm": lambda: dora_triton.dora_forward_gemm(x, x, w, bias, s, B, norm, mag, 2.0, P,
                                                                       "linear"),
            "dora_dy_pass": lambda: dora_triton.dora_dy_pass(dy, B, s, _rand(M, N, gen=gen), norm, mag, 2.0, True,
                                                             True, True, True, True, True),
            "dora_dx": lambda: dora_triton.dora_dx(dy, dy, w, ds, A, "linear", seed, P, bf16),
            "forward_4bit": lambda: bnb4_triton.forward_4bit(x, pack, bias, s, B, 2.0),
            "dx_4bit": lambda: bnb4_triton.dx_4bit(dy, pack, ds, A, seed, P, bf16),
            "dequantize": lambda: bnb4_triton.dequantize(pack),
        }
        inputs = [x, dy, w, A, B, bias, s, ds, norm, mag, seed, *pack.tensors()]
        return calls[name], inputs

    return make


LAUNCHERS = ["lora_down", "lora_forward", "lora_up_add", "lora_dy_pass", "lora_dx", "lora_dx_add", "lora_da",
             "dropout_mask", "dora_norm", "dora_down", "dora_forward_gemm", "dora_dy_pass", "dora_dx", "forward_4bit",
             "dx_4bit", "dequantize"]


def _same(fast, normal, inputs) -> list[str]:
    """``fast.same_as(normal)``, with the outputs a launcher allocates per call (new addresses each call) compared by
    dtype, shape, strides and 16-byte alignment; the caller's tensors by address."""
    known = {t.data_ptr() for t in inputs if t is not None}

    def norm(launch):
        args = tuple(("out", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
                     if isinstance(a, torch.Tensor) and a.data_ptr() not in known else a for a in launch.args)
        return launch.__class__(**{**launch.__dict__, "args": args})

    return norm(fast).same_as(norm(normal))


@needs_real_jit
@pytest.mark.parametrize("name", LAUNCHERS)
def test_fast_launch_repeats_the_normal_launch(gpu, name):
    """First call: triton's path (compiles, launches). Second: the fast path, no JITFunction.run, and it hands the
    launcher exactly what triton's path hands it for the same call (fast path off)."""
    call, inputs = _launchers()(name, torch.Generator().manual_seed(0))
    call()
    first, launched = gpu.normal, len(gpu.launches)
    assert first >= 1 and launched >= 1  # (triton 3.6 benchmarks even a single config: more than one)
    call()
    assert gpu.normal == first, "the second launch went through JITFunction.run"
    assert len(gpu.launches) == launched + 1
    fast = gpu.launches[-1]
    fast_launch.set_enabled(False)
    call()
    assert gpu.normal == first + 1
    normal = gpu.launches[-1]
    assert not _same(fast, normal, inputs), _same(fast, normal, inputs)
    assert gpu.function_name(fast.function) == normal.kernel


@needs_real_jit
def test_an_unaligned_view_takes_the_normal_path(gpu):
    """x at an odd element offset (2 bytes past a 16-byte boundary): triton compiles another variant (no divisibility
    on x_ptr); the fast path must not launch the aligned one with it, and keeps each variant apart afterwards."""
    gen = torch.Generator().manual_seed(1)
    buf = _rand(M * K + 1, dtype=torch.bfloat16, gen=gen)
    aligned, odd = buf[: M * K].view(M, K), buf[1:].view(M, K)
    assert aligned.data_ptr() % 16 == 0 and odd.data_ptr() % 16 == 2
    A, seed = _rand(R, K, gen=gen), torch.tensor([7])

    def launch(x):
        before = gpu.normal
        lora_triton.lora_down(x, A, seed, P)
        return gpu.launches[-1].function, gpu.normal - before

    f_aligned, normal = launch(aligned)
    assert normal >= 1
    f_odd, normal = launch(odd)
    assert normal >= 1 and f_odd != f_aligned  # a variant of its own, through triton's path
    assert launch(odd) == (f_odd, 0) and launch(aligned) == (f_aligned, 0)  # each kept apart, both fast


@needs_real_jit
@pytest.mark.parametrize("change", ["stride", "dtype"])
def test_a_new_stride_or_dtype_takes_the_normal_path(gpu, change):
    """x whose column stride stops being 1 (a strided view) or whose dtype changes: a new signature, compiled by
    triton's path, and each launch afterwards names the variant triton's path names for that input."""
    gen = torch.Generator().manual_seed(2)
    A, seed = _rand(R, K, gen=gen), torch.tensor([7])
    base = _rand(M, K, dtype=torch.bfloat16, gen=gen)
    other = (_rand(M, 2 * K, dtype=torch.bfloat16, gen=gen)[:, ::2] if change == "stride"
             else _rand(M, K, dtype=torch.float16, gen=gen))
    assert other.stride() != base.stride() or other.dtype != base.dtype

    def launch(x):
        before = gpu.normal
        lora_triton.lora_down(x, A, seed, P)
        return gpu.launches[-1], gpu.normal - before

    first_base, n = launch(base)
    assert n >= 1  # (triton 3.6 benchmarks a new autotuner key's one config: more than one JITFunction.run)
    first_other, n = launch(other)
    assert n >= 1 and first_other.function != first_base.function
    for x, want in ((base, first_base), (other, first_other), (base, first_base)):
        got, n = launch(x)
        assert n == 0 and got.function == want.function and got.args[3:14] == want.args[3:14]


@needs_real_jit
def test_the_autotuner_still_benchmarks_the_first_call(gpu, monkeypatch):
    """Autotuning on (several configs): the first call benchmarks each pruned config on the call's arguments, then
    launches the winner (here the last one benchmarked); later calls are fast and launch that same compiled winner."""
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    gpu.winner = "last"
    gen = torch.Generator().manual_seed(3)
    y, s, B = _rand(M, N, gen=gen), _rand(M, R, gen=gen), _rand(N, R, gen=gen)
    lora_triton.lora_up_add(y, s, B, 2.0)
    tuner = lora_triton.lora_up_add_kernel
    pruned = len(tuner.early_config_prune(tuner.configs, {"y_ptr": y, "ARCH": 90}, LORA_DOT=tl.float32, BLOCK_R=16))
    assert pruned >= 2 and gpu.bench_calls == pruned
    tuned = gpu.launches[-1]
    assert tuner.best_config is not tuner.configs[0]  # the last benchmarked won
    normal = gpu.normal
    lora_triton.lora_up_add(y, s, B, 2.0)
    assert gpu.normal == normal and gpu.bench_calls == pruned  # fast: no benchmark, no JITFunction.run
    assert not gpu.launches[-1].same_as(tuned)


@needs_real_jit
def test_a_replaced_autotuner_state_takes_the_normal_path(gpu, monkeypatch):
    """The autotuner's cache or fn replaced (a test harness counting launches, a fresh cache to tune again): triton's
    path, which benchmarks again for a new cache; fast again afterwards."""
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    gen = torch.Generator().manual_seed(7)
    y, s, B = _rand(M + 1, N, gen=gen), _rand(M + 1, R, gen=gen), _rand(N, R, gen=gen)
    tuner = lora_triton.lora_up_add_kernel
    monkeypatch.setattr(tuner, "cache", {})  # (other tests tuned this key already)
    for _ in range(2):
        lora_triton.lora_up_add(y, s, B, 2.0)
    benched, normal = gpu.bench_calls, gpu.normal
    assert benched >= 2
    monkeypatch.setattr(tuner, "cache", {})
    lora_triton.lora_up_add(y, s, B, 2.0)
    assert gpu.bench_calls == 2 * benched and gpu.normal > normal
    normal = gpu.normal
    lora_triton.lora_up_add(y, s, B, 2.0)
    assert gpu.normal == normal
    calls = []

    class Counting:  # as tests/autotune_harness.py wraps the autotuner's fn
        def __init__(self, fn):
            self.fn = fn

        def run(self, *args, **kwargs):
            calls.append(1)
            return self.fn.run(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.fn, name)

    monkeypatch.setattr(tuner, "fn", Counting(tuner.fn))
    for _ in range(2):
        lora_triton.lora_up_add(y, s, B, 2.0)
    assert len(calls) == 2  # every launch through the wrapper: nothing kept for a fn that is not a JITFunction


@needs_real_jit
def test_a_whole_layer_is_fast_from_its_second_call(gpu, monkeypatch):
    """fused_lora_linear forward + backward on the Triton path (fused and composed): 5 launches a call, none through
    triton's path from the second call on, and the same launches as triton's path makes."""
    for gemm in ("fused", "composed"):
        monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
        gen = torch.Generator().manual_seed(4)
        x = _rand(3, 11, K, dtype=torch.bfloat16, gen=gen).requires_grad_()
        w, bias = _rand(N, K, dtype=torch.bfloat16, gen=gen), _rand(N, dtype=torch.bfloat16, gen=gen)
        A, B = _rand(R, K, gen=gen).requires_grad_(), _rand(N, R, gen=gen).requires_grad_()
        dy = _rand(3, 11, N, dtype=torch.bfloat16, gen=gen)

        def call(x=x, w=w, bias=bias, A=A, B=B, dy=dy):
            fused_lora_linear(x, w, bias, A, B, 2.0, P, dropout_seed=5, backend="triton").backward(dy)
            return gpu.launches[-5:]

        call()
        normal, launched = gpu.normal, len(gpu.launches)
        fast = call()
        assert gpu.normal == normal and len(gpu.launches) == launched + 5
        fast_launch.set_enabled(False)
        slow = call()
        fast_launch.set_enabled(True)
        assert gpu.normal == normal + 5
        inputs = [x, w, bias, A, B, dy]
        for a, b in zip(fast, slow, strict=True):
            assert a.kernel == b.kernel and a.function == b.function and a.grid == b.grid, (a.kernel, b.kernel)
            assert len(a.args) == len(b.args)
            for u, v in zip(a.args, b.args, strict=True):
                if isinstance(u, torch.Tensor) and u.data_ptr() in {t.data_ptr() for t in inputs}:
                    assert describe(u) == describe(v)


@needs_real_jit
def test_launch_hooks_see_the_fast_launches(gpu):
    """A launch hook added to ``knobs.runtime.launch_enter_hook`` is called by fast launches with the metadata triton
    builds (name, function, stream); without hooks no metadata is built (nothing would read it)."""
    from triton import knobs

    gen = torch.Generator().manual_seed(5)
    x, A, seed = _rand(M, K, dtype=torch.bfloat16, gen=gen), _rand(R, K, gen=gen), torch.tensor([3])
    lora_triton.lora_down(x, A, seed, P)
    lora_triton.lora_down(x, A, seed, P)
    assert gpu.launches[-1].launch_metadata is None
    seen = []
    hook = lambda metadata: seen.append(dict(metadata.get()))  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        normal = gpu.normal
        lora_triton.lora_down(x, A, seed, P)
        assert gpu.normal == normal
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch = gpu.launches[-1]
    assert seen == [{"name": "lora_down_kernel", "function": launch.function, "stream": gpu.stream}]


@needs_real_jit
def test_a_fast_launch_is_legal_under_graph_capture(gpu, monkeypatch):
    """While a stream is being captured (torch says so; the stand-in driver reports the capture stream as current):
    the launch goes to that stream, and the launcher call runs no aten op (no allocation, no copy), reads no value
    to the host and synchronizes nothing. The launcher's own per-call work is its outputs' allocation only."""
    gen = torch.Generator().manual_seed(6)
    x, A, seed = _rand(M, K, dtype=torch.bfloat16, gen=gen), _rand(R, K, gen=gen), torch.tensor([3])
    lora_triton.lora_down(x, A, seed, P)  # warm-up before capture, as CUDA graphs require

    def forbidden(*args, **kwargs):
        raise AssertionError("a host sync or read during capture")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    gpu.stream = 4242  # the capture stream

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    normal = gpu.normal
    with Ops() as mode:
        lora_triton.lora_down(x, A, seed, P)
    assert gpu.normal == normal and gpu.launches[-1].stream == 4242
    assert mode.ops == ["empty_strided"], mode.ops  # S's buffer; the launch itself: none
    plan = next(iter(lora_triton._down_plans.values()))
    out = torch.empty(M, R)
    with Ops() as mode:
        plan.site.launch(lora_triton.lora_down_kernel, (x, A, out, *plan.ints, seed, P, 1 / (1 - P)))
    assert mode.ops == [] and gpu.launches[-1].stream == 4242


# ---------------------------------------------------------------- the guard, on a kernel of the test's own

if REAL_JIT:
    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)

    _hooked = []

    @triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=1, pre_hook=lambda args: _hooked.append(1)),
                              triton.Config({"BLOCK": 64}, num_warps=2, pre_hook=lambda args: _hooked.append(2))],
                     key=["n"])
    @triton.jit
    def _hooked_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


def _site():
    return fast_launch.LaunchSite((2,), {"BLOCK": 64}, torch.device("cpu"))


@needs_real_jit
def test_the_guard_turns_away_a_changed_dtype_or_knob(gpu, monkeypatch):
    """One site (one signature) given what its launcher's key should have kept apart: a dtype the kept launch was not
    compiled for, or a knob that enters triton's kernel cache key: triton's path, never the kept kernel."""
    from triton import knobs

    site = _site()
    x32, y32 = torch.randn(100), torch.empty(100)
    x16, y16 = torch.randn(100).half(), torch.empty(100).half()
    site.launch(_scale_kernel, (x32, y32, 100, 2.0))
    site.launch(_scale_kernel, (x32, y32, 100, 2.5))
    assert gpu.normal == 1 and gpu.launches[-1].args[3] == 2.5  # floats pass through, not specialized
    site.launch(_scale_kernel, (x16, y16, 100, 2.0))
    assert gpu.normal == 2 and gpu.launches[-1].function != gpu.launches[0].function
    site.launch(_scale_kernel, (x16, y16, 100, 2.0))
    assert gpu.normal == 2
    monkeypatch.setattr(knobs.runtime, "debug", True)
    site.launch(_scale_kernel, (x16, y16, 100, 2.0))
    assert gpu.normal == 3


@needs_real_jit
def test_a_config_pre_hook_keeps_triton_s_path(gpu):
    """A chosen config with a ``pre_hook`` (called by ``Autotuner.run`` at every launch): never launched fast."""
    x, y = torch.randn(100), torch.empty(100)
    site = fast_launch.LaunchSite(lambda meta: (triton.cdiv(100, meta["BLOCK"]),), {}, torch.device("cpu"))
    _hooked.clear()
    for _ in range(3):
        site.launch(_hooked_kernel, (x, y, 100, 2.0))
    assert len(_hooked) >= 3 and not site.entries


@needs_real_jit
def test_a_replaced_kernel_or_cleared_state_takes_the_normal_path(gpu):
    """A kernel object replaced (a test's stub, a re-decorated kernel) is called itself; ``fast_launch.clear()``
    drops what was kept."""
    site = _site()
    x, y = torch.randn(100), torch.empty(100)
    site.launch(_scale_kernel, (x, y, 100, 2.0))
    stubbed = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: stubbed.append(args)

    site.launch(Stub(), (x, y, 100, 2.0))
    assert len(stubbed) == 1 and gpu.normal == 1
    site.launch(_scale_kernel, (x, y, 100, 2.0))
    assert gpu.normal == 1  # the kept launch is still the real kernel's
    fast_launch.clear()
    site.launch(_scale_kernel, (x, y, 100, 2.0))
    assert gpu.normal == 2
    site.launch(_scale_kernel, (x, y, 100, 2.0))
    assert gpu.normal == 2
