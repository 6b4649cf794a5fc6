"""The README's "Use it with" section, run as written: every ```python block is taken from README.md and executed
with `model` (a small Llama built from a config), `tokenizer` and `dataset` given, so the README cannot drift from
the code. Each block's effect is then checked."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from helpers import spy

pytest.importorskip("peft")
pytest.importorskip("trl")

import fused_lora.peft as flp  # noqa: E402
from fused_lora.injector import lora_layers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["Plain PyTorch", "HF Trainer", "PEFT", "PEFT", "TRL"]


def use_it_with_blocks() -> list[tuple[str, str]]:
    """(bold label before the block, code) for every python block of the section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Use it with\n")
    end = text.index("\n## ", start + 1)
    section, blocks, previous = text[start:end], [], 0
    for block in re.finditer(r"```python\n(.*?)```", section, flags=re.DOTALL):
        labels = re.findall(r"\*\*([^*]+)\*\*", section[previous:block.start()])
        blocks.append((labels[-1] if labels else "", block.group(1)))
        previous = block.end()
    return blocks


def load_example():
    spec = importlib.util.spec_from_file_location("examples_trl_sft_readme", ROOT / "examples" / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


def test_the_section_holds_the_blocks_this_test_checks():
    assert [label for label, _ in use_it_with_blocks()] == LABELS


@pytest.mark.parametrize("index", range(len(LABELS)), ids=[f"{i}-{label}" for i, label in enumerate(LABELS)])
def test_readme_block_runs_as_written(index, example, tmp_path, monkeypatch):
    label, code = use_it_with_blocks()[index]
    if label == "TRL" and not torch.cuda.is_available():
        # SFTConfig's bf16=True default refuses a machine without a GPU unless use_cpu=True: the one change made
        # to a block before running it, and only without a GPU.
        assert code.count("SFTConfig(") == 1
        code = code.replace("SFTConfig(", "SFTConfig(use_cpu=True, ")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flp, "_reported", set())
    calls = spy(monkeypatch, flp, "fused_lora_linear")
    tok = example.tokenizer()
    namespace = {"model": example.base_model("llama", tok, seed=0), "tokenizer": tok,
                 "dataset": example.text_set(16, seed=0)}
    try:
        exec(compile(code, f"README.md ({label} block)", "exec"), namespace)
        CHECKS[index](namespace, calls, tmp_path, example, tok)
    finally:
        flp.disable()


def check_plain(ns, calls, tmp_path, example, tok):
    import peft

    assert len(lora_layers(ns["model"])) == 4  # q_proj and v_proj of 2 layers
    reloaded = peft.PeftModel.from_pretrained(example.base_model("llama", tok, seed=0), tmp_path / "adapter")
    ids = tok(["review : a dull film . verdict : negative"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, ns["model"].eval()(input_ids=ids).logits)


def check_trainer(ns, calls, tmp_path, example, tok):
    assert ns["trainer"].state.global_step == 2  # 16 texts, 8 a batch
    assert len(lora_layers(ns["model"])) == 14  # all-linear: 7 projections in 2 layers
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}


def check_accelerate(ns, calls, tmp_path, example, tok):
    model = ns["peft_model"]
    assert flp.is_accelerated(model) and not flp.is_enabled()
    with torch.no_grad():
        model(input_ids=tok(["a good film ."], return_tensors="pt")["input_ids"])
    assert len(calls) == 4


def check_enable(ns, calls, tmp_path, example, tok):
    assert flp.is_accelerated(ns["peft_model"]) and not flp.is_enabled()


def check_trl(ns, calls, tmp_path, example, tok):
    trainer = ns["trainer"]
    assert flp.is_accelerated(trainer.model) and trainer.state.global_step == 2
    assert len(calls) >= 2 * 14  # every step ran the 14 adapted projections through the fused path


CHECKS = [check_plain, check_trainer, check_accelerate, check_enable, check_trl]
