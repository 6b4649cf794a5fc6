"""Per-call host cost of one LoRA layer: forward + backward at a shape where compute is negligible, so what is
measured is Python, dispatch and allocation (issue 14).

    python bench/host_cost.py                  # M=4, 64→64, r=8, 1 thread, p = 0 and 0.1; table on stdout
    python bench/host_cost.py --out DIR        # also host_cost.json / host_cost.md
    python bench/host_cost.py --threads 2 --tokens 16

Providers, called directly as modules (no PeftModel wrapper around PEFT's layer, no model around ours):
``nn.Linear`` (the frozen base layer alone), PEFT's ``lora.Linear`` layer, ``fused_lora.LoRALinear`` (the PyTorch
path on CPU; on a GPU the Triton kernels), each ``y = layer(x); y.sum().backward()`` with x requiring grad.
Median of interleaved rounds (every provider once per round, ``measure.time_cpu_interleaved``), so load from other
processes hits all alike. Target: fused ≤ 0.8× PEFT at p = 0 and p = 0.1.

On a GPU this is the time the host needs to issue one layer's work (the GPU is asynchronous; the loop waits on it
only at the end of each timed block), which small layers (GPT-2, Gemma-2B at short sequences: 20-60 µs of GPU
work per layer) are bound by.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

TARGET = 0.8


def layers(K: int, N: int, r: int, p: float, device: torch.device) -> dict[str, nn.Module]:
    import peft

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(K, N).to(device)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                     peft.LoraConfig(target_modules=["0"], r=r, lora_dropout=p,
                                                     init_lora_weights=False))
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_dropout=p, init_lora_weights=False)
    frozen = copy.deepcopy(base).requires_grad_(False)
    return {"base": frozen, "peft": peft_model.base_model.model[0].train(), "fused": ours.train()}


def measure_case(M: int, K: int, N: int, r: int, p: float, device: torch.device, rounds: int,
                 min_run_time: float) -> dict:
    provs = layers(K, N, r, p, device)
    x = torch.randn(M, K, device=device, requires_grad=True)

    def call(layer):
        def run():
            layer(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    times = measure.time_cpu_interleaved({k: call(m) for k, m in provs.items()}, rounds=rounds,
                                         min_run_time=min_run_time)
    us = {k: v["ms"] * 1e3 for k, v in times.items()}
    return {"M": M, "K": K, "N": N, "r": r, "p": p, "threads": torch.get_num_threads(), "us": us,
            "fused_over_peft": us["fused"] / us["peft"], "target": TARGET,
            "met": us["fused"] / us["peft"] <= TARGET}


def table(records: list[dict], device: torch.device) -> str:
    lines = [f"Host cost per forward+backward on {device} ({records[0]['threads']} thread(s)), median µs",
             "", "| M | K→N | r | p | nn.Linear | PEFT lora.Linear | fused LoRALinear | fused/PEFT | target ≤ 0.8 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        us = r["us"]
        lines.append(f"| {r['M']} | {r['K']}→{r['N']} | {r['r']} | {r['p']} | {us['base']:.1f} | {us['peft']:.1f} "
                     f"| {us['fused']:.1f} | {r['fused_over_peft']:.2f} | {'met' if r['met'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="total timing seconds per provider and case")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = [measure_case(args.tokens, args.features, args.features, args.r, p, device, args.rounds, args.seconds)
               for p in args.ps]
    text = table(records, device)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_cost.json").write_text(json.dumps(records, indent=1) + "\n")
        (args.out / "host_cost.md").write_text("# " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
