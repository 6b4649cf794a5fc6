"""A LoRA rank sweep in one run: adapters of rank 1, 2, 4, 8 and 16 on one frozen OPT base, trained together.

    python examples/sweep_rank.py                          # the sweep, all ranks at once; a table of results
    python examples/sweep_rank.py --sequential             # the same sweep one adapter at a time, for comparison
    python examples/sweep_rank.py --fast --out sweep --plot sweep.png

What it shows. ``inject_adapters`` puts one adapter per rank ("r1", "r2", …, LoRA on q_proj and v_proj) into one
frozen model; every adapted layer computes all of them in one fused call. Each step every adapter sees the same
examples: the batch holds each example once per adapter, grouped by adapter (``AdapterCollator`` adds the
``adapter_names=`` the model call takes), the loss is the sum of the adapters' own mean losses (so each adapter's
gradient is what it would be alone), and one AdamW holds a param group per adapter (``adapter_param_groups``).
``--sequential`` trains the same adapters one after another (same data, seeds, steps, optimizer settings) and saves in
the same layout: the adapters agree with the concurrent run's (tests/test_examples.py checks it).

The model. First the sizes that matter: for facebook/opt-350m's config (hidden 1024, 24 layers, ffn 4096, word
embeddings projected to 512, vocabulary 50272, 16 heads; built on PyTorch's ``meta`` device, so no weights are
allocated) the script counts each injected adapter's trainable parameters and checks them against
2 modules × 24 layers × r × (1024 + 1024) = 98304·r. Then it trains a small OPT from a config with random weights,
offline: by default 2 layers, 64 wide.

The task: the synthetic sentiment reviews of ``examples/sentiment_data.py`` as language modelling, each review
followed by its verdict ("review : the plot was dull but the cast was superb . verdict : positive"), with that
module's word-level tokenizer plus the four words of the verdict line. Causal LM (``OPTForCausalLM``) rather than
sequence classification: its only head is the frozen word embeddings (tied), so nothing but the adapters trains, as
several adapters on one base require (a trained head, ``modules_to_save``, would need a full copy per adapter), and
``PeftModel.from_pretrained(base, "out/r4")`` alone reproduces the fused model's outputs with that adapter. The table
reports the training and test loss (mean next-token cross-entropy per review) and the verdict accuracy: how often the
model ranks the right verdict word above the other one after "verdict :" (chance 0.5). In the default 300 steps the
loss falls with the rank (the adapters learn the reviews' wording: test loss 3.0 at r=1 to 1.8 at r=16) while the
verdict stays at chance: reading sentiment through a frozen random base with LoRA on q/v alone takes more than that.
The base's weights are drawn at std 1/sqrt(width) (OPT's ``init_std`` 0.02 suits a width of 1024: at width 64 a
frozen random model's logits would stay near zero, and so would every gradient).

Dropout and the same run twice. Without dropout, ``--sequential`` trains each adapter alone in a fresh model, as
one would without several adapters per model (``inject_adapters`` with that one config and the same seed: the same
initial weights). With dropout, each layer draws its dropout seeds from PyTorch's generator on every training call,
one per adapter of the model, in the model's adapter order (adapter i's mask then depends only on its seed and the
shape of its rows); a model holding one adapter would draw other seeds, so other masks. So that adapter i sees the
same masks in both modes, the sequential run with dropout keeps every adapter of the sweep in its model (same inits)
but trains one at a time: a batch holds only that adapter's examples (the others have no rows, cost nothing and do
not move) and the optimizer only its param group. Both modes reseed the generator at every step, so that nothing
drawn between steps (an evaluation, a data pipeline) could shift the seeds of one mode. The base's own dropout is off,
and must be for the modes to agree: its draws depend on how many rows a batch has.

Output: per-adapter training loss curves (``--plot FILE.png`` with matplotlib, which the ``examples`` extra installs;
without it, or with ``--curves FILE.json``, the curves go to JSON), a table of final training loss, test loss and
verdict accuracy per rank, and with ``--out DIR`` the base model and tokenizer in ``DIR/base/`` and each adapter as a
PEFT adapter folder ``DIR/r{r}/`` (``save_adapters``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The examples share examples/sentiment_data.py; make it importable however this file was loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sentiment_data  # noqa: E402

from fused_lora import (  # noqa: E402
    AdapterCollator,
    LoRAConfig,
    adapter_param_groups,
    inject_adapters,
    save_adapters,
    use_adapters,
)
from fused_lora.diagnostics import BACKENDS  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
VERDICT = {0: "negative", 1: "positive"}
# facebook/opt-350m's config.json (transformers.OPTConfig's words; the Hub's file, as its fine-tunes copy it).
OPT_350M = dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, word_embed_proj_dim=512, vocab_size=50272,
                num_attention_heads=16, max_position_embeddings=2048, do_layer_norm_before=False)
OPT_350M_PER_RANK = 98304  # 2 target modules × 24 layers × (1024 in + 1024 out)
# The small OPT trained here: the build of OPT-125m and the larger ones (LayerNorm before each block, no embedding
# projection), 2 layers, 64 wide. Measured, the default run (1 CPU thread, 11 s concurrent, 27 s sequential): test
# loss 3.01, 2.54, 2.21, 1.98, 1.83 for r = 1, 2, 4, 8, 16, the same both ways to the bit; verdict accuracy 0.47-0.55,
# chance (module docstring). opt-350m's own build (LayerNorm after each block, embeddings projected to half the width)
# learned less in a trial of the same 300 steps (r = 1, 4, 16: 3.4, 2.9, 2.7 against this build's 3.1, 2.2, 1.8).
SMALL = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, max_position_embeddings=64,
             do_layer_norm_before=True)
FAST = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2, max_position_embeddings=64,
            do_layer_norm_before=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", default="1,2,4,8,16", help="comma-separated LoRA ranks, one adapter each ('r{r}')")
    p.add_argument("--alpha-ratio", type=float, default=2.0,
                   help="lora_alpha = ratio × r: the same scaling (alpha / r) for every rank")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r) (use_rslora)")
    p.add_argument("--dropout", type=float, default=0.1, help="lora_dropout (on the LoRA branch only)")
    p.add_argument("--sequential", action="store_true",
                   help="train the adapters one at a time (same data, seeds, steps, optimizer settings)")
    p.add_argument("--fast", action="store_true", help="tiny model, 12 steps on 96 reviews (a few seconds on CPU)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (each adapter sees every batch)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step, per adapter")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (every adapter)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="base weights, adapter inits (seed + i for adapter i), data")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="fused-lora's path: 'triton' (the fused kernels), 'torch' (the PyTorch path) or 'auto'; "
                        "default: the FUSED_LORA_BACKEND environment variable, else auto")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write DIR/base/ (the base model + tokenizer) and DIR/r{r}/ (PEFT adapter folders)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="the loss curves (needs matplotlib)")
    p.add_argument("--curves", metavar="FILE.json", default=None,
                   help="the loss curves as JSON (also written, next to --plot, when matplotlib is missing)")
    args = p.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks {args.ranks!r}: give comma-separated positive integers, e.g. 1,2,4,8,16")
    if not args.ranks or min(args.ranks) < 1 or len(set(args.ranks)) != len(args.ranks):
        p.error(f"--ranks {args.ranks}: give distinct positive integers")
    if args.fast:
        args.steps, args.batch_size, args.train_size, args.test_size = 12, 8, 96, 32
    return args


def adapter_configs(args: argparse.Namespace) -> dict[str, LoRAConfig]:
    return {f"r{r}": LoRAConfig(r=r, lora_alpha=args.alpha_ratio * r, lora_dropout=args.dropout,
                                target_modules=TARGETS, use_rslora=args.rslora) for r in args.ranks}


def check_opt_350m_counts(ranks: list[int]) -> dict[int, int]:
    """Each adapter's trainable parameters on facebook/opt-350m's config, counted on the injected model (built on the
    meta device: shapes only, nothing allocated); raises AssertionError unless each is 98304·r."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**OPT_350M)
    # q_proj and v_proj are hidden × hidden in every layer: r·(in + out) parameters each.
    formula = len(TARGETS) * config.num_hidden_layers * (config.hidden_size + config.hidden_size)
    if formula != OPT_350M_PER_RANK:
        raise AssertionError(f"OPT-350m: {len(TARGETS)} modules × {config.num_hidden_layers} layers × (2 × "
                             f"{config.hidden_size}) = {formula} per rank, not {OPT_350M_PER_RANK}")
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    inject_adapters(model, {f"r{r}": LoRAConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS) for r in ranks})
    counts = {int(g["name"][1:]): sum(p.numel() for p in g["params"]) for g in adapter_param_groups(model)}
    print(f"OPT-350m config ({total / 1e6:.1f} M parameters; built on the meta device): LoRA on "
          f"{'/'.join(TARGETS)} trains per adapter " + ", ".join(f"r={r}: {n:,}" for r, n in counts.items()))
    wrong = {r: n for r, n in counts.items() if n != OPT_350M_PER_RANK * r}
    if wrong:
        raise AssertionError(f"OPT-350m trainable count per adapter: expected {OPT_350M_PER_RANK}·r (2 modules × 24 "
                             f"layers × r × (1024 + 1024)), got {wrong} (rank: count)")
    return counts


