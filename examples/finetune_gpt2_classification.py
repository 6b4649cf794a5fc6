"""Fine-tune a GPT-2 sequence classifier with fused LoRA: the project's main job.

    python examples/finetune_gpt2_classification.py

With no options it runs offline on whatever is there (a CUDA GPU if there is one, else the CPU): a small
GPT-2 built from a config with random weights learns the synthetic sentiment task of
`examples/sentiment_data.py` in well under a minute on 2 CPU cores, and prints the test accuracy after
every epoch, then step time and peak memory. The pieces to copy into your own training script are the
three fused-lora lines in `main` (LoRAConfig, inject_lora, print_trainable_parameters) and, if you keep
adapters, save_adapter; the rest is an ordinary PyTorch loop.

Pretrained weights and real data, for those who have them:

    python examples/finetune_gpt2_classification.py --model gpt2 --dataset sst2   # needs `pip install datasets`
    python examples/finetune_gpt2_classification.py --model ./my-gpt2-checkpoint   # a save_pretrained folder

Precision: fp32 on CPU; bf16 mixed precision on a CUDA GPU that supports it (`--dtype auto`), which is
where the fused Triton kernels pay off. In bf16 the frozen base model is stored in bf16 (half the memory),
every trainable parameter (LoRA adapters, the classification head) is kept in fp32 (AdamW updates of
small adapters are lost in bf16 rounding; PEFT keeps adapters fp32 too), and the forward runs under
torch.autocast(bf16), which fused-lora supports like nn.Linear. `--dtype float32` trains in plain fp32;
`--dtype bfloat16` also works on CPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

# The examples share examples/sentiment_data.py; make it importable however this file was loaded
# (as a script, or through importlib from the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sentiment_data  # noqa: E402

from fused_lora import (  # noqa: E402
    LoRAConfig,
    inject_lora,
    print_trainable_parameters,
    resolve_backend,
    save_adapter,
)

# The 'tiny' model: 2 layers, 128 wide, 4 heads (0.43 M parameters with the word-level vocabulary).
# Sized by measurement on 2 CPU cores (fp32, PyTorch path): the default run, 10 epochs of 2000 reviews =
# 630 steps of ~30 ms, trains in ~25 s and ends at 0.88-0.92 test accuracy over seeds 0-2 (6 epochs:
# 0.72-0.89, still rising; dropout 0 or a constant learning rate changed little).
TINY_GPT2 = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (random weights from a small GPT-2 config, offline), or a Hub name / local "
                        "save_pretrained folder for from_pretrained (e.g. 'gpt2'); its tokenizer is loaded too")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "sst2"],
                   help="'synthetic': generated in code (examples/sentiment_data.py); 'sst2': GLUE SST-2 via "
                        "the datasets library")
    p.add_argument("--train-size", type=int, default=2000, help="training examples (SST-2: a cap)")
    p.add_argument("--test-size", type=int, default=500, help="test examples (SST-2: a cap on validation)")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    # LoRA: the same words as PEFT's LoraConfig.
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="lora_alpha (scaling = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.1, help="lora_dropout (on the LoRA branch only)")
    p.add_argument("--targets", default=None,
                   help="comma-separated target_modules (e.g. 'c_attn,c_proj'), or 'all-linear'; "
                        "default: the architecture's usual targets (GPT-2: c_attn)")
    p.add_argument("--bias", default="none", choices=["none", "lora_only", "all"], help="which biases train")
    # Training.
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--schedule", default="linear", choices=["linear", "constant"],
                   help="learning rate schedule: linear decay to 0 over the run, or constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a CUDA GPU that supports it, float32 otherwise")
    p.add_argument("--save-adapter", metavar="DIR", default=None,
                   help="write the trained adapter here in PEFT's format (adapter_model.safetensors + "
                        "adapter_config.json)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="print what fused-lora timed, chose and verified per layer shape (fused_lora.path_report)")
    return p.parse_args(argv)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_rows(args: argparse.Namespace):
    """(train, test) lists of (text, label)."""
    if args.dataset == "sst2":
        return sentiment_data.load_sst2(args.train_size, args.test_size)
    return sentiment_data.synthetic_sentiment(args.train_size, args.test_size, seed=args.seed)


def build_model_and_tokenizer(args: argparse.Namespace, train_texts: list[str]):
    """A GPT-2 sequence classifier (2 labels) and a tokenizer that pads."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    if args.model == "tiny":
        # A word-level tokenizer built in code: the task's own vocabulary, or SST-2's most frequent words.
        vocab = (sentiment_data.synthetic_vocabulary() if args.dataset == "synthetic"
                 else sentiment_data.corpus_vocabulary(train_texts))
        tokenizer = sentiment_data.word_tokenizer(vocab, model_max_length=args.max_length)
        # Dropout off in the frozen base: with random weights it only adds noise; the LoRA branch has its own.
        config = GPT2Config(vocab_size=len(tokenizer), num_labels=2, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **TINY_GPT2)
        return GPT2ForSequenceClassification(config), tokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        # GPT-2's tokenizer has no pad token. Padding with EOS is the usual fix; GPT2ForSequenceClassification
        # classifies from the last token that is not the pad id, so right padding is fine.
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def make_loader(rows, tokenizer, args, shuffle: bool) -> DataLoader:
    """Batches of padded token ids, attention masks and labels (tokenized per batch: dynamic padding)."""

    def collate(batch):
        texts, labels = zip(*batch, strict=True)
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels)}

    generator = torch.Generator().manual_seed(args.seed)  # the same seed gives the same batches
    return DataLoader(rows, batch_size=args.batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


@torch.no_grad()
def evaluate(model, loader, device, autocast, progress: bool, desc: str = "eval") -> float:
    model.eval()
    correct = total = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.train()
    return correct / max(total, 1)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA tensors on GPU; the process's peak resident set on CPU
    (everything: Python, torch, the model, the data; the max over the process's life)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"  # bytes on macOS, KiB else


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = sentiment_data.pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    progress = not args.no_progress
    torch.manual_seed(args.seed)  # the tiny model's random weights and the adapters' init

    train_rows, test_rows = load_rows(args)
    model, tokenizer = build_model_and_tokenizer(args, [text for text, _ in train_rows])
    model.to(device=device, dtype=dtype)

    # --- fused-lora: the three lines to paste into your own training code -----------------------------
    targets = args.targets if args.targets in (None, "all-linear") else args.targets.split(",")
    config = LoRAConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                        bias=args.bias, task_type="SEQ_CLS")  # SEQ_CLS: the `score` head trains in full
    inject_lora(model, config)
    print_trainable_parameters(model)
    # ---------------------------------------------------------------------------------------------------
    if dtype != torch.float32:
        # Mixed precision: fp32 master copies of what trains (the adapters already are; the head is not).
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    # Under autocast the frozen bf16 layers and the fp32 head both compute in bf16; a no-op for fp32.
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)

    train_loader = make_loader(train_rows, tokenizer, args, shuffle=True)
    test_loader = make_loader(test_rows, tokenizer, args, shuffle=False)
    total_steps = args.epochs * len(train_loader)
    if args.steps is not None:
        total_steps = min(total_steps, args.steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    linear = args.schedule == "linear"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / total_steps) if linear else 1.0)

    backend = "Triton kernels" if resolve_backend(None, device) == "triton" else "PyTorch path"
    print(f"model {args.model} on {device} ({str(dtype).removeprefix('torch.')}, fused-lora {backend}), dataset "
          f"{args.dataset}: {len(train_rows)} train / {len(test_rows)} test, {total_steps} steps")
    accuracy = evaluate(model, test_loader, device, autocast, progress, desc="eval before training")
    print(f"accuracy before training: {accuracy:.3f} (chance: 0.5)")
    accuracies: list[float] = []
    losses: list[float] = []
    step_times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    step = 0
    train_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", disable=not progress)
        epoch_losses = []
        for batch in bar:
            start = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()  # .item() waits for the GPU, so the step time below is the real one
            step_times.append(time.perf_counter() - start)
            losses.append(loss_value)
            epoch_losses.append(loss_value)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            step += 1
            if step >= total_steps:
                break
        bar.close()
        accuracies.append(evaluate(model, test_loader, device, autocast, progress))
        print(f"epoch {epoch}: train loss {statistics.fmean(epoch_losses):.3f}, "
              f"test accuracy {accuracies[-1]:.3f}")
        if step >= total_steps:
            break
    train_time = time.perf_counter() - train_start  # evaluation included

    # The first steps pay for allocator warm-up (and kernel compilation on GPU): the median ignores them.
    step_ms = statistics.median(step_times) * 1e3 if step_times else math.nan
    memory, memory_kind = peak_memory_mib(device)
    print(f"final test accuracy {accuracies[-1]:.3f} (chance 0.5) after {step} steps | "
          f"step time {step_ms:.1f} ms (median) | training {train_time:.1f} s | "
          f"peak memory {memory:.0f} MiB ({memory_kind})")

    if args.verbose:
        sentiment_data.print_path_report()
    if args.save_adapter:
        save_adapter(model, args.save_adapter)
        print(f"adapter saved to {args.save_adapter} (PEFT format: peft.PeftModel.from_pretrained reads it)")

    return {
        "accuracy": accuracies[-1],
        "accuracy_before": accuracy,
        "accuracies": accuracies,
        "losses": losses,
        "steps": step,
        "step_time_ms": step_ms,
        "train_time_s": train_time,
        "peak_memory_mib": memory,
        "memory_kind": memory_kind,
        "device": str(device),
        "dtype": str(dtype),
        "model": model,
        "tokenizer": tokenizer,
    }


if __name__ == "__main__":
    main()
