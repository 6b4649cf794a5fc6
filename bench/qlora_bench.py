"""QLoRA benchmark: one LoRA layer on a bitsandbytes 4-bit base, and a 4-bit Gemma2 training step, against PEFT's
QLoRA layers on the same quantized weights, side by side in one run.

    python bench/qlora_bench.py                        # CPU: Gemma-2-2B layer shapes at 512 tokens, fp32 compute
    python bench/qlora_bench.py --device cuda          # GPU: 4096 tokens, bf16 compute (bench/run_gpu.sh runs it)
    python bench/qlora_bench.py --quick --out DIR      # smaller, and write qlora.json / qlora.md

Providers per case: ``base`` (the frozen 4-bit layer alone, the floor), ``peft`` (PEFT 0.21's
``peft.tuners.lora.bnb.Linear4bit``: dequantize + matmul, then its eager LoRA ops; with dropout it keeps the dropped
copy of x and the mask), ``fused`` (``fused_lora.QuantizedLoRALinear``: on the Triton backend the 4-bit weight is
dequantized inside the base GEMM, on CPU the composed path: the layer's own matmul plus the LoRA branch added in
place, mask regenerated from a seed). Reported: median forward+backward time (interleaved rounds on CPU, CUDA events
on GPU) and the bytes saved for backward besides the parameters (``measure.saved_activation_bytes``).

Targets: saved activation per layer at p = 0.1 <= 0.55x PEFT QLoRA's (CPU and GPU); on a GPU, fwd+bwd
>= 1.3x faster than PEFT QLoRA at M = 4096, Gemma-2-2B shapes (K/N = 2304/9216), bf16 compute, r = 16, p = 0.05.
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

# Gemma-2-2B: hidden 2304, intermediate 9216, 8 heads × 256 (q 2304→2048), 4 KV heads (k/v 2304→1024).
SHAPES = {"gate_proj 2304→9216": (2304, 9216), "down_proj 9216→2304": (9216, 2304),
          "q_proj 2304→2048": (2304, 2048), "k_proj 2304→1024": (2304, 1024)}
QUICK_SHAPES = {"q_proj 2304→2048": (2304, 2048)}


def quantized(K: int, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=False)
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)


def providers(layer: nn.Module, r: int, p: float) -> dict[str, nn.Module]:
    import peft

    from fused_lora import LoRAConfig, inject_lora

    config = dict(target_modules=["0"], r=r, lora_alpha=2 * r, lora_dropout=p)
    peft_model = nn.Sequential(copy.deepcopy(layer))
    peft_model.is_loaded_in_4bit = True  # PEFT then dispatches its bitsandbytes LoRA class, as for a 4-bit HF model
    peft_model = peft.get_peft_model(peft_model, peft.LoraConfig(**config))
    fused = inject_lora(nn.Sequential(copy.deepcopy(layer)), LoRAConfig(**config))
    torch.manual_seed(1)
    for model in (peft_model, fused):  # non-zero B (PEFT's init is zero), the same in both
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)
    return {"base": nn.Sequential(copy.deepcopy(layer)), "peft": peft_model.train(), "fused": fused.train()}


def layer_case(name: str, K: int, N: int, M: int, r: int, p: float, dtype: torch.dtype, device: torch.device,
               rounds: int) -> dict:
    layer = quantized(K, N, dtype, device)
    provs = providers(layer, r, p)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)

    def step(model):
        def run():
            out = model(x)
            out.backward(dy)
        return run

    times = (measure.time_cpu_interleaved({k: step(m) for k, m in provs.items()}, rounds=rounds)
             if device.type == "cpu" else {k: measure.time_gpu(step(m)) for k, m in provs.items()})
    saved = {}
    for key, model in provs.items():
        params = [t for t in model.parameters()]
        saved[key], _ = measure.saved_activation_bytes(lambda m=model: m(x), exclude=params)
    rec = {"case": name, "M": M, "K": K, "N": N, "r": r, "p": p, "dtype": str(dtype).removeprefix("torch."),
           "ms": {k: v["ms"] for k, v in times.items()}, "saved_bytes": saved}
    rec["fused_over_peft_time"] = rec["ms"]["fused"] / rec["ms"]["peft"]
    rec["fused_over_peft_saved"] = saved["fused"] / max(saved["peft"], 1)
    return rec


def model_case(device: torch.device, dtype: torch.dtype, p: float, rounds: int, steps_batch: int = 8) -> dict:
    """One training step (forward, backward, AdamW) of a small Gemma2 classifier loaded in 4 bits, LoRA on q/k/v/o."""
    import tempfile

    import peft
    import transformers

    from fused_lora import LoRAConfig, inject_lora

    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_labels=2,
                                    pad_token_id=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        transformers.Gemma2ForSequenceClassification(cfg).save_pretrained(folder)
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                                llm_int8_skip_modules=["score"])
        load = lambda: transformers.Gemma2ForSequenceClassification.from_pretrained(  # noqa: E731
            folder, quantization_config=quant, torch_dtype=dtype, attn_implementation="eager",
            device_map="cpu" if device.type == "cpu" else {"": device.index or 0})
        config = dict(r=16, lora_alpha=32, lora_dropout=p, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="SEQ_CLS")
        models = {"peft": peft.get_peft_model(load(), peft.LoraConfig(**config)),
                  "fused": inject_lora(load(), LoRAConfig(**config))}
    ids = torch.randint(1, 256, (steps_batch, 128), device=device)
    labels = torch.randint(0, 2, (steps_batch,), device=device)
    optimizers = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
                  for k, m in models.items()}

    def step(key):
        def run():
            models[key](input_ids=ids, labels=labels).loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
        return run

    times = (measure.time_cpu_interleaved({k: step(k) for k in models}, rounds=rounds)
             if device.type == "cpu" else {k: measure.time_gpu(step(k)) for k in models})
    saved = {k: measure.saved_activation_bytes(lambda m=m: m(input_ids=ids, labels=labels).loss,
                                               exclude=list(m.parameters()))[0] for k, m in models.items()}
    return {"case": f"Gemma2 2×256 4-bit, batch {steps_batch}×128, q/k/v/o r=16", "p": p,
            "dtype": str(dtype).removeprefix("torch."), "ms": {k: v["ms"] for k, v in times.items()},
            "saved_bytes": saved, "fused_over_peft_time": times["fused"]["ms"] / times["peft"]["ms"],
            "fused_over_peft_saved": saved["fused"] / max(saved["peft"], 1)}


def table(records: list[dict]) -> str:
    lines = ["| case | M | p | dtype | base ms | PEFT ms | fused ms | fused/PEFT time | PEFT saved MiB | "
             "fused saved MiB | fused/PEFT saved |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ms, saved = r["ms"], r["saved_bytes"]
        base = ms.get("base", float("nan"))
        lines.append(f"| {r['case']} | {r.get('M', '')} | {r['p']} | {r['dtype']} | {base:.2f} | {ms['peft']:.2f} "
                     f"| {ms['fused']:.2f} | {r['fused_over_peft_time']:.2f} | {saved['peft'] / 2**20:.2f} "
                     f"| {saved['fused'] / 2**20:.2f} | {r['fused_over_peft_saved']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="M (default: 512 on CPU, 4096 on CUDA)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--quick", action="store_true", help="one shape, one p, fewer rounds (CI dry runs)")
    parser.add_argument("--no-model", action="store_true", help="skip the model-level step")
    parser.add_argument("--out", type=Path, help="write qlora.json and qlora.md here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M = args.tokens or (4096 if device.type == "cuda" else 512)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ps = args.ps[:1] if args.quick else args.ps
    rounds = 1 if args.quick else 3
    if args.quick:
        M = min(M, 128)
    records = [layer_case(name, K, N, M, args.r, p, dtype, device, rounds)
               for name, (K, N) in shapes.items() for p in ps]
    if not args.no_model:
        records += [model_case(device, dtype, p, rounds) for p in ps]
    text = (f"QLoRA on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
            f"torch {torch.__version__}, r={args.r}: fused-lora vs PEFT QLoRA (NF4, double quantization)\n\n"
            + table(records))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "qlora.json").write_text(json.dumps(records, indent=1) + "\n")
        (args.out / "qlora.md").write_text("# " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
