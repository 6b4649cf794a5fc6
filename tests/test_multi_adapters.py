"""Several named adapters in a model (fused_lora/multi_adapters.py, multi_layer.MultiLoRALinear): injection into
GPT-2 (Conv1D), Gemma, Llama and OPT with PEFT's config words per adapter; per-example rows by ``adapter_names=`` (a
forward argument the model never sees), a context, or the active adapter; the collator; a param group per adapter;
PEFT adapter folders per adapter that ``PeftModel.from_pretrained`` loads alone.

Each adapter's examples get exactly what a model with that adapter alone (``inject_lora`` with the same seed) gives:
outputs and gradients, in any example order, with ``"__base__"`` examples getting the base model's output."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, build, input_ids

from fused_lora import LoRAConfig, inject_lora
from fused_lora.multi_adapters import (
    AdapterCollator,
    adapter_param_groups,
    get_multi_state,
    group_by_adapter,
    inject_adapters,
    load_adapters,
    multi_layers,
    save_adapters,
    set_active_adapter,
    unload_adapters,
    use_adapters,
)
from fused_lora.multi_layer import MultiLoRALinear

SEEDS = {"small": 11, "big": 22, "attn": 33}


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg).train()
    if name == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32,
                                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0)
        return transformers.OPTForCausalLM(cfg).train()
    return build(name, seed)


# per model: three adapters with different ranks, alphas, targets (one adapter on attention only), one rsLoRA, one
# with a bias of its own
CONFIGS = {
    "gpt2_lm": {"small": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
                "big": dict(r=8, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_rslora=True, bias="lora_only"),
                "attn": dict(r=3, lora_alpha=6, target_modules=["c_attn"])},
    "gemma_lm": {"small": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                 "big": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                 "attn": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True)},
    "llama": {"small": dict(r=2, lora_alpha=4, target_modules="all-linear"),
              "big": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 4}),
              "attn": dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"])},
    "opt": {"small": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"]),
            "big": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"], bias="lora_only"),
            "attn": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])},
}


def configs(model_name: str, **common) -> dict[str, LoRAConfig]:
    return {name: LoRAConfig(**{**kw, "init_lora_weights": False, **common})
            for name, kw in CONFIGS[model_name].items()}


def single(model_name: str, name: str | None) -> torch.nn.Module:
    """The model with adapter ``name`` alone (None: the base model), initialised as inject_adapters' seeds say."""
    model = tiny(model_name)
    if name is not None:
        torch.manual_seed(SEEDS[name])
        inject_lora(model, configs(model_name)[name])
    return model


def multi(model_name: str) -> torch.nn.Module:
    return inject_adapters(tiny(model_name), configs(model_name), seeds=SEEDS)


@pytest.mark.parametrize("model_name", ["gpt2_lm", "gemma_lm", "llama", "opt"])
def test_each_example_gets_what_its_adapter_alone_gives(model_name):
    """Examples in mixed order (grouped per layer and put back), one for the base model: logits and every trained
    parameter's gradient equal those of the models with one adapter each."""
    model = multi(model_name)
    ids = input_ids(5, 7)
    names = ["big", "small", "__base__", "attn", "big"]
    out = model(input_ids=ids, adapter_names=names).logits
    out.square().sum().backward()
    assert all(isinstance(m, MultiLoRALinear) for m in multi_layers(model).values())
    for name in ("small", "big", "attn", None):
        ref_model = single(model_name, name)
        rows = [e for e, n in enumerate(names) if n == (name or "__base__")]
        ref = ref_model(input_ids=ids[rows]).logits
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-5)
        if name is None:
            continue
        ref.square().sum().backward()
        ours = {path: layer for path, layer in multi_layers(model).items() if name in layer.settings}
        for path, layer in ours.items():
            theirs = ref_model.get_submodule(path)
            torch.testing.assert_close(layer.lora_A[name].grad, theirs.lora_A.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.lora_B[name].grad, theirs.lora_B.grad, rtol=1e-4, atol=1e-5)
            if name in layer.lora_bias:
                torch.testing.assert_close(layer.lora_bias[name].grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)


