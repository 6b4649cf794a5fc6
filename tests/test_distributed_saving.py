"""The saving paths the engines use, in one process: ``save_adapter`` from a state dict an engine gathered already
(FSDP1's full state dict), who writes, and ``FusedLoRATrainer._save`` given such a state dict (what the parent
Trainer's ``save_model`` hands over under FSDP1). The multi-process engines are in test_distributed*.py."""

from __future__ import annotations

import os

import distributed_common as dc
import pytest
import torch
import transformers

from fused_lora import load_adapter, save_adapter
from fused_lora.hf_trainer import FusedLoRATrainer


def _files(folder) -> tuple[list[str], bytes, dict, dict[str, torch.Tensor]]:
    """(file names, the config's bytes, the weights' metadata, the weights). Not the weights file's bytes: safetensors
    writes its metadata in a different order from one call to the next."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return sorted(os.listdir(folder)), (folder / "adapter_config.json").read_bytes(), metadata, tensors


def test_from_a_gathered_state_dict_the_same_files(tmp_path):
    model = dc.injected_model()
    save_adapter(model, tmp_path / "own")
    save_adapter(model, tmp_path / "given", state_dict={k: v.clone() for k, v in model.state_dict().items()})
    names, config, metadata, tensors = _files(tmp_path / "given")
    assert (names, config, metadata) == _files(tmp_path / "own")[:3]
    own = _files(tmp_path / "own")[3]
    assert tensors.keys() == own.keys() and all(torch.equal(tensors[k], own[k]) for k in own)


def test_a_state_dict_without_the_adapter_is_refused(tmp_path):
    model = dc.injected_model()
    state = {k: v for k, v in model.state_dict().items() if "lora_B" not in k}
    with pytest.raises(ValueError, match=r"lacks 6 of the adapter's 19 tensors.*lora_B"):
        save_adapter(model, tmp_path, state_dict=state)
    assert not os.listdir(tmp_path)


def test_only_the_main_process_writes(tmp_path):
    model = dc.injected_model()
    save_adapter(model, tmp_path / "no", is_main_process=False)
    save_adapter(model, tmp_path / "no_either", is_main_process=False, state_dict=model.state_dict())
    assert not (tmp_path / "no").exists() and not (tmp_path / "no_either").exists()
    save_adapter(model, tmp_path / "yes")  # no process group: the caller writes
    assert sorted(os.listdir(tmp_path / "yes")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_trainer_save_given_a_state_dict_writes_the_adapter(tmp_path):
    """The parent Trainer's save_model under FSDP1 gathers the full state dict and calls _save with it: the adapter is
    read from it, no model.safetensors is written, and nothing warns."""
    model = dc.injected_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # not the values a fresh injection has
    args = dc.training_arguments(str(tmp_path / "run"), 1, use_cpu=True)
    trainer = FusedLoRATrainer(model=model, args=args, train_dataset=dc.Examples())
    trainer._save(str(tmp_path / "saved"), state_dict=model.state_dict())
    assert sorted(os.listdir(tmp_path / "saved")) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "training_args.bin"]
    restored = dict(load_adapter(transformers.GPT2ForSequenceClassification(model.config), tmp_path / "saved")
                    .named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(restored[name], p), name
