"""PEFT's mixed-adapter batches (``adapter_names=[name per example]``) on accelerated PEFT models
(fused_lora/peft_mixed.py): one multi-adapter call per LoRA layer instead of PEFT's loop over adapters.

Three adapters of different ranks (one rsLoRA; one on attention only, with a lora_B bias: layers without it give its
examples the base output), ``"__base__"`` examples, examples in mixed order. Inference: the logits PEFT's own mixed
batch gives, by the fp64 rule (error <= 2x PEFT's fp32 error against PEFT in fp64 + atol). Training (PEFT refuses
``adapter_names`` there; an accelerated model takes it): every adapter's A, B (and lora_B bias) gradients equal, by the
same rule, those of PEFT trained with that adapter alone on its examples. Random B and PEFT's B = 0; both backends, the
Triton one on its fused path; each test checks that the multi-adapter Function ran on every LoRA layer (a spy on its
entry, the path record)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from helpers import DEVICE, assert_within_torch_error, atol_for, spy  # noqa: E402
from tiny_models import build, input_ids  # noqa: E402

import fused_lora.peft as flp  # noqa: E402
from fused_lora import bases, diagnostics, fallback, multi_layer  # noqa: E402

# per model: adapter → LoraConfig words. "attn" sits on attention only (the MLP layers give its examples the base) and
# has a lora_B bias (lora_bias=True: GPT-2's c_attn has a base bias, Gemma's q/v_proj none).
ADAPTERS = {
    "gpt2_lm": {"small": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
                "big": dict(r=5, lora_alpha=7, target_modules=["c_attn", "c_fc"], use_rslora=True),
                "attn": dict(r=3, lora_alpha=6, target_modules=["c_attn"], lora_bias=True)},
    "gemma_lm": {"small": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                 "big": dict(r=5, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
                 "attn": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], lora_bias=True)},
}
HAS_LORA_BIAS = "lora_bias" in {f.name for f in dataclasses.fields(peft.LoraConfig)}  # peft >= 0.14
NAMES = ["big", "__base__", "small", "attn", "big", "small"]  # mixed order, one base-only example


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.setattr(flp, "_reported", set())
    monkeypatch.setattr(fallback, "_warned", set())
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    diagnostics.clear()
    yield
    diagnostics.clear()


@pytest.fixture
def multi_calls(monkeypatch) -> list[str]:
    """Calls of the multi-adapter variant's entry (every one runs the driver's autograd Function)."""
    return spy(monkeypatch, multi_layer, "multi_call")


def use_backend(monkeypatch, backend: str) -> None:
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    if backend == "triton":
        monkeypatch.setenv("FUSED_LORA_GEMM", "fused")


def make(name: str, b_zero: bool = False, dropout: float = 0.0) -> nn.Module:
    """A PeftModel with the three adapters (random A; random B unless ``b_zero``, PEFT's init)."""
    base = build(name)
    torch.manual_seed(123)
    model = None
    for adapter, kw in ADAPTERS[name].items():
        if not HAS_LORA_BIAS:
            kw = {k: v for k, v in kw.items() if k != "lora_bias"}
        config = peft.LoraConfig(**kw, lora_dropout=dropout, init_lora_weights=True if b_zero else False,
                                 fan_in_fan_out=name.startswith("gpt2"))
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=adapter)
        else:
            model.add_adapter(adapter, config)
    return model.to(DEVICE)


def n_lora_layers(model: nn.Module) -> int:
    return sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def assert_fused_multi_ran(model: nn.Module, calls: list, backend: str, per_layer: int) -> None:
    assert len(calls) == per_layer * n_lora_layers(model) > 0, "the layers did not run the multi-adapter Function"
    if backend == "triton":
        report = diagnostics.path_report()
        assert report and all(k.startswith("multi|") and e["runs"] == "fused" for k, e in report.items()), report


def check(name: str, got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item() if ref.numel() else 1.0
    assert_within_torch_error(name, got, same, ref, atol_for(torch.float32, scale))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_name", list(ADAPTERS))
def test_inference_equals_peft_mixed_batch(model_name, backend, multi_calls, monkeypatch):
    use_backend(monkeypatch, backend)
    peft_model = make(model_name, dropout=0.1).eval()  # eval: no dropout, as in PEFT
    fast = flp.accelerate(copy.deepcopy(peft_model))
    ref64 = copy.deepcopy(peft_model).double()
    ids = input_ids(len(NAMES), 5).to(DEVICE)
    with torch.no_grad():
        got = fast(input_ids=ids, adapter_names=NAMES).logits
        same = peft_model(input_ids=ids, adapter_names=NAMES).logits
        ref = ref64(input_ids=ids, adapter_names=NAMES).logits
        base = peft_model(input_ids=ids, adapter_names=["__base__"] * len(NAMES)).logits
    assert_fused_multi_ran(fast, multi_calls, backend, per_layer=1)
    check("logits", got, same, ref)
    # the test can fail: every adapter changes its examples' logits; the base example keeps the base model's
    changed = (got - base).abs().amax(dim=(1, 2))
    assert changed[1] < 1e-5 and (changed[[0, 2, 3, 4, 5]] > 1e-3).all(), changed


def single_adapter_grads(model: nn.Module, adapter: str, ids: torch.Tensor, dy: torch.Tensor) -> dict:
    """PEFT with ``adapter`` alone active (and trainable), trained on ``ids``: its A/B gradients by parameter name."""
    model = copy.deepcopy(model).train()
    model.set_adapter(adapter)
    (model(input_ids=ids).logits * dy).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if n.split(".")[-2] == adapter and ".lora_" in n}


