"""pytest-benchmark cases for one LoRA linear layer, one test per (case, provider, mode).

    pytest bench/ --benchmark-only                              # CPU: ~1-2 min on 2 cores (2 compiles)
    pytest bench/ --benchmark-only --benchmark-group-by=group   # one comparison table per case and mode
    pytest bench/ --benchmark-only -k "not compile"             # skip torch.compile (its compile time)

Small cases on CPU (fp32), the GPU target case on CUDA (bf16). pytest-benchmark times with a wall clock,
so on CUDA every call ends with a synchronize. layer_bench.py is the full benchmark (ratios, saved bytes,
launches, JSON and plot); these tests give pytest-benchmark's statistics and history (--benchmark-save).
"""

from __future__ import annotations

import pytest
import torch
from measure import saved_activation_bytes, sync
from providers import PROVIDERS, LayerShape, build, make_case

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# On CPU the fused provider takes the PyTorch path even under TRITON_INTERPRET=1 (interpreted kernels are
# a correctness tool, not something to time).
BACKEND = None if CUDA else "torch"

if CUDA:
    CASES = [LayerShape(8192, 4096, 4096, 16, 0.1, False, "gpu_target")]
else:
    CASES = [LayerShape(512, 1024, 1024, 16, 0.1, True, "cpu_small"),
             LayerShape(512, 1024, 1024, 16, 0.0, True, "cpu_small")]


def _case_id(shape: LayerShape) -> str:
    return f"M{shape.M}-{shape.K}x{shape.N}-r{shape.r}-p{shape.p:g}"


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def case(request):
    return make_case(request.param, DEVICE, DTYPE)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer(benchmark, case, provider, mode):
    prov = build(provider, case, backend=BACKEND)
    x, dy = case.xs[0], case.dy

    if mode == "fwd":
        def fn():
            out = prov.forward(x)
            sync(DEVICE)
            return out
    else:
        def fn():
            out = torch.autograd.grad(prov.forward(x), prov.grad_inputs(x), dy)
            sync(DEVICE)
            return out

    for _ in range(2):  # warm-up outside the statistics: torch.compile, Triton autotuning
        fn()
    s = case.shape
    benchmark.group = f"{DTYPE} M={s.M} {s.K}->{s.N} r={s.r} p={s.p:g} {mode}"
    saved, _ = saved_activation_bytes(lambda: prov.forward(x), exclude=prov.frozen + prov.params)
    benchmark.extra_info.update(provider=provider, mode=mode, saved_bytes=saved, note=prov.note)
    result = benchmark(fn)
    assert all(torch.isfinite(g).all() for g in (result if mode == "fwdbwd" else [result]))
