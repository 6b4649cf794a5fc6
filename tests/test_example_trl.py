"""examples/trl_sft.py's fast path (CI): TRL's SFTTrainer with a LoRA peft_config, plain PEFT and under
fused_lora.peft.enabled(): the same losses, and the fused path really ran."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import spy

pytest.importorskip("trl")
pytest.importorskip("peft")

import fused_lora.peft as flp  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "trl_sft.py"


def load_example():
    spec = importlib.util.spec_from_file_location("examples_trl_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_sft_fast_path_same_losses_through_the_fused_path(monkeypatch):
    calls = spy(monkeypatch, flp, "fused_lora_linear")
    result = load_example().main(["--fast", "--no-progress"])
    assert not flp.is_enabled()  # enabled() only around the fused run
    # 7 projections in each of 2 layers; PEFT's run has none of them swapped.
    assert result["fused_layers"] == {"PEFT": 0, "fused-lora": 14}
    assert not flp.is_accelerated(result["models"]["PEFT"]) and flp.is_accelerated(result["models"]["fused-lora"])
    # 6 steps × 14 layers, each forward computed twice: SFTConfig turns gradient checkpointing on by default, and the
    # recomputation in backward goes through the fused path again.
    assert len(calls) == 6 * 14 * 2
    plain, fused = result["losses"]["PEFT"], result["losses"]["fused-lora"]
    assert len(plain) == len(fused) == 6 and all(math.isfinite(v) for v in plain + fused)
    assert plain[-1] < plain[0]  # it trains
    # lora_dropout=0: the same function. On CPU the fused PyTorch path does PEFT's arithmetic (measured: identical
    # losses); on a GPU the Triton kernels sum in another order, which 6 AdamW steps may amplify a little.
    tol = 1e-3 if torch.cuda.is_available() else 1e-5
    assert result["max_loss_diff"] <= tol * max(abs(v) for v in plain), (plain, fused)
    assert result["step_ms"]["PEFT"] > 0 and result["step_ms"]["fused-lora"] > 0
