"""QLoRA: a Gemma2 sequence classifier loaded in 4 bits, fused LoRA on its attention, a custom head trained in full.

    python examples/gemma2_qlora_classification.py                     # offline: a tiny random Gemma2
    python examples/gemma2_qlora_classification.py --model /path/to/gemma-2-2b --device cuda

The way most people fine-tune Gemma-class models on one GPU (the Kaggle/Colab notebook this project grew from):

* the base model loaded in 4 bits with bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)``), its head left out of
  quantization (``llm_int8_skip_modules=["score"]``) and replaced by a custom 2-layer head;
* LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o with ``task_type="SEQ_CLS"`` (the head trains in full, in place),
  injected by ``fused_lora.inject_lora`` into the 4-bit layers (``QuantizedLoRALinear``: the 4-bit weight is used as
  it is, no dequantized copy is kept; the dropout mask is regenerated from a seed instead of saved);
* trained on the synthetic sentiment task of examples/sentiment_data.py (offline) or nothing else: bring your own
  data loader for real work.

Without ``--model`` a tiny Gemma2 with random weights is built, saved to a temporary folder and loaded back in 4 bits
through ``from_pretrained`` (the same path as a real checkpoint). bitsandbytes >= 0.47 runs 4-bit layers on CPU, so
this runs anywhere: the default run (3 epochs, 189 steps) takes ~40 s on 2 CPU cores and ends at 0.8-0.9 test
accuracy (chance 0.5). ``--plot PATH`` writes the loss curve.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for sentiment_data, however this file is loaded

import sentiment_data  # noqa: E402
from gemma2_classification_custom_head import two_layer_head  # noqa: E402

from fused_lora import LoRAConfig, inject_lora, print_trainable_parameters  # noqa: E402
from fused_lora.quantized import QuantizedLoRALinear  # noqa: E402

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a local Gemma2 checkpoint folder (default: a tiny random one)")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="bnb_4bit_compute_dtype; auto: bfloat16 on GPUs that have it, else float16 on CUDA, "
                        "float32 on CPU")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--plot", default="", help="write the loss curve to this PNG ('' for none)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="print what fused-lora timed, chose and verified per layer shape (fused_lora.path_report)")
    return p.parse_args(argv)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def save_tiny_gemma2(folder: Path, vocab_size: int, pad_token_id: int) -> Path:
    """A 2-layer, 64-wide Gemma2 classifier with random weights, saved as a checkpoint (sizes are multiples of 64:
    bitsandbytes' CPU 4-bit kernel wants that)."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          sliding_window=32, pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
                          num_labels=2)
    Gemma2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def load_in_4bit(path: str | Path, quant_type: str, dtype: torch.dtype, device: torch.device):
    from transformers import BitsAndBytesConfig, Gemma2ForSequenceClassification

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                      llm_int8_skip_modules=["score"])  # the head stays trainable
    return Gemma2ForSequenceClassification.from_pretrained(
        path, quantization_config=quantization, torch_dtype=dtype, attn_implementation="eager",
        device_map={"": device.index or 0} if device.type == "cuda" else "cpu")


def plot(path: str, losses: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = sentiment_data.pick_device(args.device)
    dtype = compute_dtype(args.compute_dtype, device)
    torch.manual_seed(args.seed)
    tokenizer = sentiment_data.word_tokenizer(sentiment_data.synthetic_vocabulary())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or save_tiny_gemma2(Path(tmp), len(tokenizer), tokenizer.pad_token_id)
        model = load_in_4bit(path, args.quant_type, dtype, device)
    # the notebook's head, in floating point (never quantized)
    model.score = two_layer_head(model.config.hidden_size, model.config.num_labels).to(device, dtype)
    config = LoRAConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=ATTENTION_PROJECTIONS, task_type="SEQ_CLS")
    inject_lora(model, config)
    model.train()
    print_trainable_parameters(model)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLoRALinear)]
    print(f"{len(quantized)} LoRA layers on {quantized[0].quantization} bases ({args.quant_type}, double quantization, "
          f"compute {str(dtype).removeprefix('torch.')}) on {device}; head {type(model.score).__name__} trained in "
          f"full: {all(p.requires_grad for p in model.score.parameters())}")

    train_rows, test_rows = sentiment_data.synthetic_sentiment(args.train_size, args.test_size, seed=args.seed)

    train_loader, test_loader = sentiment_data.classification_loaders(tokenizer, train_rows, test_rows,
                                                                      args.batch_size, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    total_steps = args.epochs * len(train_loader) if args.steps is None else args.steps

    losses, accuracies, step = [], [], 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", disable=args.no_progress)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            step += 1
            if step >= total_steps:
                break
        accuracies.append(sentiment_data.classification_accuracy(model, test_loader, device))
        print(f"epoch {epoch}: loss {losses[-1]:.3f}, test accuracy {accuracies[-1]:.3f} (chance 0.5)")
        if step >= total_steps:
            break
    elapsed = time.perf_counter() - start
    print(f"{step} steps in {elapsed:.1f} s ({elapsed / max(step, 1) * 1e3:.1f} ms/step)")
    if args.plot:
        plot(args.plot, losses, f"Gemma2 QLoRA ({args.quant_type}) r={args.r} on {device}: training loss")
        print(f"loss curve: {args.plot}")
    if args.verbose:
        sentiment_data.print_path_report()
    return {"accuracy": accuracies[-1], "accuracies": accuracies, "losses": losses, "steps": step,
            "time_s": elapsed, "quantized_layers": len(quantized), "model": model}


if __name__ == "__main__":
    main()
