"""The same LoRA fine-tuning run with HF PEFT and with fused-lora, side by side.

    python examples/compare_with_peft.py                      # writes compare_with_peft.png
    python examples/compare_with_peft.py --dropout 0.1 --width 512 --layers 4 --steps 100

Both runs start from one GPT-2 classifier (a small config, random weights, seeded) and the same initial
adapters: PEFT's `get_peft_model` draws them and they are copied into the fused layers. They see the same
batches in the same order, with the same AdamW settings; their steps alternate, so a busy machine slows
both alike. At the end the script prints the step times, the activation memory each keeps for backward
(and the CUDA peak on a GPU), the largest difference between the two runs' final outputs, and saves the
two loss curves overlaid in a PNG.

With the default `--dropout 0` the two runs compute the same function and their outputs agree to float
rounding (the fused layer sums in a different order). With dropout > 0 they draw different random masks
(PEFT from nn.Dropout, fused-lora from a Philox seed), so the curves agree only statistically; that is also
the setting where the memory differs most: PEFT keeps a dropped copy of each adapted layer's input and the
dropout mask for backward, fused-lora regenerates the mask and keeps neither.

On CPU fused-lora runs its PyTorch path; on a CUDA GPU its Triton kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for sentiment_data, however this file is loaded

import sentiment_data  # noqa: E402

from fused_lora import LoRAConfig, LoRALinear, inject_lora  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (see the module docstring)")
    p.add_argument("--targets", default="c_attn", help="comma-separated target_modules")
    p.add_argument("--width", type=int, default=128, help="GPT-2 n_embd")
    p.add_argument("--layers", type=int, default=2, help="GPT-2 n_layer")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--plot", default="compare_with_peft.png", help="where to write the loss curves ('' for none)")
    return p.parse_args(argv)


def build_base(width: int, layers: int, vocab_size: int, pad_token_id: int):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                        n_positions=128, num_labels=2, pad_token_id=pad_token_id, bos_token_id=None,
                        eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(config)


def make_peft(base, args):
    from peft import LoraConfig, get_peft_model

    # fan_in_fan_out: GPT-2's Conv1D stores its weight in×out (PEFT warns and sets it itself otherwise).
    config = LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=args.targets.split(","), fan_in_fan_out=True)
    return get_peft_model(base, config)


def make_fused(base, peft_model, args):
    """fused-lora with the same config, then PEFT's initial adapters copied in (same A and B)."""
    config = LoRAConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=args.targets.split(","), task_type="SEQ_CLS")
    model = inject_lora(base, config)
    copied = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                theirs = peft_model.get_submodule(f"base_model.model.{name}")
                layer.lora_A.copy_(theirs.lora_A["default"].weight)
                layer.lora_B.copy_(theirs.lora_B["default"].weight)
                copied += 1
    if copied == 0:
        raise RuntimeError("no LoRA layer to copy into")
    return model


