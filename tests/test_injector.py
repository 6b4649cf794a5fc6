"""inject_lora & co.: targets, trainable sets and counts (against PEFT), merge/unmerge/unload/disable, bad input."""

from __future__ import annotations

import copy
import re
import types

import pytest
import torch
import transformers
from tiny_models import assert_unchanged, build, input_ids, logits, state_of
from torch import nn
from transformers.pytorch_utils import Conv1D

from fused_lora import (
    LoRAConfig,
    LoRALinear,
    disable_lora,
    inject_lora,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from fused_lora.injector import match_target

peft = pytest.importorskip("peft")


def meta_model(cls, config):
    # Real shapes without allocating: parameter counting needs no data.
    with torch.device("meta"):
        return cls(config)


def peft_counts(model, **kwargs):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------------------------
# The numbered tests 1-4
# ---------------------------------------------------------------------------------------------------------------

def test_gpt2_default_config_last_two_layers_counts_12288():
    model = meta_model(transformers.GPT2ForSequenceClassification, transformers.GPT2Config(num_labels=2))
    kwargs = dict(r=1, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[10, 11], bias="lora_only",
                  modules_to_save=["score"], task_type="SEQ_CLS")
    assert peft_counts(model, **kwargs)[0] == 12288
    inject_lora(model, LoRAConfig(**kwargs))
    assert trainable_parameters(model)[0] == 12288
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == ["transformer.h.10.attn.c_attn", "transformer.h.11.attn.c_attn"]
    # 2 × (A 1×768 + B 2304×1 + bias 2304) + score 768×2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.h.{i}.attn.c_attn.{p}" for i in (10, 11) for p in ("lora_A", "lora_B", "bias")} | {"score.weight"}


def test_conv1d_ones_adapter_adds_alpha_times_sum_x():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", Conv1D(20, 10))  # nf=20 outputs, nx=10 inputs: weight 10×20
    with torch.no_grad():  # small integers: every sum below is exact in fp32
        net.proj.weight.copy_(torch.randint(-3, 4, (10, 20)).float())
        net.proj.bias.copy_(torch.randint(-3, 4, (20,)).float())
    x = torch.randint(-5, 6, (3, 7, 10)).float()
    base = net(x)
    inject_lora(net, LoRAConfig(r=1, lora_alpha=4, target_modules=["proj"]))
    layer = net.proj
    assert isinstance(layer, LoRALinear) and layer.weight_layout == "conv1d" and layer.scaling == 4
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    delta = net(x) - base
    assert delta.shape == (3, 7, 20)
    assert torch.equal(delta, (4 * x.sum(-1, keepdim=True)).expand_as(delta))


OPT_350M = dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=512)


@pytest.fixture(scope="module")
def opt_350m():
    return meta_model(transformers.OPTForCausalLM, transformers.OPTConfig(**OPT_350M))


@pytest.mark.parametrize("r", [1, 8, 16, 32, 64, 128])
def test_opt_trainable_counts_equal_peft(opt_350m, r):
    kwargs = dict(r=r, target_modules=["q_proj", "v_proj"])
    ours = inject_lora(copy.deepcopy(opt_350m), LoRAConfig(**kwargs))
    assert trainable_parameters(ours) == peft_counts(opt_350m, **kwargs)
    assert trainable_parameters(ours)[0] == 98304 * r


def test_gemma2_seq_cls_custom_head_is_not_adapted_and_fully_trainable():
    model = build("gemma2_cls", num_hidden_layers=3)
    hidden = model.config.hidden_size
    model.score = nn.Sequential(nn.Linear(hidden, 16), nn.Linear(16, 3))
    head = model.score
    config = LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[0, 2],
                        modules_to_save=["score"], task_type="SEQ_CLS")
    inject_lora(model, config)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")}
    assert model.score is head  # trained in place: no wrapper, no copy
    assert all(type(m) is nn.Linear for m in head)
    assert all(p.requires_grad for p in head.parameters())
    lora_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert trainable_parameters(model)[0] == lora_params + sum(p.numel() for p in head.parameters())
    # The head learns: every head parameter gets a gradient.
    model(input_ids=input_ids(batch=1)).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # Even "all-linear" leaves the SEQ_CLS head (here a Sequential of Linears) alone.
    model2 = build("gemma2_cls")
    model2.score = nn.Sequential(nn.Linear(hidden, 16), nn.Linear(16, 3))
    inject_lora(model2, LoRAConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert not any(n.startswith("score") for n, m in model2.named_modules() if isinstance(m, LoRALinear))
    assert all(p.requires_grad for p in model2.score.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Matching: defaults, all-linear, PEFT's check_target_module_exists
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("gpt2_lm", {"c_attn"}), ("gemma_lm", {"q_proj", "v_proj"}), ("gemma2_cls", {"q_proj", "v_proj"}),
    ("gemma3_lm", {"q_proj", "v_proj"}),
])
def test_default_targets_per_architecture(name, expected):
    model = inject_lora(build(name), LoRAConfig())
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == expected
    assert len(adapted) == 2 * len(expected)  # both layers


