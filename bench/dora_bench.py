"""DoRA benchmark: one DoRA layer, forward + backward, fused-lora against PEFT's DoRA layer and against fused-lora's own
plain LoRA on the same shapes, with the bytes each keeps for backward.

    python bench/dora_bench.py                     # CPU: 512 tokens, 256→256 and 1024→1024, r = 16, fp32, p = 0 / 0.1
    python bench/dora_bench.py --device cuda       # GPU: M = 8192, K = N = 4096, r = 16, bf16 (the GPU target case)
    python bench/dora_bench.py --quick --out DIR   # smaller, and write dora.json / dora.md

Providers: ``peft-dora`` (PEFT 0.21's ``lora.Linear`` with ``use_dora=True``: the norm of W + s·B A formed in full every
call, B A via an identity matmul, the base product computed again on the dropped input, ~15 eager ops), ``fused-dora``
(``LoRALinear(use_dora=True)``: on CUDA the DoRA kernels, 3 launches forward and 3 backward; on CPU the PyTorch path),
``fused-lora`` (``LoRALinear`` without DoRA: the cost DoRA adds) and ``base`` (the frozen layer alone). Reported: median
forward+backward time (interleaved rounds on CPU, CUDA events on GPU) and the bytes saved for backward besides the
parameters (``measure.saved_activation_bytes``).

Targets: on CPU, fused DoRA <= 0.8x PEFT DoRA's time and <= 0.5x its saved bytes at p = 0.1 (512 tokens,
256→256 and 1024→1024, r = 16); on a GPU, fused DoRA <= 1.2x fused LoRA's fwd+bwd at p = 0 (bf16, M = 8192,
K = N = 4096, r = 16).
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

CPU_SHAPES = {"256→256": (256, 256), "1024→1024": (1024, 1024)}
GPU_SHAPES = {"4096→4096": (4096, 4096)}


def providers(K: int, N: int, r: int, p: float, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    import peft

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(K, N).to(device, dtype)
    base.requires_grad_(False)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], use_dora=True))
    dora = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=True)
    lora = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=p)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B (the init is zero), the same in every adapted provider
        b = torch.randn(N, r, device=device) * 0.02
        peft_model.base_model.model[0].lora_B["default"].weight.copy_(b)
        dora.lora_B.copy_(b)
        lora.lora_B.copy_(b)
    return {"base": base, "peft-dora": peft_model.train(), "fused-dora": dora.train(), "fused-lora": lora.train()}


def case(name: str, K: int, N: int, M: int, r: int, p: float, dtype: torch.dtype, device: torch.device,
         rounds: int) -> dict:
    provs = providers(K, N, r, p, dtype, device)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)

    def step(model):
        def run():
            model(x).backward(dy)
        return run

    times = (measure.time_cpu_interleaved({k: step(m) for k, m in provs.items()}, rounds=rounds)
             if device.type == "cpu" else {k: measure.time_gpu(step(m)) for k, m in provs.items()})
    saved = {k: measure.saved_activation_bytes(lambda m=m: m(x), exclude=list(m.parameters()))[0]
             for k, m in provs.items()}
    ms = {k: v["ms"] for k, v in times.items()}
    return {"case": name, "M": M, "K": K, "N": N, "r": r, "p": p, "dtype": str(dtype).removeprefix("torch."),
            "ms": ms, "ms_q20": {k: v["ms_q20"] for k, v in times.items()},
            "ms_q80": {k: v["ms_q80"] for k, v in times.items()}, "saved_bytes": saved,
            "dora_over_peft_time": ms["fused-dora"] / ms["peft-dora"],
            "dora_over_peft_saved": saved["fused-dora"] / max(saved["peft-dora"], 1),
            "dora_over_lora_time": ms["fused-dora"] / ms["fused-lora"]}


def table(records: list[dict]) -> str:
    lines = ["| case | M | p | dtype | base ms | PEFT DoRA ms | fused DoRA ms | fused LoRA ms | DoRA/PEFT time "
             "| DoRA/LoRA time | PEFT DoRA saved MiB | fused DoRA saved MiB | fused LoRA saved MiB | DoRA/PEFT saved |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ms, saved = r["ms"], r["saved_bytes"]
        lines.append(f"| {r['case']} | {r['M']} | {r['p']} | {r['dtype']} | {ms['base']:.2f} | {ms['peft-dora']:.2f} "
                     f"| {ms['fused-dora']:.2f} | {ms['fused-lora']:.2f} | {r['dora_over_peft_time']:.2f} "
                     f"| {r['dora_over_lora_time']:.2f} | {saved['peft-dora'] / 2**20:.2f} "
                     f"| {saved['fused-dora'] / 2**20:.2f} | {saved['fused-lora'] / 2**20:.2f} "
                     f"| {r['dora_over_peft_saved']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="M (default: 512 on CPU, 8192 on CUDA)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (CPU)")
    parser.add_argument("--quick", action="store_true", help="one small shape, one round (CI dry runs)")
    parser.add_argument("--out", type=Path, help="write dora.json and dora.md here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M = args.tokens or (8192 if device.type == "cuda" else 512)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    rounds = args.rounds
    if args.quick:
        M, shapes, rounds = min(M, 128), {"256→256": (256, 256)}, 1
    records = [case(name, K, N, M, args.r, p, dtype, device, rounds) for name, (K, N) in shapes.items()
               for p in args.ps]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = (f"DoRA on {device} ({where}), torch {torch.__version__}, r={args.r}: fused-lora DoRA vs PEFT DoRA and "
            "fused-lora LoRA, one layer forward+backward\n\n" + table(records))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dora.json").write_text(json.dumps(records, indent=1) + "\n")
        (args.out / "dora.md").write_text("# " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
