"""save_adapter / load_adapter: PEFT's on-disk format both ways, round trips, validation before mutation, atomic
writes."""

from __future__ import annotations

import copy
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import assert_unchanged, build, input_ids, logits, make_pair, state_of
from torch import nn

import fused_lora.adapters as adapters
from fused_lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_adapter,
    merge_lora,
    read_adapter_config,
    save_adapter,
)

peft = pytest.importorskip("peft")

GPT2_CLS = dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", modules_to_save=["score"],
                task_type="SEQ_CLS")


def randomize_lora(model, seed=0):
    """Non-zero B (fresh adapters have B = 0 and would hide a loading bug) and a changed head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_file_format_is_peft(tmp_path):
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**GPT2_CLS))
    save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.{k}" for i in range(2)
                    for k in ("lora_A.weight", "lora_B.weight", "base_layer.bias")} | {"base_model.model.score.weight"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["c_attn"]
    assert config["modules_to_save"] == ["score", "classifier"]
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.r == 4 and loaded.bias == "lora_only"


@pytest.mark.parametrize("name,kwargs", [
    ("gpt2_cls", GPT2_CLS),
    ("gemma_lm", dict(r=8, lora_alpha=16, use_rslora=True)),
    ("gpt2_lm", dict(r=2, target_modules="all-linear", bias="all")),
    ("gemma2_cls", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[1],
                        layers_pattern="layers", task_type="SEQ_CLS")),
    ("gemma3_lm", dict(r=4, target_modules=r".*\.layers\.0\..*_proj", exclude_modules=["k_proj"])),
])
def test_our_adapter_loaded_by_peft_gives_same_outputs(tmp_path, name, kwargs):
    base = build(name)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(**kwargs))
    randomize_lora(ours)
    save_adapter(ours, tmp_path)  # a PathLike
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-6)
        assert (logits(ours, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("name,kwargs", [
    ("gpt2_cls", GPT2_CLS),
    ("gemma2_cls", dict(r=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1], task_type="SEQ_CLS")),
    ("gpt2_lm", dict(r=2, bias="all")),
])
def test_peft_adapter_loaded_by_us_gives_same_outputs(tmp_path, name, kwargs):
    base = build(name)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path))
    ids = input_ids()
    with torch.no_grad():
        want = logits(theirs, ids)
        plain = load_adapter(copy.deepcopy(base), tmp_path)  # injects from adapter_config.json
        torch.testing.assert_close(logits(plain, ids), want, rtol=1e-5, atol=1e-6)
        injected = inject_lora(copy.deepcopy(base), LoRAConfig(**kwargs))  # already injected, matching config
        load_adapter(injected, tmp_path)
        torch.testing.assert_close(logits(injected, ids), want, rtol=1e-5, atol=1e-6)


def test_peft_bias_all_with_a_biased_custom_head(tmp_path):
    # PEFT's bias="all" also writes its modules_to_save copies' biases (<m>.original_module.*, <m>.modules_to_save.*)
    base = build("gemma2_cls")
    base.score = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 3))
    kwargs = dict(r=2, target_modules=["v_proj"], bias="all", modules_to_save=["score"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path))
    assert any(".original_module." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    ids = input_ids()
    with torch.no_grad():
        ours = load_adapter(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)


def test_round_trip_ours(tmp_path):
    peft_model, ours = make_pair("gemma3_lm", dict(r=4, target_modules=["q_proj", "k_proj", "down_proj"]))
    save_adapter(ours, tmp_path / "nested" / "adapter")
    again = load_adapter(build("gemma3_lm"), tmp_path / "nested" / "adapter")
    assert read_adapter_config(tmp_path / "nested" / "adapter").target_modules == ["down_proj", "k_proj", "q_proj"]
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)
    # The loaded model trains what the saved one trained.
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in ours.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# Bad input: checked before the model changes
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def gpt2_adapter(tmp_path):
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**GPT2_CLS))
    randomize_lora(model)
    save_adapter(model, tmp_path)
    return tmp_path


def edit_config(path: pathlib.Path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_weights(path: pathlib.Path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(tensors), path / "adapter_model.safetensors")


def test_load_into_model_injected_differently_is_an_error(gpt2_adapter):
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**{**GPT2_CLS, "r": 8}))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"has r=4, lora_alpha=8.*layer 'transformer.h.0.attn.c_attn' has r=8"):
        load_adapter(model, gpt2_adapter)
    assert_unchanged(model, before)
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**{**GPT2_CLS, "target_modules": ["c_attn", "c_fc"]}))
    with pytest.raises(ValueError, match=r"only in the model: \['transformer.h.0.mlp.c_fc'"):
        load_adapter(model, gpt2_adapter)
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**{**GPT2_CLS, "bias": "none"}))
    with pytest.raises(ValueError, match=r"has bias='lora_only'.*injected with bias='none'"):
        load_adapter(model, gpt2_adapter)
    model = merge_lora(inject_lora(build("gpt2_cls"), LoRAConfig(**GPT2_CLS)))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"is merged; call unmerge_lora\(model\)"):
        load_adapter(model, gpt2_adapter)
    assert_unchanged(model, before)


def test_load_wrong_shapes_keys_or_features_leaves_model_unchanged(gpt2_adapter):
    model = build("gpt2_cls", n_embd=48)  # a wider model than the adapter's
    before = state_of(model)
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight has shape \(4, 32\), the model needs \(4, 48\)"):
        load_adapter(model, gpt2_adapter)
    assert_unchanged(model, before)

    model = build("gpt2_cls")
    before = state_of(model)
    edit_weights(gpt2_adapter, lambda t: {**t, "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight":
                                          torch.zeros(4, 32)})
    with pytest.raises(ValueError, match=r"1 keys the config does not explain.*mlp.c_fc.lora_A.weight"):
        load_adapter(model, gpt2_adapter)
    edit_weights(gpt2_adapter, lambda t: {k: v for k, v in t.items() if "h.1" not in k and "c_fc" not in k})
    with pytest.raises(ValueError, match=r"3 keys missing.*h.1.attn.c_attn"):
        load_adapter(model, gpt2_adapter)
    edit_config(gpt2_adapter, use_dora=True)  # DoRA without its magnitudes in the file
    with pytest.raises(ValueError, match=r"keys missing.*h.0.attn.c_attn.lora_magnitude_vector"):
        load_adapter(model, gpt2_adapter)
    edit_config(gpt2_adapter, use_dora=False, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="matched no module"):
        load_adapter(model, gpt2_adapter)
    assert_unchanged(model, before)


def test_load_missing_files(tmp_path):
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_adapter(build("gpt2_lm"), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(build("gpt2_lm"), tmp_path)


def test_save_needs_an_injected_model(tmp_path):
    with pytest.raises(ValueError, match="no fused LoRA layers"):
        save_adapter(build("gpt2_lm"), tmp_path)
    model = build("gpt2_lm")
    model.transformer.h[0].attn.c_attn = LoRALinear.from_linear(model.transformer.h[0].attn.c_attn, r=2)
    with pytest.raises(ValueError, match="not made by inject_lora"):
        save_adapter(model, tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = inject_lora(build("gpt2_lm"), LoRAConfig(r=2))
    save_adapter(model, tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    randomize_lora(model)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == old  # no temp file left