def test_all_linear_skips_lm_head_and_matches_peft():
    model = build("gemma3_lm")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    inject_lora(model, LoRAConfig(target_modules="all-linear"))
    ours = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ours == peft_targets and len(ours) == 2 * 7
    assert type(model.lm_head) is nn.Linear


KEYS = [
    "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.10.attn.c_attn", "h.1.attn.c_attn",
    "transformer.h.1.mlp.c_proj", "transformer.h.1.attn.c_proj", "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.experts.0.q_proj",
    "model.blocks.1.q_proj", "q_proj", "score", "score.0", "score.1", "classifier.dense", "lm_head", "x.q_proj_2",
    "model.layers.2.self_attn.xq_proj",
]
CONFIGS = [
    dict(target_modules=["c_attn"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[]),
    dict(target_modules=r".*\.(q_proj|c_attn)"),
    dict(target_modules=r"model\.layers\.1\..*"),
    dict(target_modules=["q_proj", "v_proj", "c_attn"], exclude_modules=["v_proj", "transformer.h.0.attn.c_attn"]),
    dict(target_modules=["q_proj", "c_attn"], exclude_modules=r".*layers\.0.*"),
    dict(target_modules=["score", "0", "dense", "lm_head", "q_proj"], modules_to_save=["score", "classifier"]),
    dict(target_modules=["score.0", "q_proj_2", "h.1.attn.c_attn"]),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matching_is_peft_check_target_module_exists(kwargs):
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    ours = LoRAConfig(**kwargs)
    defaults = dict(target_parameters=None, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                    modules_to_save=None)
    theirs = types.SimpleNamespace(**{**defaults, **kwargs})
    for key in KEYS:
        want = check_target_module_exists(theirs, key)
        want = "excluded" if isinstance(want, _ExcludedModule) else bool(want)
        assert match_target(ours, key) == want, key


# ---------------------------------------------------------------------------------------------------------------
# Trainable counts, printing, bias modes
# ---------------------------------------------------------------------------------------------------------------

def test_print_trainable_parameters_is_peft_line(capsys):
    model = build("gpt2_lm")
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    print_trainable_parameters(inject_lora(model, LoRAConfig(r=4)))
    ours = capsys.readouterr().out
    assert ours == theirs
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", ours)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_modes_train_what_peft_trains(bias):
    model = build("gpt2_lm")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, bias=bias))
    inject_lora(model, LoRAConfig(r=2, bias=bias))
    assert trainable_parameters(model) == theirs.get_nb_trainable_parameters()
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    expected = {"none": set(), "lora_only": {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)},
                "all": {n for n, _ in model.named_parameters() if n.endswith("bias")}}[bias]
    assert biases == expected


def test_shares_base_weights_and_state_dict_loads_original_keys():
    model = build("gpt2_lm")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.transformer.h[0].attn.c_attn.weight
    inject_lora(model, LoRAConfig(r=4))
    assert model.transformer.h[0].attn.c_attn.weight is weight  # shared, not copied
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2)
                                                 for ab in "AB")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------------------------------------------------
# merge / unmerge / unload / disable
# ---------------------------------------------------------------------------------------------------------------

def test_merge_unmerge_unload_disable_restore_outputs():
    model = build("gpt2_lm")
    ids = input_ids()
    with torch.no_grad():
        base_out = logits(model, ids)
        inject_lora(model, LoRAConfig(r=4, init_lora_weights=False, bias="lora_only"))
        lora_out = logits(model, ids)
        assert (lora_out - base_out).abs().max() > 1e-3  # the adapters do something
        with disable_lora(model):
            torch.testing.assert_close(logits(model, ids), base_out, rtol=0, atol=0)
        merge_lora(model)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(logits(model, ids), lora_out, rtol=1e-5, atol=1e-5)
        with disable_lora(model):  # merged layers are unmerged for the block...
            torch.testing.assert_close(logits(model, ids), base_out, rtol=1e-5, atol=1e-5)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))  # ...and merged again
        unmerge_lora(model)
        torch.testing.assert_close(logits(model, ids), lora_out, rtol=1e-5, atol=1e-5)
        merged = unload_lora(copy.deepcopy(model), merge=True)
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D  # the original type comes back
        torch.testing.assert_close(logits(merged, ids), lora_out, rtol=1e-5, atol=1e-5)
        plain = unload_lora(model, merge=False)
        assert plain is model
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        # merge then unmerge leaves fp32 rounding (~1e-7) in the weights
        torch.testing.assert_close(logits(model, ids), base_out, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags as before injection
    inject_lora(model, LoRAConfig(r=2))  # and it can be injected again


def test_unload_gives_back_linear_for_gemma():
    model = build("gemma_lm")
    q_proj = model.model.layers[0].self_attn.q_proj
    unload_lora(inject_lora(model, LoRAConfig()), merge=True)
    assert model.model.layers[0].self_attn.q_proj is q_proj and type(q_proj) is nn.Linear


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, model untouched
# ---------------------------------------------------------------------------------------------------------------

def test_no_match_lists_linear_module_names():
    model = build("gpt2_lm")
    before = state_of(model)
    with pytest.raises(ValueError, match=r"matched no module.*'c_attn', 'c_fc', 'c_proj', 'lm_head'"):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\]"):
        inject_lora(model, LoRAConfig(target_modules=["c_attn"], layers_to_transform=[7]))
    assert_unchanged(model, before)


