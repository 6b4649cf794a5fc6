"""Adapter files that go wrong: a save that fails half-way, and files that are truncated, corrupted or malformed.

A failed save leaves the previous adapter byte for byte and no temporary file; a bad file gives an error naming
the file (and the field or key) and leaves the model exactly as it was: state_dict bitwise, requires_grad flags,
module types, and no fused LoRA state added.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import assert_unchanged, build, state_of

import fused_lora.adapters as adapters
from fused_lora import LoRAConfig, inject_lora, load_adapter, read_adapter_config, save_adapter
from fused_lora.injector import get_state

CONFIG = dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", modules_to_save=["score"],
              task_type="SEQ_CLS")
WEIGHTS, CONFIG_JSON = adapters.WEIGHTS_NAME, adapters.CONFIG_NAME


def trained(seed: int = 0, **config):
    """An injected tiny GPT-2 classifier whose trainable parameters moved away from their init (B ≠ 0)."""
    model = inject_lora(build("gpt2_cls"), LoRAConfig(**{**CONFIG, **config}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def folder_bytes(path: pathlib.Path) -> dict[str, bytes]:
    """Every file in the folder (hidden temporary files included) and its bytes."""
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter"
    save_adapter(trained(seed=0), path)
    return path


@pytest.fixture(params=["plain", "injected"])
def target(request):
    """The model an adapter is loaded into: a plain base model, or one injected with the adapter's config."""
    model = build("gpt2_cls") if request.param == "plain" else trained(seed=5)
    return model, state_of(model), request.param == "plain"


def assert_model_unchanged(target):
    model, before, plain = target
    assert_unchanged(model, before)
    if plain:
        assert get_state(model) is None, "fused LoRA state was recorded on a model that was not injected"


# ---------------------------------------------------------------------------------------------------------------
# Atomic saves
# ---------------------------------------------------------------------------------------------------------------

def _fail_weights_write(monkeypatch):
    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(adapters, "save_file", crash)


def _fail_config_write(monkeypatch):
    real = adapters._write_temp

    def write_temp(directory, name, write):
        if name != CONFIG_JSON:
            return real(directory, name, write)

        def crash(tmp):
            with open(tmp, "w") as f:
                f.write('{"r": ')
            raise OSError("disk full")
        return real(directory, name, crash)
    monkeypatch.setattr(adapters, "_write_temp", write_temp)


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError("I/O error")
    monkeypatch.setattr(adapters.os, "fsync", fsync)


def _fail_rename(name):
    def patch(monkeypatch):
        real = os.replace

        def replace(src, dst):
            # Only the commit of a new file fails; the rollback (renaming a backup back) must still work.
            if pathlib.Path(dst).name == name and str(src).endswith(".tmp"):
                raise OSError("rename failed")
            return real(src, dst)
        monkeypatch.setattr(adapters.os, "replace", replace)
    return patch