def make_tokenizer():
    """sentiment_data's word-level tokenizer, with the words of the verdict line."""
    return sentiment_data.word_tokenizer(sentiment_data.synthetic_vocabulary() + ["review", "verdict", ":",
                                                                                 *VERDICT.values()])


def build_base(args: argparse.Namespace, tokenizer, device: torch.device, dtype: torch.dtype):
    """The small OPT causal LM, random weights from ``args.seed``, its own dropout off, on ``device``."""
    from transformers import OPTConfig, OPTForCausalLM

    sizes = FAST if args.fast else SMALL
    config = OPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                       eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       init_std=sizes["hidden_size"] ** -0.5, **sizes)
    torch.manual_seed(args.seed)
    return OPTForCausalLM(config).to(device=device, dtype=dtype)


def make_collate(tokenizer):
    """Examples {"text", "label"} → input_ids, attention_mask and the verdict's position per example."""

    def collate(examples: list[dict]) -> dict:
        texts = [f"review : {e['text']} verdict : {VERDICT[e['label']]}" for e in examples]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "verdict_at": enc["attention_mask"].sum(1) - 1, "labels": torch.tensor([e["label"] for e in examples])}

    return collate


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its own tokens (padding left out)."""
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = attention_mask[:, 1:].to(losses.dtype)
    return (losses * mask).sum(1) / mask.sum(1)


def verdict_hits(logits: torch.Tensor, batch: dict, verdict_ids: torch.Tensor) -> torch.Tensor:
    """Whether the right verdict word outscores the other one where the verdict is predicted."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    scores = logits[rows, batch["verdict_at"] - 1][:, verdict_ids]  # [negative, positive]
    return scores.argmax(-1) == batch["labels"]


