"""What the first-call self-check costs at a real layer's shape: its extra peak memory and time, on any machine.

The kernels are replaced by the PyTorch path (it stands in for them: the check compares a path's results with the
PyTorch path in the same dtypes and in fp64, whatever computed them), p = 0, one forward+backward of one layer, in a
fresh process per measurement. Memory: the process's resident set, sampled every millisecond by a thread, with glibc
told to return every large block at once (``MALLOC_MMAP_THRESHOLD_``), so that it follows the live bytes; the check's
extra is the peak of a checked call less the peak of the same call unchecked, both over the resident set before it.

    python bench/self_check_cost.py                                  # Gemma-2-9B MLP down_proj-like: M 8192 bf16
    python bench/self_check_cost.py --tokens 65536
    python bench/self_check_cost.py --checkout /tmp/old --label before   # another checkout of fused-lora (before)

The Gemma-2-9B MLP shape: K = 3584 (hidden), N = 14336 (intermediate), r = 16, bf16 (the issue's numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(r'''
    import json, os, sys, threading, time
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend on CPU (nothing is interpreted: the kernels are replaced)
    sys.path.insert(0, CHECKOUT)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]  # that checkout only
    import torch
    torch.set_num_threads(THREADS)
    import fused_lora

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    class Peak:
        def __init__(self):
            self.base, self.peak, self.on = rss(), 0, True
            self.window = None  # [rss at the window's start, its peak]: the check's own extra live bytes
            self.windows = []
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()

        def run(self):
            while self.on:
                now = rss()
                self.peak = max(self.peak, now - self.base)
                if self.window is not None:
                    self.window[1] = max(self.window[1], now)
                time.sleep(0.001)

        def open(self):
            now = rss()
            self.window = [now, now]

        def close(self):
            w, self.window = self.window, None
            self.windows.append(max(w[1], rss()) - w[0])

        def stop(self) -> int:
            self.on = False
            self.thread.join()
            return max(self.peak, rss() - self.base)

    PEAK = [None]
    check_s = [0.0]

    def windowed(fn):  # the check's own extra memory and time: a window around each comparison
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            if PEAK[0] is not None:
                PEAK[0].open()
            try:
                return fn(*args, **kwargs)
            finally:
                if PEAK[0] is not None:
                    PEAK[0].close()
                check_s[0] += time.perf_counter() - start
        return wrapped

    # the kernels' passes → the PyTorch path (the new driver: the dense kind's passes; before: the Triton module's)
    if os.path.exists(os.path.join(CHECKOUT, "fused_lora", "bases", "__init__.py")):
        from fused_lora import bases
        from fused_lora.backends import lora_torch
        kind = bases.get("dense")
        kind.passes[("lora", "fused")] = lora_torch.DENSE
        from fused_lora import diagnostics
        from fused_lora.autograd import driver
        driver._compare_forward = windowed(driver._compare_forward)
        driver._compare_backward = windowed(driver._compare_backward)
        clear = diagnostics.clear
    else:
        from fused_lora.backends import gemm_choice, lora_torch, lora_triton, self_check
        lora_triton.forward = lambda *a, **k: lora_torch.forward(*a[:9])
        lora_triton.backward = lambda *a, **k: lora_torch.backward(*a[:14])
        self_check.check = windowed(self_check.check)
        def clear():
            self_check.clear()
            gemm_choice.clear()
    os.environ["FUSED_LORA_BACKEND"] = "triton"
    os.environ["FUSED_LORA_GEMM"] = "fused"
    M, K, N, R = TOKENS, 3584, 14336, 16
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(M, K, generator=gen) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    A = (torch.randn(R, K, generator=gen) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, R, generator=gen) * 0.01).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype)

    def step(mode):
        clear()
        fused_lora.set_verify(mode)
        x.grad = A.grad = B.grad = None
        peak = PEAK[0] = Peak()
        check_s[0] = 0.0
        start = time.perf_counter()
        y = fused_lora.fused_lora_linear(x, w, None, A, B, 2.0, 0.0, backend="triton")
        fwd = time.perf_counter() - start
        y.backward(dy)
        total = time.perf_counter() - start
        del y
        PEAK[0] = None
        return {"peak_bytes": peak.stop(), "forward_s": fwd, "total_s": total, "check_s": check_s[0],
                "check_extra_bytes": max(peak.windows, default=0)}

    step("off")  # warm-up: allocator, thread pools
    off, on = step("off"), step(MODE)
    print(json.dumps({"off": off, "checked": on}))
''')


def measure(checkout: Path, tokens: int, threads: int, mode: str) -> dict:
    code = WORKER.replace("CHECKOUT", repr(str(checkout))).replace("THREADS", str(threads)).replace(
        "TOKENS", str(tokens)).replace("MODE", repr(mode))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--label", default="after")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for tokens in args.tokens:
        r = measure(args.checkout, tokens, args.threads, "first")
        rows.append({"label": args.label, "tokens": tokens, **r})
        if "error" in r:
            print(f"{args.label} M={tokens}: {r['error']}", flush=True)
            continue
        extra_mb = (r["checked"]["peak_bytes"] - r["off"]["peak_bytes"]) / 2**20
        own_mb = r["checked"]["check_extra_bytes"] / 2**20
        print(f"{args.label} M={tokens}: call {r['off']['total_s']:.1f} s, peak {r['off']['peak_bytes'] / 2**20:.0f} "
              f"MiB unchecked; checked: the step's peak +{extra_mb:.0f} MiB, the check's own live bytes up to "
              f"{own_mb:.0f} MiB, its time {r['checked']['check_s']:.1f} s (the checked step took "
              f"{r['checked']['total_s']:.1f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