FAILURES = {
    "weights write": _fail_weights_write,
    "config write": _fail_config_write,
    "fsync": _fail_fsync,
    "weights rename": _fail_rename(WEIGHTS),
    "config rename, after the weights were renamed": _fail_rename(CONFIG_JSON),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_save_keeps_previous_adapter_byte_for_byte(saved, failure, monkeypatch):
    old = folder_bytes(saved)
    assert sorted(old) == [CONFIG_JSON, WEIGHTS]
    new = trained(seed=1, r=8, lora_alpha=16)  # another rank: new weights beside the old config would not load
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError, match="disk full|I/O error|rename failed"):
        save_adapter(new, saved)
    monkeypatch.undo()
    assert folder_bytes(saved) == old  # same names (no temporary or backup file left), same bytes
    assert read_adapter_config(saved).r == 4
    load_adapter(build("gpt2_cls"), saved)  # still a whole, loadable adapter


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_first_save_leaves_no_file(tmp_path, failure, monkeypatch):
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError):
        save_adapter(trained(), tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []


def test_overwriting_save_leaves_only_the_two_files(saved):
    save_adapter(trained(seed=1, r=8, lora_alpha=16), saved)
    assert sorted(os.listdir(saved)) == [CONFIG_JSON, WEIGHTS]
    assert read_adapter_config(saved).r == 8
    loaded = load_adapter(build("gpt2_cls"), saved)
    assert loaded.transformer.h[0].attn.c_attn.lora_A.shape == (8, 32)


def test_saved_file_carries_a_digest_of_its_tensors(saved):
    with safe_open(saved / WEIGHTS, framework="pt") as f:
        digest = f.metadata()[adapters.DIGEST_KEY]
    assert digest == adapters.tensors_digest(load_file(saved / WEIGHTS))


# ---------------------------------------------------------------------------------------------------------------
# Truncated or corrupted weights
# ---------------------------------------------------------------------------------------------------------------

def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


CORRUPTIONS = {
    "cut to half": lambda b: b[: len(b) // 2],
    "last byte cut": lambda b: b[:-1],
    "cut inside the header": lambda b: b[:20],
    "empty file": lambda b: b"",
    "random bytes": lambda b: bytes(torch.randint(0, 256, (len(b),), generator=torch.Generator().manual_seed(0))
                                    .to(torch.uint8).tolist()),
    "header length garbled": lambda b: b"\xff" * 8 + b[8:],
    "header JSON garbled": lambda b: b[:8] + b"#" * (_header_end(b) - 8) + b[_header_end(b):],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_safetensors_is_a_clear_error(saved, target, corruption):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(CORRUPTIONS[corruption](data))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file .*truncated "
                                         r"or corrupted. Save the adapter again"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


def test_bit_flip_in_tensor_data_is_caught_by_the_digest(saved, target):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[_header_end(data) + 5] ^= 0x10  # inside the first tensor's bytes: the header still parses
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is corrupted: its tensors do not match the "
                                         r"SHA-256"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


def test_file_without_digest_loads(saved):
    # PEFT's files (and ones edited by hand) carry no digest: nothing to check, they load.
    tensors = load_file(saved / WEIGHTS)
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})
    model = load_adapter(build("gpt2_cls"), saved)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.lora_B,
                               tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"], rtol=0, atol=0)


def test_corrupted_bin_is_a_clear_error(saved, target):
    (saved / WEIGHTS).unlink()
    (saved / adapters.WEIGHTS_NAME_BIN).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"adapter_model.bin cannot be read .*truncated or corrupted"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


# ---------------------------------------------------------------------------------------------------------------
# Malformed adapter_config.json
# ---------------------------------------------------------------------------------------------------------------

RAW_CONFIGS = {
    "truncated JSON": (b'{"r": 4, "lora_alpha":', r"is not valid JSON"),
    "not JSON": (b"r = 4\n", r"is not valid JSON"),
    "empty file": (b"", r"is not valid JSON"),
    "not UTF-8": (b'{"r": 4, "\xff": 1}', r"is not valid JSON"),
    "a list": (b"[4, 8]", r"expected a JSON object of LoRA settings, got list"),
}


@pytest.mark.parametrize("case", list(RAW_CONFIGS))
def test_malformed_config_json_is_a_clear_error(saved, target, case):
    raw, words = RAW_CONFIGS[case]
    (saved / CONFIG_JSON).write_bytes(raw)
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{words}"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


BAD_FIELDS = {
    "r missing": ({"r": None}, ValueError, r"no 'r' \(the adapter rank\)"),
    "r a string": ({"r": "4"}, ValueError, r"r='4' must be a positive integer"),
    "r zero": ({"r": 0}, ValueError, r"r=0 must be a positive integer"),
    "r negative": ({"r": -4}, ValueError, r"r=-4 must be a positive integer"),
    "r fractional": ({"r": 2.5}, ValueError, r"r=2.5 must be a positive integer"),
    "lora_alpha a string": ({"lora_alpha": "8"}, TypeError, r"lora_alpha='8' must be a number"),
    "lora_dropout a string": ({"lora_dropout": "0.1"}, TypeError, r"lora_dropout='0.1' must be a number"),
    "lora_dropout 1.5": ({"lora_dropout": 1.5}, ValueError, r"lora_dropout=1.5 must be in \[0, 1\]"),
    "use_rslora a string": ({"use_rslora": "yes"}, ValueError, r"use_rslora='yes' must be true or false"),
    "target_modules a number": ({"target_modules": 5}, TypeError, r"target_modules must be a list"),
    "bias unknown": ({"bias": "some"}, ValueError, r"bias='some'"),
    "task_type unknown": ({"task_type": "SEQ_CLASSIFICATION"}, ValueError, r"task_type='SEQ_CLASSIFICATION'"),
    "not LoRA": ({"peft_type": "PREFIX_TUNING"}, ValueError, r"peft_type='PREFIX_TUNING'; fused_lora loads LoRA"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_config_field_names_file_and_field(saved, target, case):
    changes, error, words = BAD_FIELDS[case]
    config = json.loads((saved / CONFIG_JSON).read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None or k != "r"}
    (saved / CONFIG_JSON).write_text(json.dumps(config))
    with pytest.raises(error, match=rf"adapter_config.json: .*{words}"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


# ---------------------------------------------------------------------------------------------------------------
# Adapters that do not fit the model (beyond test_adapters.py's key and shape cases)
# ---------------------------------------------------------------------------------------------------------------

def test_config_rank_differs_from_tensors_rank(saved):
    model = build("gpt2_cls")
    target = (model, state_of(model), True)
    config = json.loads((saved / CONFIG_JSON).read_text())
    (saved / CONFIG_JSON).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight has shape \(4, 32\), the model needs \(8, 32\).*"
                                         r"left unchanged"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


def test_integer_bias_in_file_is_refused(saved, target):
    key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    tensors = load_file(saved / WEIGHTS)
    save_file({**tensors, key: tensors[key].to(torch.int32)}, saved / WEIGHTS)
    with pytest.raises(ValueError, match=rf"{key} has dtype torch.int32; LoRA weights and biases must be floating"):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


@pytest.mark.parametrize(("theirs", "ours", "warns"), [
    ("openai-community/gpt2", "gpt2-large", True),
    ("openai-community/gpt2", "/models/gpt2/", False),  # the same model under two names
    (None, "gpt2", False),
    ("gpt2", "", False),
])
def test_other_base_model_name_warns_when_shapes_fit(saved, theirs, ours, warns, recwarn):
    config = json.loads((saved / CONFIG_JSON).read_text())
    (saved / CONFIG_JSON).write_text(json.dumps({**config, "base_model_name_or_path": theirs}))
    model = build("gpt2_cls")
    model.config._name_or_path = ours
    load_adapter(model, saved)
    messages = [str(w.message) for w in recwarn.list if "trained on base model" in str(w.message)]
    assert len(messages) == int(warns), messages
    if warns:
        assert f"{theirs!r}" in messages[0] and f"{ours!r}" in messages[0]


def test_other_base_model_with_other_shapes_is_an_error_without_warning(saved, recwarn):
    model = build("gpt2_cls", n_embd=48)
    model.config._name_or_path = "gpt2-medium"
    before = state_of(model)
    with pytest.raises(ValueError, match=r"does not fit this model: .*the model needs \(4, 48\)"):
        load_adapter(model, saved)
    assert not [w for w in recwarn.list if "trained on base model" in str(w.message)]
    assert_model_unchanged((model, before, True))


def test_failure_while_copying_rolls_back(saved, target, monkeypatch):
    # Everything is checked before the copy, so this needs an injected fault: the last tensor cannot be copied.
    real = adapters._match_tensors

    def match_then_break(*args):
        tensors = real(*args)
        last = sorted(tensors)[-1]
        return {**tensors, last: torch.zeros(3, 3, 3)}
    monkeypatch.setattr(adapters, "_match_tensors", match_then_break)
    with pytest.raises(RuntimeError):
        load_adapter(target[0], saved)
    assert_model_unchanged(target)


def test_half_precision_file_is_cast_into_the_model_dtype(saved):
    tensors = {k: v.half() for k, v in load_file(saved / WEIGHTS).items()}
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})
    model = load_adapter(build("gpt2_cls"), saved)
    lora_B = model.transformer.h[0].attn.c_attn.lora_B
    assert lora_B.dtype == torch.float32
    assert torch.equal(lora_B, tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].float())


def test_stale_temporary_files_of_a_killed_save_are_ignored(saved):
    (saved / f".{WEIGHTS}.abc123.tmp").write_bytes(b"half a file")
    (saved / f".{CONFIG_JSON}.def456.bak").write_bytes(b"{")
    load_adapter(build("gpt2_cls"), saved)
    save_adapter(trained(seed=2), saved)  # and a new save works beside them
    assert read_adapter_config(saved).r == 4
