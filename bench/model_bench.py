"""Model benchmark: one training step (forward, backward, AdamW) of a GPT-2-small-shaped and a Gemma-2B-shaped
model with LoRA on every linear layer of the blocks, fused-lora against PEFT.

    python bench/model_bench.py                  # CPU: 2 GPT-2 layers / 1 Gemma layer, short sequences
    python bench/model_bench.py --device cuda    # GPU: the full depths (12 / 18 layers), bf16

Models are built from transformers configs with random weights (nothing is downloaded). Both providers
start from the same base weights and the same adapter weights (PEFT's are copied from fused-lora's), so at
p = 0 their first losses must agree: the script checks it. Adapters are float32 on a half-precision base
for both (PEFT's ``autocast_adapter_dtype=True`` default and ``LoRALinear``'s). Writes model.json,
model.md and model.png into --out.

Measured per (model, p, provider): median step time (GPU: CUDA events; CPU: wall clock, the providers'
steps interleaved in rounds so background load hits both alike), peak memory above the resting state
(GPU), and bytes saved for backward by the forward (unique storages, excluding all model parameters).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import report  # noqa: E402

MODELS = ("gpt2", "gemma")
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: attention qkv, attention out, mlp in, mlp out
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def model_config(name: str, device: str, args) -> tuple[object, dict]:
    """A transformers config and the run's sizes. CPU runs keep the layer widths (the LoRA layers are what
    is compared) but cut depth, sequence and vocabulary: a 50k/256k-entry LM head would dominate a 2-core step."""
    from transformers import GemmaConfig, GPT2Config

    gpu = device == "cuda"
    if name == "gpt2":
        sizes = {"layers": 12, "batch": 8, "seq": 1024, "vocab": 50257} if gpu else \
            {"layers": 2, "batch": 2, "seq": 256, "vocab": 8192}
    else:
        sizes = {"layers": 18, "batch": 4, "seq": 1024, "vocab": 256000} if gpu else \
            {"layers": 1, "batch": 2, "seq": 128, "vocab": 8192}
    for key in ("layers", "batch", "seq", "vocab"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if name == "gpt2":
        # The model's own dropouts off (Gemma has none): they cost both providers the same, and without them
        # the p = 0 losses of the two providers must agree, which checks that both compute the same model.
        cfg = GPT2Config(n_embd=768, n_head=12, n_layer=sizes["layers"], vocab_size=sizes["vocab"],
                         n_positions=max(1024, sizes["seq"]), use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
    else:  # Gemma-2B: hidden 2048, MLP 16384, 8 query heads of 256, one KV head (MQA)
        cfg = GemmaConfig(vocab_size=sizes["vocab"], hidden_size=2048, intermediate_size=16384,
                          num_hidden_layers=sizes["layers"], num_attention_heads=8, num_key_value_heads=1,
                          head_dim=256, max_position_embeddings=max(8192, sizes["seq"]), use_cache=False)
    return cfg, sizes


def build_base(name: str, cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 2.5B-parameter CPU init takes a minute
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype=dtype).train()


def add_fused(model: nn.Module, name: str, r: int, p: float) -> nn.Module:
    """fused-lora on every targeted linear layer (``inject_lora``; a plain module swap where it is absent)."""
    try:
        from fused_lora import LoRAConfig, inject_lora
    except ImportError:
        inject_lora = None
    if inject_lora is not None:
        return inject_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=TARGETS[name],
                                             init_lora_weights=False))
    from fused_lora import LoRALinear

    model.requires_grad_(False)
    for path, module in list(model.named_modules()):
        if path.rpartition(".")[2] in TARGETS[name]:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    LoRALinear.from_linear(module, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False))
    return model


def add_peft(model: nn.Module, name: str, r: int, p: float, fused: nn.Module) -> nn.Module:
    """PEFT's LoRA on the same modules, its adapters copied from the fused model's so both compute the same."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=TARGETS[name],
                     fan_in_fan_out=name == "gpt2", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for path, module in fused.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.Parameter):
                target = inner.get_submodule(path)
                target.lora_A["default"].weight.copy_(module.lora_A)
                target.lora_B["default"].weight.copy_(module.lora_B)
    return peft_model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainer:
    """One provider's model, optimizer and batch; ``step()`` runs forward, backward and AdamW once."""

    def __init__(self, name: str, model: nn.Module, ids: torch.Tensor) -> None:
        self.name, self.model, self.ids = name, model, ids
        self.params = trainable(model)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.times_ms: list[float] = []

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return loss.item()

    def timed_step(self, device: torch.device) -> None:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            end.synchronize()
            self.times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            self.step()
            self.times_ms.append((time.perf_counter() - t0) * 1e3)


