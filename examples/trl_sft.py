"""TRL's SFTTrainer with a LoRA `peft_config`, plain PEFT beside fused-lora through `fused_lora.peft.enable()`.

    python examples/trl_sft.py                     # 60 steps each, prints both loss curves and step times
    python examples/trl_sft.py --fast              # 6 steps each (what CI runs)
    python examples/trl_sft.py --model gemma --dropout 0.1 --bf16

Everything is built in code, offline: a small Llama-style (or Gemma-style) causal LM from a config with random
weights, a word-level tokenizer, and a text set of short movie reviews followed by their verdict
("review : the plot was dull . verdict : negative"). The same `SFTTrainer` call runs twice: once as TRL and PEFT
ship it, once inside `fused_lora.peft.enabled()`, which makes every PEFT LoRA model built in the block (here by
TRL's own `get_peft_model` call) compute through the fused path. Nothing else differs: the same base weights, the
same initial adapters (the global seed is set before each trainer builds its PEFT model), the same batches.

With the default `--dropout 0` both runs compute the same function, so the losses agree to float rounding (on CPU
the fused PyTorch path does PEFT's arithmetic: measured identical, difference 0.0 over the 6 steps of `--fast`).
With dropout they draw different masks and agree only statistically. The runs are sequential (plain first), so on a
busy machine compare the step times with care; on CPU the fused path's gain is memory, not time (README,
Benchmarks).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for sentiment_data, however this file is loaded

import sentiment_data  # noqa: E402

import fused_lora.peft  # noqa: E402

VERDICT = {0: "negative", 1: "positive"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fast", action="store_true", help="6 steps on 96 texts (CI)")
    p.add_argument("--model", choices=["llama", "gemma"], default="llama")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--texts", type=int, default=1000, help="size of the text set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (see the module docstring)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (SFTConfig's own default; off here so "
                                                       "that the two runs can be compared in fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when there is one")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fast:
        args.steps, args.texts, args.batch_size = 6, 96, 8
    return args


def text_set(n: int, seed: int):
    """A datasets.Dataset with a "text" column: a review and its verdict, the language SFT teaches the model."""
    from datasets import Dataset

    train, _ = sentiment_data.synthetic_sentiment(n, 0, seed=seed)
    return Dataset.from_dict({"text": [f"review : {text} verdict : {VERDICT[label]}" for text, label in train]})


def tokenizer():
    words = sentiment_data.synthetic_vocabulary() + ["review", "verdict", ":", *VERDICT.values()]
    tok = sentiment_data.word_tokenizer(words)
    tok.add_special_tokens({"eos_token": "[EOS]", "bos_token": "[BOS]"})  # SFTTrainer appends the EOS token
    return tok


def base_model(kind: str, tok, seed: int):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(**sizes))
    return LlamaForCausalLM(LlamaConfig(**sizes))


def step_timer():
    """A TrainerCallback that times every optimizer step (forward, backward and AdamW) into ``.seconds``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    return StepTimer()


def train(name: str, base, tok, data, args, output_dir: str) -> dict:
    """One SFTTrainer run with TRL's own PEFT integration (``peft_config``); returns losses, step times and the
    trained model."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=args.device == "cpu", bf16=args.bf16, seed=args.seed, max_length=64,
                       disable_tqdm=args.no_progress)
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    timer = step_timer()
    torch.manual_seed(args.seed)  # the initial adapters: get_peft_model draws A inside SFTTrainer
    trainer = SFTTrainer(model=base, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    model = trainer.model
    fused_layers = sum(type(m) is fused_lora.peft.FusedLinear for m in model.modules())
    print(f"{name}: {type(model).__name__}, {fused_layers} LoRA layers on the fused path", flush=True)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "step_ms": 1e3 * statistics.median(timer.seconds[1:] or timer.seconds),
            "fused_layers": fused_layers, "model": model}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    tok = tokenizer()
    data = text_set(args.texts, args.seed)
    base = base_model(args.model, tok, args.seed)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["PEFT"] = train("PEFT", copy.deepcopy(base), tok, data, args, tmp)
        with fused_lora.peft.enabled():  # every PEFT LoRA model built in here is served by the fused path
            runs["fused-lora"] = train("fused-lora", copy.deepcopy(base), tok, data, args, tmp)
    plain, fused = runs["PEFT"]["losses"], runs["fused-lora"]["losses"]
    print(f"\n{'step':>4} {'PEFT loss':>10} {'fused loss':>10}")
    for i, (a, b) in enumerate(zip(plain, fused, strict=True), start=1):
        print(f"{i:>4} {a:>10.5f} {b:>10.5f}")
    diff = max(abs(a - b) for a, b in zip(plain, fused, strict=True))
    print(f"largest loss difference: {diff:.2e}" + (" (dropout: different masks)" if args.dropout else ""))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"median step time: PEFT {runs['PEFT']['step_ms']:.1f} ms, fused-lora {runs['fused-lora']['step_ms']:.1f} "
          f"ms ({where})")
    return {"losses": {k: v["losses"] for k, v in runs.items()}, "max_loss_diff": diff,
            "step_ms": {k: v["step_ms"] for k, v in runs.items()},
            "fused_layers": {k: v["fused_layers"] for k, v in runs.items()},
            "models": {k: v["model"] for k, v in runs.items()}}


if __name__ == "__main__":
    main()
