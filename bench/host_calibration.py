"""On a GPU: one LoRA layer's forward + backward, ours against PEFT's, wall clock and host time, at a layer whose GPU
work is negligible (16→16, 4 tokens: the host is all there is) and at GPT-2's c_attn (768→2304, 1024 tokens). It
checks bench/host_gpu.py's CPU estimate of the host cost (which adds published launch constants to CPU time) against
the real thing, and shows what the launch fast path saves (ours with it switched off).

    python bench/host_calibration.py                    # CUDA, bf16 and fp32, p = 0 and 0.1
    python bench/host_calibration.py --device cpu --quick   # the dry run (bench/run_gpu.sh on CPU; interpreted)

Per provider and case: ``host µs``, this thread's CPU time per call over a timed block of calls issued back to back
(the GPU is asynchronous: what the host spends issuing one call); ``wall µs``, the block's wall time per call with a
synchronize at its start and end (the throughput: the larger of host and GPU time). The host estimate of
bench/host_gpu.py is comparable to ``host µs`` at 16→16. Providers: PEFT's ``lora.Linear``; ``LoRALinear`` on the
fused and the composed path; the fused path with ``fused_lora.backends.fast_launch`` switched off (triton's own launch
path for every launch). One config per kernel (``FUSED_LORA_AUTOTUNE=0``): the host path is the same, the compiles
fewer.
"""

from __future__ import annotations

import os

os.environ.setdefault("FUSED_LORA_AUTOTUNE", "0")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = [("16→16, 4 tokens", 4, 16, 16), ("GPT-2 c_attn 768→2304, 1024 tokens", 1024, 768, 2304)]
PROVIDERS = ("peft", "fused", "composed", "fused, fast launch off")


def layers(K: int, N: int, r: int, p: float, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    import peft

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(K, N).to(device, dtype)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                     peft.LoraConfig(target_modules=["0"], r=r, lora_dropout=p,
                                                     init_lora_weights=False))
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_dropout=p, init_lora_weights=False)
    return {"peft": peft_model.base_model.model[0].train(), "ours": ours.train()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(label: str, M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, device: torch.device,
             rounds: int, calls: int, warmup: int) -> dict:
    from fused_lora.backends import fast_launch

    mods = layers(K, N, r, p, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device, dtype)

    def step_of(layer):
        params = [t for t in layer.parameters() if t.requires_grad] + [x]

        def step() -> None:
            layer(x).backward(dy)
            for t in params:
                t.grad = None

        return step

    settings = {"peft": ("fused", True), "fused": ("fused", True), "composed": ("composed", True),
                "fused, fast launch off": ("fused", False)}
    steps = {name: step_of(mods["peft" if name == "peft" else "ours"]) for name in settings}

    def switch(name: str) -> None:
        """The provider's path and fast-launch setting, then one untimed call (the switch's first launches take
        triton's path)."""
        gemm, fast = settings[name]
        os.environ["FUSED_LORA_GEMM"] = gemm
        if fast_launch.enabled() != fast:
            fast_launch.set_enabled(fast)
        steps[name]()

    for name, step in steps.items():
        switch(name)
        for _ in range(warmup):  # compile, the first-call self-check, the allocator
            step()
    host: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():  # interleaved: load on the host hits every provider alike
            switch(name)
            sync(device)
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                step()
            c1 = time.thread_time()
            sync(device)
            w1 = time.perf_counter()
            host[name].append((c1 - c0) / calls * 1e6)
            wall[name].append((w1 - w0) / calls * 1e6)
    fast_launch.set_enabled(True)
    os.environ.pop("FUSED_LORA_GEMM", None)
    med = lambda v: statistics.median(v)  # noqa: E731
    return {"case": label, "M": M, "K": K, "N": N, "r": r, "p": p, "dtype": str(dtype).removeprefix("torch."),
            "host_us": {k: med(v) for k, v in host.items()}, "wall_us": {k: med(v) for k, v in wall.items()},
            "rounds": rounds, "calls": calls}


def table(records: list[dict], header: str) -> str:
    lines = [header, "", "| case | p | dtype | " + " | ".join(f"{p} host µs" for p in PROVIDERS) + " | "
             + " | ".join(f"{p} wall µs" for p in PROVIDERS) + " | fused/PEFT host | fused/PEFT wall |",
             "|---|---:|---|" + "---:|" * (2 * len(PROVIDERS) + 2)]
    for rec in records:
        h, w = rec["host_us"], rec["wall_us"]
        lines.append(f"| {rec['case']} | {rec['p']} | {rec['dtype']} | "
                     + " | ".join(f"{h[p]:.1f}" for p in PROVIDERS) + " | "
                     + " | ".join(f"{w[p]:.1f}" for p in PROVIDERS)
                     + f" | {h['fused'] / h['peft']:.2f} | {w['fused'] / w['peft']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument("--quick", action="store_true", help="the dry run: 16→16 only, one round of two calls")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes, rounds, calls, warmup = SHAPES, args.rounds, args.calls, 10
    if args.quick:
        shapes, rounds, calls, warmup = SHAPES[:1], 1, 2, 1
    import triton

    records = []
    for dtype_name in args.dtypes:
        for label, M, K, N in shapes:
            for p in args.ps:
                records.append(run_case(label, M, K, N, args.r, p, getattr(torch, dtype_name), device, rounds,
                                        calls, warmup))
                print(table(records[-1:], f"{label}, p={p}, {dtype_name}"), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"One LoRA layer's forward + backward on {name}, r={args.r}, fp32 adapters, bias frozen; triton "
              f"{triton.__version__}, torch {torch.__version__}; median of {rounds} interleaved rounds of {calls} "
              "calls. host µs: this thread's CPU time per call (issuing); wall µs: per call with a synchronize around "
              f"the block.\nCommand: python bench/host_calibration.py {command}")
    text = table(records, header)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_calibration.json").write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