def run_model(name: str, p: float, device: torch.device, dtype: torch.dtype, args) -> list[dict]:
    cfg, sizes = model_config(name, device.type, args)
    base = build_base(name, cfg, device, dtype)
    fused = add_fused(copy.deepcopy(base), name, args.r, p)
    peft = add_peft(base, name, args.r, p, fused)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=gen).to(device)
    trainers = [Trainer("fused", fused, ids), Trainer("peft", peft, ids)]
    common = {"model": name, "p": p, "r": args.r, "dtype": str(dtype).replace("torch.", ""), **sizes,
              "device": report.device_name(device)}
    out = {t.name: {**common, "provider": t.name} for t in trainers}

    for t in trainers:  # first losses (same weights): equal at p = 0 up to rounding
        out[t.name]["first_loss"] = t.loss().item()
        out[t.name]["trainable_params"] = sum(p.numel() for p in t.params)
        out[t.name]["adapted_layers"] = sum(1 for m in t.model.modules() if _is_lora(m))
    for t in trainers:
        saved, loss = measure.saved_activation_bytes(t.loss, exclude=list(t.model.parameters()))
        out[t.name]["saved_bytes"] = saved
        del loss
    for t in trainers:
        for _ in range(args.warmup):
            t.step()
        measure.sync(device)
        out[t.name]["peak_bytes"] = measure.peak_extra_bytes(t.step, device)
    for _ in range(args.rounds):  # interleaved, so background load hits both providers alike
        for t in trainers:
            for _ in range(args.steps):
                t.timed_step(device)
    for t in trainers:
        ms = sorted(t.times_ms)
        out[t.name].update(step_ms=statistics.median(ms), step_ms_min=ms[0], step_ms_max=ms[-1], steps=len(ms))
    fused_r, peft_r = out["fused"], out["peft"]
    fused_r["x_peft_time"] = fused_r["step_ms"] / peft_r["step_ms"]
    fused_r["x_peft_saved"] = fused_r["saved_bytes"] / peft_r["saved_bytes"] if peft_r["saved_bytes"] else None
    if fused_r["peak_bytes"] is not None and peft_r["peak_bytes"]:
        fused_r["x_peft_peak"] = fused_r["peak_bytes"] / peft_r["peak_bytes"]
    if p == 0:
        diff = abs(fused_r["first_loss"] - peft_r["first_loss"])
        fused_r["loss_diff_vs_peft"] = diff
        if diff > 1e-3 * max(1.0, abs(peft_r["first_loss"])) * (1 if dtype == torch.float32 else 20):
            fused_r["warning"] = f"first loss differs from PEFT's by {diff:.3g} at p=0"
    return [fused_r, peft_r]


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A")


def model_table(runs: list[dict]) -> str:
    header = ["model", "p", "provider", "layers×(batch·seq)", "step ms", "×PEFT time", "peak MiB", "saved MiB",
              "×PEFT saved", "first loss"]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["model"], f"{r['p']:g}", "error: " + r["error"][:80]] + [""] * (len(header) - 3))
            continue
        rows.append([r["model"], f"{r['p']:g}", r["provider"], f"{r['layers']}×({r['batch']}·{r['seq']})",
                     report.fmt(r["step_ms"], ".1f"), report.fmt(r.get("x_peft_time")), report.mib(r["peak_bytes"]),
                     report.mib(r["saved_bytes"]), report.fmt(r.get("x_peft_saved")),
                     report.fmt(r["first_loss"], ".4f")])
    return report.markdown_table(header, rows)


def write_outputs(payload: dict, out_dir: Path) -> str:
    """model.json and model.md; returns the table."""
    report.write_json(out_dir / "model.json", payload)
    env = payload["environment"]
    head = (f"# Model benchmark: {env['device']}\n\n{env['date']}; torch {env['torch']}, peft {env['peft']}, "
            f"transformers {env['transformers']}, {env['torch_threads']} threads; load average before/after "
            f"{payload['load_before']} / {payload.get('load_after')}; commit {env['git_commit']}.\n")
    table = model_table(payload["runs"])
    (out_dir / "model.md").write_text(f"{head}\n{table}\n")
    return table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="base weights (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ps", nargs="+", type=float, default=[0.1, 0.0])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per provider per round")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's, one per core)")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="CPU: before each run, wait for the load average to drop under cores/2 (at most this "
                         "many seconds over the whole run)")
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    if device.type == "cpu":
        os.environ["FUSED_LORA_BACKEND"] = "torch"  # never the interpreted kernels, even under TRITON_INTERPRET=1
    if args.threads:
        torch.set_num_threads(args.threads)
    wait_until = time.time() + args.wait_quiet  # one waiting allowance for the whole run
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out_dir = args.out or report.default_out_dir(device)
    payload = {"kind": "model", "environment": report.environment(device), "argv": sys.argv[1:],
               "load_before": report.load_average(), "runs": []}
    print(f"# model benchmark on {payload['environment']['device']} → {out_dir}", flush=True)
    for p in args.ps:  # p-major: under a time cap, both models' p = 0.1 runs (the usual setting) come first
        for name in args.models:
            if device.type == "cpu" and wait_until > time.time():  # before every run: load comes and goes
                report.wait_for_quiet(wait_until - time.time())
            t0 = time.time()
            try:
                runs = run_model(name, p, device, dtype, args)
            except Exception as exc:  # out of memory, a transformers API change: record, go on
                runs = [{"model": name, "p": p, "error": f"{type(exc).__name__}: {exc}"}]
            for r in runs:
                r["seconds"] = round(time.time() - t0, 1)
            payload["runs"].extend(runs)
            print(model_table(runs), flush=True)
            payload["load_after"] = report.load_average()
            write_outputs(payload, out_dir)  # after every run: a run cut off keeps what it measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n" + write_outputs(payload, out_dir), flush=True)
    print(report.plot_model(payload["runs"], out_dir / "model.png"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
