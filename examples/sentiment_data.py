"""Data for the examples: a synthetic sentiment task generated in code, a word-level tokenizer built in
code, and (optionally) GLUE SST-2 through the `datasets` library.

Nothing here downloads anything unless you ask for SST-2. The synthetic task is what the examples use by
default, so they run offline in well under a minute on a laptop CPU:

    train, test = synthetic_sentiment(n_train=2000, n_test=500, seed=0)
    tokenizer = word_tokenizer(synthetic_vocabulary())
    batch = tokenizer([text for text, _ in train[:4]], padding=True, return_tensors="pt")

The task. Every review is a short sentence made from templates with one to three opinion slots, e.g.
"the acting was superb but the plot was dull ." Its label (1 = positive, 0 = negative) follows two rules
a model can only get right by reading more than one word:

* "not" flips the opinion word that follows it ("not good" is negative);
* with "but", the clause after "but" decides; otherwise the majority of the opinions decides (templates
  without "but" have an odd number of slots, so there are no ties).

A bag-of-words model gets most of it (majority of words), the "not"/"but" cases need word order; chance is
50% (labels are balanced by construction).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

POSITIVE = ["good", "great", "superb", "wonderful", "brilliant", "charming", "moving", "delightful", "fun",
            "gripping", "beautiful", "clever"]
NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "clumsy", "tedious", "bland", "messy", "weak",
            "painful", "silly"]
SUBJECTS = ["movie", "film", "plot", "acting", "script", "ending", "cast", "music", "story", "dialogue",
            "pacing", "camera work"]
ADVERBS = ["", "", "really", "very", "quite", "truly", "rather", "so"]
OPENERS = ["", "", "honestly ,", "overall ,", "i think", "in short ,", "frankly ,"]

# Templates: {s} a subject, {o} an opinion slot ("[adverb] [not] word"). "but" templates are decided by
# the last clause; the others by the majority of their (odd number of) slots.
TEMPLATES = [
    ("the {s} was {o} .", False),
    ("a {o} {s} .", False),
    ("the {s} was {o} , the {s} was {o} and the {s} was {o} .", False),
    ("{o} {s} , {o} {s} , {o} {s} .", False),
    ("the {s} was {o} but the {s} was {o} .", True),
    ("the {s} is {o} , but the {s} is {o} .", True),
    ("i found the {s} {o} but the {s} {o} .", True),
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]"]


def _opinion(rng: random.Random) -> tuple[str, int]:
    """An opinion phrase and its polarity (+1/-1), with a 25% chance of a flipping "not"."""
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.25
    words = [w for w in ("not" if negated else "", rng.choice(ADVERBS), word) if w]
    polarity = (1 if positive else -1) * (-1 if negated else 1)
    return " ".join(words), polarity


def _review(rng: random.Random) -> tuple[str, int]:
    template, last_clause_decides = rng.choice(TEMPLATES)
    polarities: list[int] = []

    def fill(slot: str) -> str:
        if slot == "s":
            return rng.choice(SUBJECTS)
        phrase, polarity = _opinion(rng)
        polarities.append(polarity)
        return phrase

    # Fill the slots left to right; str.format cannot call a function per slot, so split on the braces.
    parts = template.replace("{", "\0").replace("}", "\0").split("\0")
    text = "".join(fill(part) if i % 2 else part for i, part in enumerate(parts))
    score = polarities[-1] if last_clause_decides else sum(polarities)
    opener = rng.choice(OPENERS)
    return (f"{opener} {text}" if opener else text), int(score > 0)


def synthetic_sentiment(n_train: int = 2000, n_test: int = 500, seed: int = 0
                        ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic (text, label) lists for training and testing, labels balanced 50/50 in each split.

    The same seed always gives the same data (Python's `random.Random`, no global state touched).
    """
    rng = random.Random(seed)

    def split(n: int) -> list[tuple[str, int]]:
        # Draw until each label has n/2 examples: balanced splits make "accuracy above 50%" mean learning.
        wanted = {0: n // 2, 1: n - n // 2}
        out: list[tuple[str, int]] = []
        while len(out) < n:
            text, label = _review(rng)
            if wanted[label] > 0:
                wanted[label] -= 1
                out.append((text, label))
        rng.shuffle(out)  # once one label is full the tail would be all the other label
        return out

    return split(n_train), split(n_test)


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic task can produce (sorted, so token ids are stable across runs)."""
    words = set(POSITIVE + NEGATIVE + ["not", "but", "and", "the", "a", "was", "is", "i", "found", ",", "."])
    for phrase in SUBJECTS + ADVERBS + OPENERS:
        words.update(phrase.split())
    for template, _ in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)


def corpus_vocabulary(texts: Iterable[str], max_size: int = 8000) -> list[str]:
    """The `max_size` most frequent lower-cased whitespace words of a corpus (for SST-2 with a tiny model)."""
    counts = Counter(word for text in texts for word in text.lower().split())
    return [word for word, _ in counts.most_common(max_size)]


def word_tokenizer(vocabulary: Sequence[str], model_max_length: int = 128):
    """A transformers `PreTrainedTokenizerFast` over whitespace-separated, lower-cased words.

    Built entirely in code from the `tokenizers` library (a transformers dependency): no download. It
    behaves like any Hub tokenizer (padding, truncation, `save_pretrained` / `AutoTokenizer.from_pretrained`),
    so the training script handles it and a real GPT-2 tokenizer the same way. Unknown words map to [UNK];
    padding uses [PAD] (id 0) on the right.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    # Whitespace splits punctuation off words ("dull." -> "dull", "."), matching how the task is written.
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=model_max_length, padding_side="right")