@pytest.mark.parametrize("model_name,backend,b_zero", [
    ("gpt2_lm", "torch", False), ("gpt2_lm", "triton", True), ("gemma_lm", "triton", False),
    ("gemma_lm", "torch", True)])
def test_training_each_adapter_gets_its_gradients_alone(model_name, backend, b_zero, multi_calls, monkeypatch):
    use_backend(monkeypatch, backend)
    peft_model = make(model_name, b_zero=b_zero).train()
    with pytest.raises(ValueError, match="training mode"):  # PEFT itself refuses it
        peft_model(input_ids=input_ids(2, 3).to(DEVICE), adapter_names=["big", "small"])
    fast = flp.accelerate(copy.deepcopy(peft_model))
    for n, p in fast.named_parameters():
        p.requires_grad_("lora_" in n)  # every adapter trains
    ids = input_ids(len(NAMES), 5).to(DEVICE)
    dy = torch.randn(*ids.shape, fast.config.vocab_size, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (fast(input_ids=ids, adapter_names=NAMES).logits * dy).sum().backward()
    assert_fused_multi_ran(fast, multi_calls, backend, per_layer=1)
    got = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    ref64_model = copy.deepcopy(peft_model).double()
    checked = 0
    for adapter in ADAPTERS[model_name]:
        rows = [e for e, n in enumerate(NAMES) if n == adapter]
        same = single_adapter_grads(peft_model, adapter, ids[rows], dy[rows])
        ref = single_adapter_grads(ref64_model, adapter, ids[rows], dy[rows].double())
        assert same and set(same) == set(ref)
        for n, g in ref.items():
            assert got[n] is not None, f"{n}: no gradient"
            check(n, got[n], same[n], g)
            checked += 1
    assert checked == sum(1 for n in got if ".lora_" in n) > 0
    if b_zero:  # PEFT's init: dA = 0, dB ≠ 0 (the test would see a B gradient lost)
        assert all(got[n].abs().max() > 0 for n in got if ".lora_B." in n)


def test_training_dropout_is_each_adapters_own(monkeypatch, multi_calls):
    """In training each adapter applies its own lora_dropout to its rows: p = 1 drops the whole LoRA branch (the base
    output), p = 0 drops nothing (its eval output)."""
    use_backend(monkeypatch, "torch")
    model = flp.accelerate(make("gpt2_lm"))
    for layer in model.modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            layer.lora_dropout["small"] = nn.Dropout(1.0)
    ids = input_ids(4, 5).to(DEVICE)
    names = ["small", "big", "__base__", "small"]
    with torch.no_grad():
        model.eval()
        want = model(input_ids=ids, adapter_names=names).logits
        base = model(input_ids=ids, adapter_names=["__base__"] * 4).logits
        model.train()
        got = model(input_ids=ids, adapter_names=names).logits
    assert multi_calls
    torch.testing.assert_close(got[[0, 2, 3]], base[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert (got[0] - want[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bnb_bases(kind, monkeypatch, multi_calls):
    """bitsandbytes bases (PEFT's lora.bnb.Linear4bit / Linear8bitLt): inference equals PEFT's mixed batch, training
    each adapter's gradients alone."""
    from test_peft_lora_bias import bnb_model

    use_backend(monkeypatch, "torch")
    base = bnb_model(kind)
    setattr(base, f"is_loaded_in_{kind}", True)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0", "2"], r=3, lora_alpha=6,
                                                      init_lora_weights=False), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(target_modules=["0", "2"], r=5, lora_alpha=4, init_lora_weights=False))
    assert type(model.base_model.model[0]).__name__ == ("Linear4bit" if kind == "4bit" else "Linear8bitLt")
    fast = flp.accelerate(copy.deepcopy(model))
    # PEFT's own model with the weights in bitsandbytes' standard packing too: on CPU its eval forward would otherwise
    # repack them for bitsandbytes' inference kernel, which differs by ~4e-3 from its training-mode forward
    bases.prepare_all(model)
    x = torch.randn(5, 3, 64, device=DEVICE)
    names = ["two", "one", "__base__", "two", "one"]
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x, adapter_names=names), model.eval()(x, adapter_names=names),
                                   rtol=1e-5, atol=1e-5)
    assert len(multi_calls) == 2
    for n, p in fast.named_parameters():
        p.requires_grad_("lora_" in n)
    dy = torch.randn(5, 3, 64, device=DEVICE)
    (fast.train()(x, adapter_names=names) * dy).sum().backward()
    for adapter in ("one", "two"):
        rows = [e for e, n in enumerate(names) if n == adapter]
        alone = copy.deepcopy(model).train()
        alone.set_adapter(adapter)
        (alone(x[rows]) * dy[rows]).sum().backward()
        for n, p in alone.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(fast.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_a_layer_that_cannot_be_served_runs_peft_loop(monkeypatch, multi_calls):
    """A forward hook on one layer's lora_A (the fused call would skip it): that layer runs PEFT's loop (the hook
    fires), with one warning; the others stay fused, and the logits are PEFT's. DoRA adapters: PEFT's own error."""
    use_backend(monkeypatch, "torch")
    peft_model = make("gpt2_lm").eval()
    fast = flp.accelerate(copy.deepcopy(peft_model))
    fired = []
    hooked = fast.base_model.model.transformer.h[0].attn.c_attn
    hooked.lora_A["small"].register_forward_hook(lambda *a: fired.append(1))
    ids = input_ids(len(NAMES), 5).to(DEVICE)
    with torch.no_grad(), pytest.warns(UserWarning, match="forward hooks"):
        got = fast(input_ids=ids, adapter_names=NAMES).logits
    want = peft_model(input_ids=ids, adapter_names=NAMES).logits
    assert fired and len(multi_calls) == n_lora_layers(fast) - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    dora = flp.accelerate(peft.get_peft_model(build("gpt2_lm"), peft.LoraConfig(
        target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True), adapter_name="d")).eval()
    with pytest.raises(ValueError, match="DoRA"):
        dora(input_ids=ids[:2], adapter_names=["d", "__base__"])


def test_training_only_where_fused_lora_serves(monkeypatch):
    """The training-mode bypass is the accelerated model's: restore() gives PEFT's refusal back; enable() models
    have it; gradient checkpointing is refused with a reason (its recomputation would lose the names)."""
    use_backend(monkeypatch, "torch")
    ids = input_ids(2, 4).to(DEVICE)
    model = flp.accelerate(make("gpt2_lm").train())
    model(input_ids=ids, adapter_names=["big", "__base__"])
    flp.restore(model)
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["big", "__base__"])
    with flp.enabled():
        enabled = make("gpt2_lm").train()
    assert flp.is_accelerated(enabled)
    enabled(input_ids=ids, adapter_names=["small", "attn"]).logits.sum().backward()
    getattr(enabled, "activation_checkpointing_enable", enabled.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        enabled(input_ids=ids, adapter_names=["small", "attn"])


def test_generate_with_adapter_names(monkeypatch, multi_calls):
    """PeftModel.generate hands the names to every step (KV-cached steps: one row per example): PEFT's tokens."""
    use_backend(monkeypatch, "torch")
    peft_model = make("gpt2_lm").eval()
    fast = flp.accelerate(copy.deepcopy(peft_model))
    ids = input_ids(4, 3).to(DEVICE)
    names = ["attn", "__base__", "big", "small"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=4,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, got = peft_model.generate(**kw), fast.generate(**kw)
    assert len(multi_calls) == 4 * n_lora_layers(fast)
    assert torch.equal(got, want)


def test_modules_to_save_keep_peft_mixed_forward(monkeypatch, multi_calls):
    """A classification head per adapter (modules_to_save, PEFT's own wrapper and its own mixed forward) beside fused
    LoRA layers: PEFT's logits; in training, each adapter's head and LoRA gradients are those of training it alone."""
    use_backend(monkeypatch, "torch")
    base = build("gpt2_cls")
    torch.manual_seed(7)
    model = None
    for adapter, r in (("one", 2), ("two", 4)):
        config = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=4, target_modules=["c_attn"],
                                 fan_in_fan_out=True, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=adapter)
        else:
            model.add_adapter(adapter, config)
    with torch.no_grad():  # heads that differ per adapter
        for adapter in ("one", "two"):
            model.base_model.model.score.modules_to_save[adapter].weight.normal_()
    model = model.to(DEVICE).eval()
    fast = flp.accelerate(copy.deepcopy(model))
    ids = input_ids(4, 5).to(DEVICE)
    names = ["two", "one", "__base__", "two"]
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, adapter_names=names).logits,
                                   model(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    assert len(multi_calls) == n_lora_layers(fast)
    fast.train()
    for n, p in fast.named_parameters():
        p.requires_grad_("lora_" in n or "modules_to_save" in n)
    fast(input_ids=ids, adapter_names=names).logits.square().sum().backward()
    for adapter in ("one", "two"):
        rows = [e for e, n in enumerate(names) if n == adapter]
        alone = copy.deepcopy(model).train()
        alone.set_adapter(adapter)
        alone(input_ids=ids[rows]).logits.square().sum().backward()
        grads = {n: p.grad for n, p in alone.named_parameters() if p.requires_grad}
        assert any("modules_to_save" in n for n in grads) and any("lora_A" in n for n in grads)
        for n, g in grads.items():
            torch.testing.assert_close(fast.get_parameter(n).grad, g, rtol=1e-4, atol=1e-5, msg=n)
