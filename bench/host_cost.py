"""Per-call host cost of one LoRA layer: forward + backward at a shape where compute is negligible, so what is
measured is Python, dispatch and allocation.

    python bench/host_cost.py                  # M=4, 64→64, r=8, 1 thread, p = 0 and 0.1; table on stdout
    python bench/host_cost.py --out DIR        # also host_cost.json / host_cost.md
    python bench/host_cost.py --threads 2 --tokens 16
    TRITON_INTERPRET=1 python bench/host_cost.py --counts   # + the Triton path's launches, allocations, aten ops

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
# aten factory ops: what allocates a new tensor (views and in-place ops do not)
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "full", "new_empty",
                "new_zeros", "randint", "rand", "clone", "_to_copy"}


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


class _CountingKernel:
    """Stands for a Triton kernel: counts its launches and launches nothing (the counts are of the host path)."""

    def __init__(self, name: str, launches: list[str]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches.append(self.name)
        return launch


def triton_path_counts(M: int = 64, K: int = 96, N: int = 80, r: int = 8, p: float = 0.1, bias_grad: bool = True,
                       dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype = torch.float32,
                       gemm: str = "fused") -> dict:
    """Kernel launches, allocations and aten ops of one ``fused_lora_linear`` forward + backward on the Triton
    backend, counted on the host: every kernel is replaced by a counter (nothing is computed), and a
    ``TorchDispatchMode`` records the aten ops the launchers dispatch. Runs anywhere the Triton backend can be
    selected (a GPU, or the CPU under TRITON_INTERPRET=1). The numbers are held by tests/test_host_path.py."""
    import os

    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_lora import fused_lora_linear
    from fused_lora.backends import bnb4_triton, dora_triton, dropout_triton, lora_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launches: list[str] = []
    ops: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    # the kernels as the launcher modules hold them (module globals, looked up at each launch)
    launchers = (lora_triton, dora_triton, bnb4_triton, dropout_triton)
    saved = {(m, n): getattr(m, n) for m in launchers for n in vars(m) if n.endswith("_kernel")}
    env = os.environ.get("FUSED_LORA_GEMM")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_()
    w = torch.randn(N, K, generator=gen).to(device, dtype)
    b = torch.randn(N, generator=gen).to(device, dtype).requires_grad_(bias_grad)
    A = torch.randn(r, K, generator=gen).to(device, adapter_dtype).requires_grad_()
    B = torch.randn(N, r, generator=gen).to(device, adapter_dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    try:
        for m, n in saved:
            setattr(m, n, _CountingKernel(n, launches))
        os.environ["FUSED_LORA_GEMM"] = gemm
        with Ops():
            y = fused_lora_linear(x, w, b, A, B, 2.0, p, dropout_seed=3, backend="triton")
            forward_ops, forward_launches = len(ops), len(launches)
            y.backward(dy)
    finally:
        for (m, n), k in saved.items():
            setattr(m, n, k)
        if env is None:
            os.environ.pop("FUSED_LORA_GEMM", None)
        else:
            os.environ["FUSED_LORA_GEMM"] = env
    return {"launches": launches, "forward_launches": forward_launches, "ops": ops, "forward_ops": forward_ops,
            "allocations": [o for o in ops if o in _ALLOCATIONS]}


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
    parser.add_argument("--counts", action="store_true",
                        help="also count the Triton path's launches, allocations and aten ops (needs a GPU or "
                             "TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = [measure_case(args.tokens, args.features, args.features, args.r, p, device, args.rounds, args.seconds)
               for p in args.ps]
    text = table(records, device)
    if args.counts:
        text += "\nTriton path, one forward + backward (kernels counted, not run; bias trained, fp32 adapters):\n\n"
        text += "| path | p | launches fwd/bwd | allocations | aten ops fwd/bwd |\n|---|---:|---|---:|---|\n"
        for gemm in ("fused", "composed"):
            for p in args.ps:
                c = triton_path_counts(p=p, gemm=gemm)
                text += (f"| {gemm} | {p} | {c['forward_launches']}/{len(c['launches']) - c['forward_launches']} "
                         f"| {len(c['allocations'])} ({', '.join(c['allocations'])}) "
                         f"| {c['forward_ops']}/{len(c['ops']) - c['forward_ops']} |\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_cost.json").write_text(json.dumps(records, indent=1) + "\n")
        (args.out / "host_cost.md").write_text("# " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