def load_sst2(max_train: int | None = None, max_test: int | None = None
              ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """GLUE SST-2 as (text, label) lists: the train split and the validation split (the test split has no
    labels). Needs `pip install datasets` and network access the first time (or a warm HF cache)."""
    try:
        import datasets
    except ImportError as err:  # optional dependency: only this path needs it
        raise SystemExit("--dataset sst2 needs the `datasets` library: pip install datasets "
                         "(the default synthetic task needs nothing)") from err
    data = datasets.load_dataset("glue", "sst2")

    def pairs(split, limit):
        rows = split if limit is None else split.select(range(min(limit, len(split))))
        return [(row["sentence"], int(row["label"])) for row in rows]

    return pairs(data["train"], max_train), pairs(data["validation"], max_test)


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda for every example: auto takes the GPU when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch (use --device auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def classification_loaders(tokenizer, train_rows, test_rows, batch_size: int, seed: int):
    """(train, test) DataLoaders of tokenized (text, label) rows for a sequence classifier: input_ids,
    attention_mask and labels per batch; the training order seeded."""
    from torch.utils.data import DataLoader

    def collate(batch):
        texts, labels = zip(*batch, strict=True)
        enc = tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels)}

    train = DataLoader(train_rows, batch_size=batch_size, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(seed))
    return train, DataLoader(test_rows, batch_size=batch_size, collate_fn=collate)


@torch.no_grad()
def classification_accuracy(model, loader, device: torch.device) -> float:
    """Accuracy of a sequence classifier over ``loader``'s batches (the model is put back in training mode)."""
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.train()
    return correct / max(total, 1)


def print_path_report() -> None:
    """``--verbose``: per layer shape, what fused-lora timed, chose, ran and verified
    (``fused_lora.diagnostics.path_report``). Empty on CPU without Triton's interpreter: the PyTorch path has nothing
    to choose."""
    import fused_lora.diagnostics

    report = fused_lora.diagnostics.path_report()
    if not report:
        print("paths: the PyTorch path ran every call (no GPU: nothing timed or verified)")
        return
    print("paths per key (what auto timed in ms, the choice, the path run, the first-call checks):")
    for key, entry in report.items():
        timed = ", ".join(f"{name} {1e3 * t:.3f}" for name, t in entry["timed"].items()) or "not timed"
        checks = "; ".join(f"{path} {check.split(':')[0]} {'pass' if v['ok'] else 'FAIL'} ({v['worst']} "
                           f"{v['error']:.2g} ≤ {v['bound']:.2g})" for path, ds in entry["verified"].items()
                           for check, v in ds.items())
        print(f"  {key}: timed [{timed}], chosen {entry['chosen']}, runs {entry['runs']}; checks: {checks or 'none'}")
