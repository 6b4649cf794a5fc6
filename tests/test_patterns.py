"""rank_pattern / alpha_pattern: PEFT's per-module ranks and alphas in LoRAConfig, inject_lora, save_adapter and
load_adapter, with PEFT's key matching (``peft.utils.other.get_pattern_key``), and adapter files both ways."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from tiny_models import assert_close, assert_unchanged, build, input_ids, logits, make_pair, peft_name_to_ours, state_of

from fused_lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from fused_lora.config import pattern_key
from fused_lora.injector import lora_layers

peft = pytest.importorskip("peft")
from peft.utils.other import get_pattern_key  # noqa: E402

# Keys of every kind PEFT's matching knows: a bare module name (matches as a suffix after a '.'), a longer suffix, a
# full name, a '^'-anchored full name, regexes (alternation, character class, '.*'), a key that matches only a
# middle part of names (matches nothing: the key must reach the end of the name), and an overlap where the first key
# in the dict's order wins.
CASES = {
    "gemma suffixes": ("gemma_lm", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6, "model.layers.0.mlp.down_proj": 3},
        alpha_pattern={"down_proj": 3, "k_proj": 1.5})),
    "gemma regexes, rslora": ("gemma_lm", dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
        rank_pattern={r"model\.layers\.0\..*_proj": 2, "^model.layers.1.mlp.(gate|up)_proj": 8},
        alpha_pattern={r"layers\.1\.self_attn\.[ko]_proj": 32})),
    "first key wins": ("gemma_lm", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 2, ".*_proj": 6}, alpha_pattern={".*_proj": 12, "q_proj": 2})),
    "gpt2 Conv1D, DoRA": ("gpt2_lm", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True,
        rank_pattern={"h.1.attn.c_attn": 8}, alpha_pattern={"c_fc": 4})),
}
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
         "model.layers.10.mlp.down_proj", "transformer.h.1.attn.c_attn", "q_proj", "xq_proj",
         "model.layers.0.self_attn"]
KEY_LISTS = [[], ["q_proj"], ["proj"], ["self_attn"], [".*_proj"], ["^model.layers.1.self_attn.q_proj"],
             ["layers.1.self_attn.q_proj", "q_proj"], ["q_proj", "layers.1.self_attn.q_proj"],
             [r"layers\.(0|10)\..*"], ["model.layers.1"], ["h.1.attn.c_attn"], ["attn.c_attn$"], ["[kq]_proj"],
             ["1.self_attn.q_proj"], ["0.self_attn.q_proj"]]


@pytest.mark.parametrize("keys", KEY_LISTS, ids=str)
def test_key_matching_is_peft_get_pattern_key(keys):
    for name in NAMES:
        assert pattern_key(keys, name) == get_pattern_key(keys, name), (keys, name)


def test_key_matching_can_tell_the_rules_apart():
    # The suffix rule: a key matches after a '.', not inside a name part; the key must reach the end of the name.
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert pattern_key(["self_attn"], "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert pattern_key(["1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj") == "model.layers.11.self_attn.q_proj"
    assert pattern_key(["1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj") == "1.self_attn.q_proj"
    assert pattern_key(["b", "a"], "x.a") == "a" and pattern_key([".*", "a"], "x.a") == ".*"


def per_layer(model) -> dict[str, tuple[int, float]]:
    """(r, scaling) per adapted module, for a PEFT model or ours."""
    if isinstance(model, peft.PeftModel):
        return {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    return {name: (m.r, m.scaling) for name, m in lora_layers(model).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_scalings_outputs_and_gradients_match_peft(case):
    name, kwargs = CASES[case]
    peft_model, ours = make_pair(name, kwargs)  # also checks both train the same parameters, of the same shapes
    theirs = per_layer(peft_model)
    assert per_layer(ours) == theirs
    assert len({r for r, _ in theirs.values()}) > 1 and len({s for _, s in theirs.values()}) > 1  # patterns took
    ids = input_ids()
    want, got = logits(peft_model, ids), logits(ours, ids)
    assert_close("logits", got, want)
    want.square().mean().backward()
    got.square().mean().backward()
    grads = {peft_name_to_ours(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(f"grad {n}", p.grad, grads[n])


def test_first_key_wins_in_dict_order():
    _, kwargs = CASES["first key wins"]
    model = inject_lora(build("gemma_lm"), LoRAConfig(**kwargs))
    layers = per_layer(model)
    assert layers["model.layers.0.self_attn.q_proj"] == (2, 12 / 2)  # rank from "q_proj", alpha from ".*_proj"
    assert layers["model.layers.0.self_attn.v_proj"] == (6, 12 / 6)


@pytest.mark.parametrize("case", list(CASES))
def test_our_file_loads_in_peft_and_peft_file_loads_here(tmp_path, case):
    name, kwargs = CASES[case]
    peft_model, ours = make_pair(name, kwargs)
    ids = input_ids()
    with torch.no_grad():
        want = logits(ours, ids)
        assert (want - logits(build(name), ids)).abs().max() > 1e-3  # the adapters change the output

    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"].items()) == list(kwargs["rank_pattern"].items())  # the same order
    assert list(saved["alpha_pattern"].items()) == list(kwargs["alpha_pattern"].items())
    reloaded_by_peft = peft.PeftModel.from_pretrained(build(name), tmp_path / "ours")
    assert per_layer(reloaded_by_peft) == per_layer(ours)
    with torch.no_grad():
        assert_close("PEFT loading our file", logits(reloaded_by_peft, ids), want)
        assert_close("ours loading our file", logits(load_adapter(build(name), tmp_path / "ours"), ids), want)

    peft_model.save_pretrained(tmp_path / "peft")
    if case == "first key wins":
        # PEFT's save_pretrained sorts the pattern keys: ".*_proj" now comes first and gives q_proj rank 6, not the 2
        # it was trained with. PEFT cannot load its own file back; neither can we, and we say why.
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft.PeftModel.from_pretrained(build(name), tmp_path / "peft")
        with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(2, 32\), the model needs \(6, 32\)"):
            load_adapter(build(name), tmp_path / "peft")
        return
    reloaded_here = load_adapter(build(name), tmp_path / "peft")
    assert per_layer(reloaded_here) == per_layer(peft_model)
    with torch.no_grad():
        assert_close("ours loading PEFT's file", logits(reloaded_here, ids), logits(peft_model, ids))


def test_config_round_trips_through_peft_dict():
    _, kwargs = CASES["gemma regexes, rslora"]
    config = LoRAConfig(**kwargs)
    data = config.to_peft_dict()
    assert LoRAConfig.from_peft_dict(json.loads(json.dumps(data))) == config
    theirs = peft.LoraConfig(**{k: v for k, v in data.items() if k not in ("peft_type", "revision")})
    assert theirs.rank_pattern == config.rank_pattern and theirs.alpha_pattern == config.alpha_pattern
    assert LoRAConfig.from_peft_dict({"r": 4, "rank_pattern": None, "alpha_pattern": None}) == LoRAConfig(r=4)


BAD = {
    "rank zero": (dict(rank_pattern={"q_proj": 0}), ValueError, r"rank_pattern\['q_proj'\]=0 must be a positive int"),
    "rank fractional": (dict(rank_pattern={"q_proj": 2.5}), ValueError, r"rank_pattern\['q_proj'\]=2.5 must be"),
    "rank a bool": (dict(rank_pattern={"q_proj": True}), ValueError, r"rank_pattern\['q_proj'\]=True must be"),
    "alpha a string": (dict(alpha_pattern={"q_proj": "8"}), TypeError, r"alpha_pattern\['q_proj'\]='8' must be a"),
    "not a dict": (dict(rank_pattern=["q_proj"]), TypeError, r"rank_pattern must be a dict .* to ranks"),
    "bad regex": (dict(alpha_pattern={"q_proj(": 4}), ValueError, r"alpha_pattern key 'q_proj\(' is not a valid reg"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_patterns_are_clear_errors_in_code_and_in_files(tmp_path, case):
    changes, error, words = BAD[case]
    with pytest.raises(error, match=f"LoRAConfig: {words}"):
        LoRAConfig(r=4, **changes)
    model = inject_lora(build("gemma_lm"), LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    target = build("gemma_lm")
    before = state_of(target)
    with pytest.raises(error, match=rf"adapter_config.json: LoRAConfig: {words}"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_unmatched_keys_warn_as_in_peft():
    kwargs = dict(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2, "proj": 3}, alpha_pattern={"v_proj": 1})
    with pytest.warns(RuntimeWarning) as theirs:
        peft.get_peft_model(build("gemma_lm"), peft.LoraConfig(**kwargs))
    with pytest.warns(RuntimeWarning) as ours:
        inject_lora(build("gemma_lm"), LoRAConfig(**kwargs))
    assert any("rank_pattern keys" in str(w.message) and "['proj']" in str(w.message) for w in theirs)
    assert [str(w.message)[:61] for w in ours] == [
        "inject_lora: these rank_pattern keys match no adapted module ",
        "inject_lora: these alpha_pattern keys match no adapted module"]
    assert "['proj']" in str(ours[0].message) and "['v_proj']" in str(ours[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_lora(build("gemma_lm"), LoRAConfig(**{**kwargs, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}}))


def test_load_into_model_injected_with_other_ranks_is_an_error(tmp_path):
    _, kwargs = CASES["gemma suffixes"]
    source = inject_lora(build("gemma_lm"), LoRAConfig(**kwargs))
    save_adapter(source, tmp_path)
    model = inject_lora(build("gemma_lm"), LoRAConfig(**{**kwargs, "rank_pattern": {"v_proj": 2}}))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"has r=3, lora_alpha=3, use_rslora=False \(scaling 1\) for it \(from "
                                         r"rank_pattern\['model.layers.0.mlp.down_proj'\], alpha_pattern\['down_proj'"
                                         r"\]\) but layer 'model.layers.0.mlp.down_proj' has r=4, scaling 0.75"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)
    same = inject_lora(build("gemma_lm"), LoRAConfig(**kwargs))
    load_adapter(same, tmp_path)  # the same patterns: loads
    ids = input_ids()
    with torch.no_grad():
        assert_close("loaded into an injected model", logits(same, ids), logits(source, ids))


@pytest.mark.parametrize(("field", "value"), [("lora_bias", True), ("layer_replication", [[0, 1]]),
                                              ("use_qalora", True)])
def test_features_fused_lora_does_not_compute_are_still_refused(tmp_path, field, value):
    model = inject_lora(build("gemma_lm"), LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    target = build("gemma_lm")
    with pytest.raises(ValueError, match=rf"{field}=.* is a PEFT feature fused_lora does not implement; load this "):
        load_adapter(copy.deepcopy(target), tmp_path)