def test_the_forward_argument_the_context_and_the_active_adapter():
    model = multi("gpt2_lm")
    ids = input_ids(3, 6)
    with torch.no_grad():
        by_arg = model(input_ids=ids, adapter_names=["attn", "attn", "attn"]).logits
        with use_adapters(model, ["attn"] * 3):
            by_context = model(input_ids=ids).logits
        set_active_adapter(model, "attn")
        by_active = model(input_ids=ids).logits
        set_active_adapter(model, "small")
        other = model(input_ids=ids).logits
    torch.testing.assert_close(by_arg, by_context, rtol=0, atol=0)
    torch.testing.assert_close(by_arg, by_active, rtol=0, atol=0)
    assert not torch.allclose(by_arg, other)
    with pytest.raises(ValueError, match="no adapter named \\['nope'\\]"):
        model(input_ids=ids, adapter_names=["nope", "attn", "attn"])
    with pytest.raises(ValueError, match="3 examples were named"):
        model(input_ids=input_ids(2, 6), adapter_names=["attn"] * 3)


def test_collator_groups_rows_and_the_model_reads_its_names():
    examples = [{"input_ids": [1, 2, 3], "adapter": "big"}, {"input_ids": [4, 5, 6], "adapter": "small"},
                {"input_ids": [7, 8, 9], "adapter": "__base__"}, {"input_ids": [3, 3, 3], "adapter": "big"}]
    grouped, names = group_by_adapter(examples, ["small", "big", "attn"])
    assert names == ["small", "big", "big", "__base__"]
    assert [e["input_ids"] for e in grouped] == [[4, 5, 6], [1, 2, 3], [3, 3, 3], [7, 8, 9]]
    collate = AdapterCollator(lambda rows: {"input_ids": torch.tensor([r["input_ids"] for r in rows])},
                              ["small", "big", "attn"])
    batch = collate(examples)
    assert batch["adapter_names"] == names
    model = multi("gpt2_lm")
    rows = model.transformer.h[0].attn.c_attn.rows
    with torch.no_grad():
        model(**batch)
    plan = next(iter(rows.plans.values()))
    assert plan.order is None and plan.counts == (1, 2, 0) and plan.base == 1  # grouped: no copy


def test_one_optimizer_with_a_group_per_adapter_trains_each_at_its_rate():
    model = multi("gpt2_lm")
    groups = adapter_param_groups(model, {"small": {"lr": 1e-2}, "big": {"lr": 1e-3}})
    assert [g["name"] for g in groups] == ["small", "big", "attn"]
    n_layers = {"small": 4, "big": 4, "attn": 2}  # c_attn and c_fc in 2 blocks; attn: c_attn only
    for g in groups:
        assert len(g["params"]) == (3 if g["name"] == "big" else 2) * n_layers[g["name"]]  # big: own biases
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.SGD(groups, lr=0.0)
    model(input_ids=input_ids(3, 5), adapter_names=["small", "big", "attn"]).logits.sum().backward()
    before = {g["name"]: [p.detach().clone() for p in g["params"]] for g in groups}
    opt.step()
    for g in groups:
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(g["params"], before[g["name"]], strict=True))
        assert (moved > 0) == (g["name"] != "attn"), g["name"]  # attn's lr: SGD's default here, 0


@pytest.mark.parametrize("model_name", ["gpt2_lm", "opt"])
def test_each_adapter_saved_is_loaded_alone_by_peft(model_name, tmp_path):
    peft = pytest.importorskip("peft")
    model = multi(model_name)
    with torch.no_grad():  # trained a little, so that B (random here anyway) and the own biases differ from init
        for layer in multi_layers(model).values():
            for name in layer.lora_bias:
                layer.lora_bias[name].add_(0.1)
    written = save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn", "big", "small"]
    ids = input_ids(2, 6)
    for name, folder in written.items():
        assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
        loaded = peft.PeftModel.from_pretrained(tiny(model_name), folder).eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits,
                                       model(input_ids=ids, adapter_names=[name, name]).logits, rtol=1e-5, atol=1e-5)
    fresh = load_adapters(tiny(model_name), {n: written[n] for n in ("small", "attn")})
    assert list(get_multi_state(fresh).configs) == ["small", "attn"]
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, adapter_names=["attn", "small"]).logits,
                                   model(input_ids=ids, adapter_names=["attn", "small"]).logits, rtol=1e-6, atol=1e-6)


def test_refusals_and_unload():
    model = tiny("gpt2_lm")
    with pytest.raises(TypeError, match="use_dora=True"):
        inject_adapters(model, {"a": LoRAConfig(r=2, target_modules=["c_attn"], use_dora=True)})
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_adapters(model, {"a": LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])})
    with pytest.raises(ValueError, match="bias='all'"):
        inject_adapters(model, {"a": LoRAConfig(r=2, target_modules=["c_attn"], bias="all")})
    assert not multi_layers(model) and get_multi_state(model) is None  # nothing half-done
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    inject_adapters(model, configs("gpt2_lm"))
    unload_adapters(model)
    assert not multi_layers(model) and {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
