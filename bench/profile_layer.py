"""Where the time of one LoRA layer's forward+backward goes, per operator, for chosen providers.

    python bench/profile_layer.py                                # CPU target case: peft vs fused
    python bench/profile_layer.py --providers base peft fused --M 2048 --K 1024 --N 1024 --r 16 --p 0.1
    python bench/profile_layer.py --device cuda --dtype bfloat16 --M 8192 --K 4096 --N 4096

Runs ``--iters`` fwd+bwd steps under ``torch.profiler`` and prints, per provider, the operators (CPU: aten
ops; CUDA: kernels) sorted by self time per step, with their input shapes. The numbers carry the profiler's
overhead; compare providers with each other, not with layer_bench's timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import sync  # noqa: E402
from providers import PROVIDERS, LayerShape, build, make_case  # noqa: E402


def profile_provider(name: str, case, device: torch.device, iters: int, rows: int, backend: str | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    prov = build(name, case, backend=backend)
    x, dy = case.xs[0], case.dy

    def step():
        return torch.autograd.grad(prov.forward(x), prov.grad_inputs(x), dy)

    for _ in range(3):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows,
                                                               max_name_column_width=28,
                                                               max_shapes_column_width=70)
    total_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, total_key, 0) or 0 for e in prof.key_averages())
    return f"## {name}: {total / iters / 1e3:.1f} ms self time per fwd+bwd (profiled, {iters} steps)\n{table}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--providers", nargs="+", default=["peft", "fused"], choices=list(PROVIDERS))
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--no-bias", dest="bias", action="store_false")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--fused-backend", choices=["torch", "triton"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = args.fused_backend or ("torch" if device.type == "cpu" else None)
    case = make_case(LayerShape(args.M, args.K, args.N, args.r, args.p, args.bias), device, getattr(torch, args.dtype))
    for name in args.providers:
        print(profile_provider(name, case, device, args.iters, args.rows, backend), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