def test_no_default_targets_for_unknown_architecture():
    with pytest.raises(ValueError, match="no default targets; pass target_modules"):
        inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig())


def test_quantized_target_is_a_clear_error():
    model = build("gemma_lm")
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = nn.Parameter(torch.zeros_like(q_proj.weight, dtype=torch.uint8), requires_grad=False)
    before = state_of(model)
    with pytest.raises(TypeError, match=r"'model.layers.1.self_attn.q_proj': Linear holds a torch.uint8 weight.*"
                                        r"not supported"):
        inject_lora(model, LoRAConfig())
    assert_unchanged(model, before)


def test_a_float64_model_is_told_to_cast_not_that_it_is_quantized():
    model = nn.Sequential(nn.Linear(8, 8)).double()
    before = state_of(model)
    with pytest.raises(TypeError, match=r"target '0': Linear holds a torch.float64 weight; .*float32, float16 or "
                                        r"bfloat16: cast the model first \(model.float\(\)") as error:
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert "GPTQ" not in str(error.value)
    assert_unchanged(model, before)


def test_quantized_modules_to_save_head_is_a_clear_error():
    # Gemma2 classification with a custom head holding a 4-bit-like layer: never torch's bare "only Tensors of
    # floating point dtype can require gradients".
    model = build("gemma2_cls")
    model.score = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 3))
    model.score[1].weight = nn.Parameter(torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False)
    before = state_of(model)
    with pytest.raises(TypeError, match=r"modules_to_save module 'score'.*'1.weight' of dtype torch.uint8.*"
                                        r"llm_int8_skip_modules"):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert_unchanged(model, before)


def test_non_linear_target_and_bad_modules_to_save():
    model = build("gpt2_lm")
    before = state_of(model)
    with pytest.raises(TypeError, match=r"target 'transformer.h.0.attn' is a GPT2Attention"):
        inject_lora(model, LoRAConfig(target_modules=["attn"]))
    with pytest.raises(ValueError, match=r"modules_to_save entries \['scroe'\] match no module"):
        inject_lora(model, LoRAConfig(modules_to_save=["scroe"]))
    assert_unchanged(model, before)


def test_injecting_twice_is_an_error():
    model = inject_lora(build("gpt2_lm"), LoRAConfig(r=2))
    before = state_of(model)
    with pytest.raises(ValueError, match="already has 2 fused LoRA layers.*not stacked.*unload_lora"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["c_attn", "c_fc"]))
    assert_unchanged(model, before)


def test_injecting_into_a_peft_model_is_an_error():
    model = peft.get_peft_model(build("gpt2_lm"), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has PEFT adapter layers"):
        inject_lora(model, LoRAConfig(r=2))


@pytest.mark.parametrize("kwargs,error", [
    (dict(r=0), "r=0 must be a positive integer"),
    (dict(lora_dropout=1.5), r"lora_dropout=1.5 must be in \[0, 1\]"),
    (dict(bias="some"), "bias='some'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(task_type="SEQ_CLASSIFICATION"), "task_type='SEQ_CLASSIFICATION'"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "cannot be used when target_modules is a regex"),
    (dict(layers_pattern="layers"), "layers_to_transform is not"),
    (dict(modules_to_save="score"), "modules_to_save must be a list"),
])
def test_config_validation(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        LoRAConfig(**kwargs)


def test_tied_modules_to_save_warns():
    model = build("gpt2_lm")  # lm_head shares its weight with the input embedding
    with pytest.warns(UserWarning, match="shared with 'transformer.wte.weight'"):
        inject_lora(model, LoRAConfig(modules_to_save=["lm_head"]))
    assert model.transformer.wte.weight.requires_grad  # the same tensor: trained in place


def test_merge_without_lora_is_an_error():
    with pytest.raises(ValueError, match="no fused LoRA layers; call inject_lora"):
        merge_lora(build("gpt2_lm"))
