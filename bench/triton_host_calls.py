"""The Triton path's host work per forward + backward, on any machine: every kernel stubbed out (nothing launched, the
interpreter never runs), so what is left is the Python and dispatch a GPU call pays before its launches. Prints the
Python function calls per fwd+bwd (cProfile's count: deterministic, unlike a clock on a shared machine) and the median
wall time, for p = 0 and p = 0.1, and optionally the calls per function.

    python bench/triton_host_calls.py                 # M=4, 64→64, r=8, fused GEMM, 1 thread
    python bench/triton_host_calls.py --by-function   # + calls per function (compare two checkouts with diff)

Works on a checkout from before the restructure too (it stubs every ``*_kernel`` attribute of every ``fused_lora``
module, wherever the launchers keep them).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # a CPU tensor may take the Triton backend (nothing is interpreted)
os.environ.setdefault("FUSED_LORA_GEMM", "fused")

import torch  # noqa: E402


class _Stub:
    """Stands for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> int:
    import fused_lora  # noqa: F401

    n = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("fused_lora") and module is not None:
            for attr in list(vars(module)):
                if attr.endswith("_kernel") and not attr.startswith("_"):
                    setattr(module, attr, _Stub())
                    n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--by-function", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stub_kernels()
    from fused_lora import fused_lora_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen).requires_grad_()
    w, b = torch.randn(64, 64, generator=gen), torch.randn(64, generator=gen)
    A = torch.randn(8, 64, generator=gen).requires_grad_()
    B = torch.randn(64, 8, generator=gen).requires_grad_()
    for p in (0.0, 0.1):
        def run(p=p):
            fused_lora_linear(x, w, b, A, B, 2.0, p, backend="triton").sum().backward()

        for _ in range(200):
            run()
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(args.iterations // 7):
                run()
            samples.append((time.perf_counter() - start) / (args.iterations // 7) * 1e6)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(100):
            run()
        profile.disable()
        stats = pstats.Stats(profile)
        calls = sum(nc for _, nc, _, _, _ in stats.stats.values()) // 100
        print(f"p={p}: {calls} Python calls per fwd+bwd, {statistics.median(samples):.1f} µs (median of 7)")
        if args.by_function:
            rows = sorted(((nc // 100, f"{f.rsplit('/', 1)[-1]}:{name}") for (f, _, name), (_, nc, _, _, _) in
                           stats.stats.items() if nc // 100), key=lambda r: r[1])
            for n, where in rows:
                print(f"  {n:4d} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