def batches(rows: list[tuple[str, int]], batch_size: int, steps: int, seed: int):
    """``steps`` batches of (text, label), epochs reshuffled by a generator of their own (the global one is left to
    the adapters' dropout)."""
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]
            done += 1
            if done == steps:
                return


def per_adapter_mean(values: torch.Tensor, names: list[str], adapters: list[str]) -> dict[str, torch.Tensor]:
    """Each adapter's mean of per-example ``values`` (adapters without examples left out)."""
    out = {}
    for name in adapters:
        mask = torch.tensor([n == name for n in names], device=values.device)
        if mask.any():
            out[name] = values[mask].mean()
    return out


@torch.no_grad()
def evaluate(model, collate, test_rows, adapters: list[str], device: torch.device, batch_size: int,
             verdict_ids: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Test (loss, verdict accuracy) per adapter: each test batch once per adapter, all adapters in one call."""
    model.eval()
    loss_sum = dict.fromkeys(adapters, 0.0)
    correct = dict.fromkeys(adapters, 0)
    n_ad = len(adapters)
    for start in range(0, len(test_rows), batch_size):
        chunk = test_rows[start:start + batch_size]
        batch = {k: v.to(device).repeat(n_ad, *([1] * (v.dim() - 1)))
                 for k, v in collate([{"text": t, "label": y} for t, y in chunk]).items()}
        n = len(chunk)
        with use_adapters(model, [name for name in adapters for _ in range(n)]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_example_loss(logits, batch["input_ids"], batch["attention_mask"]).view(n_ad, n)
        hits = verdict_hits(logits, batch, verdict_ids).view(n_ad, n)
        for i, name in enumerate(adapters):
            loss_sum[name] += losses[i].sum().item()
            correct[name] += int(hits[i].sum().item())
    model.train()
    return {name: (loss_sum[name] / len(test_rows), correct[name] / len(test_rows)) for name in adapters}


def train(model, collate: AdapterCollator, train_rows, args: argparse.Namespace, device: torch.device,
          trained: list[str]) -> dict[str, list[float]]:
    """``args.steps`` AdamW steps for the adapters ``trained`` (each sees every batch); their loss curves."""
    groups = [g for g in adapter_param_groups(model) if g["name"] in trained]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.steps))
    losses: dict[str, list[float]] = {name: [] for name in trained}
    model.train()
    for step, rows in enumerate(batches(train_rows, args.batch_size, args.steps, args.seed)):
        # The dropout seeds each layer draws come from here: the same per step whichever adapters train now.
        torch.manual_seed(args.seed * 100_003 + step)
        batch = collate([{"text": t, "label": y, "adapter": name} for name in trained for t, y in rows])
        names = batch.pop("adapter_names")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       adapter_names=names).logits
        means = per_adapter_mean(per_example_loss(logits, batch["input_ids"], batch["attention_mask"]), names,
                                 trained)
        # A sum of the adapters' own mean losses: adapter i's gradient is that of its loss alone.
        sum(means.values()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in means.items():
            losses[name].append(value.item())
    return losses


def write_curves(path: Path, losses: dict[str, list[float]], results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train_loss": losses, "final": results}, indent=1))


def plot(path: Path, losses: dict[str, list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in losses.items():
        ax.plot(range(1, len(values) + 1), values, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per adapter)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def backend_env(backend: str | None):
    """--backend for this run: fused-lora reads FUSED_LORA_BACKEND at every call."""
    if backend is None:
        yield
        return
    previous = os.environ.get("FUSED_LORA_BACKEND")
    os.environ["FUSED_LORA_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FUSED_LORA_BACKEND"]
        else:
            os.environ["FUSED_LORA_BACKEND"] = previous


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with backend_env(args.backend):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    device = sentiment_data.pick_device(args.device)
    dtype = torch.float32
    counts_350m = check_opt_350m_counts(args.ranks)

    train_rows, test_rows = sentiment_data.synthetic_sentiment(args.train_size, args.test_size, seed=args.seed)
    tokenizer = make_tokenizer()
    verdict_ids = torch.tensor(tokenizer.convert_tokens_to_ids([VERDICT[0], VERDICT[1]]), device=device)
    collate = make_collate(tokenizer)
    configs = adapter_configs(args)
    names = list(configs)
    seeds = {name: args.seed + i for i, name in enumerate(names)}
    out = Path(args.out) if args.out else None

    def fresh_model(held: list[str]):
        """The base from the seed, then the adapters ``held``, each initialised from its own seed."""
        model = build_base(args, tokenizer, device, dtype)
        if out is not None:
            model.config._name_or_path = str(out / "base")  # the adapters' base_model_name_or_path
        return inject_adapters(model, {n: configs[n] for n in held}, seeds={n: seeds[n] for n in held})

    if out is not None:
        base = build_base(args, tokenizer, device, dtype)
        base.config._name_or_path = str(out / "base")
        base.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        del base

    mode = "sequential" if args.sequential else "concurrent"
    backend = os.environ.get("FUSED_LORA_BACKEND", "auto")
    print(f"rank sweep {args.ranks} ({mode}) on {device} (float32, fused-lora backend {backend}): "
          f"{args.steps} steps × {args.batch_size} reviews per adapter, lr {args.lr}, dropout {args.dropout}")
    collate_by_adapter = AdapterCollator(collate, adapters=names)
    losses: dict[str, list[float]] = {}
    results: dict[str, tuple[float, float]] = {}
    trainable: dict[str, int] = {}
    start = time.perf_counter()
    for trained in ([[name] for name in names] if args.sequential else [names]):
        # One adapter at a time: alone in its model without dropout; with dropout, beside the others (untrained,
        # without rows) so that each layer draws the seeds it draws in the concurrent run (module docstring).
        model = fresh_model(names if args.dropout > 0 or not args.sequential else trained)
        losses.update(train(model, collate_by_adapter, train_rows, args, device, trained))
        results.update(evaluate(model, collate, test_rows, trained, device, args.batch_size, verdict_ids))
        trainable.update({g["name"]: sum(p.numel() for p in g["params"]) for g in adapter_param_groups(model)
                          if g["name"] in trained})
        if out is not None:
            save_adapters(model, out, trained)
    seconds = time.perf_counter() - start

    tail = max(1, args.steps // 10)
    print(f"{'rank':>5} {'trainable':>10} {'OPT-350m':>10} {'train loss':>11} {'test loss':>10} {'verdict acc':>12}")
    final = {}
    for name, r in zip(names, args.ranks, strict=True):
        train_loss = statistics.fmean(losses[name][-tail:])
        test_loss, accuracy = results[name]
        final[name] = {"r": r, "trainable": trainable[name], "opt_350m_trainable": counts_350m[r],
                       "train_loss": train_loss, "test_loss": test_loss, "verdict_accuracy": accuracy}
        print(f"{r:>5} {trainable[name]:>10,} {counts_350m[r]:>10,} {train_loss:>11.4f} {test_loss:>10.4f} "
              f"{accuracy:>12.3f}")
    print(f"({mode}: {seconds:.1f} s for training and evaluation; train loss: mean of the last {tail} steps; verdict "
          "accuracy by chance 0.5)")

    curves = Path(args.curves) if args.curves else None
    plotted = None
    if args.plot:
        if importlib.util.find_spec("matplotlib") is not None:
            plot(Path(args.plot), losses, f"OPT {model.config.num_hidden_layers}x{model.config.hidden_size}, LoRA on "
                 f"{'/'.join(TARGETS)}, ranks {args.ranks} ({mode}, {args.steps} steps)")
            plotted = Path(args.plot)
            print(f"loss curves: {plotted}")
        else:
            curves = curves or Path(args.plot).with_suffix(".json")
            print(f"matplotlib is not installed (pip install matplotlib, or the 'examples' extra): no {args.plot}")
    if curves is not None:
        write_curves(curves, losses, final)
        print(f"loss curves as JSON: {curves}")
    if out is not None:
        print(f"base model: {out / 'base'}; adapters (PEFT folders): " + ", ".join(str(out / n) for n in names))

    return {"losses": losses, "final": final, "counts_350m": counts_350m, "seconds": seconds, "mode": mode,
            "model": model, "tokenizer": tokenizer, "names": names, "plot": plotted, "curves": curves,
            "finite": all(math.isfinite(v) for values in losses.values() for v in values)}


if __name__ == "__main__":
    main()