def saved_for_backward_mib(model, batch) -> float:
    """Bytes the autograd graph of one training forward keeps for backward, parameters left out and distinct
    storages counted once: the activation memory, measured the same way on CPU and GPU."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


@torch.no_grad()
def logits_of(model, batches) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
    model.train()
    return out


def accuracy_of(logits: torch.Tensor, batches) -> float:
    labels = torch.cat([b["labels"] for b in batches])
    return (logits.argmax(-1) == labels).float().mean().item()


def plot(path: str, losses: dict[str, list[float]], summary: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    styles = {"PEFT": dict(color="tab:blue", lw=2.5, alpha=0.6), "fused-lora": dict(color="tab:red", lw=1, ls="--")}
    for name, values in losses.items():
        top.plot(range(1, len(values) + 1), values, label=f"{name}: {summary[name]}", **styles[name])
    top.set_ylabel("training loss")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8)
    diff = [abs(a - b) for a, b in zip(losses["PEFT"], losses["fused-lora"], strict=True)]
    bottom.semilogy(range(1, len(diff) + 1), [max(d, 1e-12) for d in diff], color="black", lw=1)
    bottom.set_ylabel("|loss difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = sentiment_data.pick_device(args.device)

    tokenizer = sentiment_data.word_tokenizer(sentiment_data.synthetic_vocabulary())
    train_rows, test_rows = sentiment_data.synthetic_sentiment(args.steps * args.batch_size, 500, seed=args.seed)

    def batches_of(rows):
        out = []
        for i in range(0, len(rows), args.batch_size):
            texts, labels = zip(*rows[i:i + args.batch_size], strict=True)
            enc = tokenizer(list(texts), padding=True, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                        "labels": torch.tensor(labels, device=device)})
        return out

    # The data are already shuffled by the generator; both runs get exactly these batches in this order.
    train_batches, test_batches = batches_of(train_rows), batches_of(test_rows)

    torch.manual_seed(args.seed)
    base = build_base(args.width, args.layers, len(tokenizer), tokenizer.pad_token_id).to(device)
    peft_model = make_peft(copy.deepcopy(base), args)
    fused_model = make_fused(base, peft_model, args)
    models = {"PEFT": peft_model, "fused-lora": fused_model}
    for model in models.values():
        model.train()

    initial_diff = (logits_of(peft_model, test_batches) - logits_of(fused_model, test_batches)).abs().max().item()
    saved = {name: saved_for_backward_mib(model, train_batches[0]) for name, model in models.items()}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    if trainable["PEFT"] != trainable["fused-lora"]:
        raise RuntimeError(f"trainable parameter counts differ: {trainable}")
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
                  for name, m in models.items()}

    losses: dict[str, list[float]] = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    peak = {name: 0.0 for name in models}
    for batch in train_batches:
        for name, model in models.items():  # alternate: the same load conditions for both
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses[name].append(loss.item())  # .item() waits for the GPU
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**20)
    if device.type != "cuda":
        peak = {name: float("nan") for name in models}  # printed as nan: CPU has no allocator peak to read

    final = {name: logits_of(model, test_batches) for name, model in models.items()}
    max_abs_diff = (final["PEFT"] - final["fused-lora"]).abs().max().item()
    loss_diff = max(abs(a - b) for a, b in zip(losses["PEFT"], losses["fused-lora"], strict=True))
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    accuracy = {name: accuracy_of(logits, test_batches) for name, logits in final.items()}

    backend = "Triton kernels" if device.type == "cuda" else "PyTorch path"
    print(f"GPT-2 {args.layers}x{args.width}, r={args.r}, alpha={args.alpha}, dropout={args.dropout}, "
          f"targets={args.targets}, {len(train_batches)} steps of {args.batch_size} on {device} "
          f"(fused-lora: {backend})")
    print(f"{'':12s} {'step ms':>9s} {'saved MiB':>10s} {'CUDA peak MiB':>14s} {'final loss':>11s} {'accuracy':>9s}")
    for name in models:
        print(f"{name:12s} {step_ms[name]:9.2f} {saved[name]:10.2f} {peak[name]:14.1f} "
              f"{losses[name][-1]:11.4f} {accuracy[name]:9.3f}")
    print(f"speed-up {step_ms['PEFT'] / step_ms['fused-lora']:.2f}x, saved-for-backward ratio "
          f"{saved['fused-lora'] / saved['PEFT']:.2f} (fused/PEFT)")
    print(f"outputs: max |PEFT - fused| before training {initial_diff:.2e}, after {len(train_batches)} steps "
          f"{max_abs_diff:.2e} (logits); largest per-step loss difference {loss_diff:.2e}")

    if args.plot:
        summary = {name: f"{step_ms[name]:.1f} ms/step, {saved[name]:.1f} MiB saved for backward" for name in models}
        plot(args.plot, losses, summary, f"GPT-2 {args.layers}x{args.width} LoRA r={args.r} dropout={args.dropout} "
             f"on {device}: PEFT vs fused-lora (same seed, same initial adapters)")
        print(f"loss curves: {args.plot}")

    return {"losses": losses, "step_time_ms": step_ms, "saved_mib": saved, "peak_cuda_mib": peak,
            "accuracy": accuracy, "initial_max_abs_diff": initial_diff, "max_abs_diff": max_abs_diff,
            "max_loss_diff": loss_diff, "trainable": trainable["PEFT"], "plot": args.plot or None}


if __name__ == "__main__":
    main()
