"""fused_lora.peft.accelerate: an existing PeftModel computes through the fused Function and stays a PeftModel.

Every comparison is against an untouched deep copy of the same PEFT model (same base weights, same random A and B).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from helpers import DEVICE, spy  # noqa: E402
from tiny_models import accelerated_copy, assert_close, build, input_ids, loss_and_grads  # noqa: E402

import fused_lora.peft as flp  # noqa: E402

# GPT-2 has Conv1D bases (fan_in_fan_out), Gemma nn.Linear bases.
CASES = {
    "gpt2_lm": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, bias="lora_only"),
    "gemma_lm": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    """Each test starts with no fallback reason reported (a reason is reported once per process)."""
    monkeypatch.setattr(flp, "_reported", set())


def make(name: str, dtype: torch.dtype = torch.float32, **lora_kwargs) -> nn.Module:
    """A PeftModel with random (non-zero) A and B."""
    base = build(name).to(dtype)
    kwargs = {**CASES[name], "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **lora_kwargs}
    torch.manual_seed(123)
    return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


@pytest.fixture
def fused_calls(monkeypatch) -> list[str]:
    """Calls of the fused Function made by accelerated layers."""
    return spy(monkeypatch, flp, "fused_lora_linear")


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_outputs_and_gradients(name, backend, fused_calls, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    peft_model = make(name).to(DEVICE)
    fast = accelerated_copy(peft_model)
    n_layers = sum(isinstance(m, flp.FusedLinear) for m in fast.modules())
    assert n_layers == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules()) > 0
    ids = input_ids().to(DEVICE)
    want_out, want_grads = loss_and_grads(peft_model, ids)
    got_out, got_grads = loss_and_grads(fast, ids)
    assert len(fused_calls) == n_layers, "the accelerated layers did not run the fused Function"
    assert_close("logits", got_out, want_out)
    assert set(got_grads) == set(want_grads)
    for n, g in want_grads.items():
        assert_close(f"grad {n}", got_grads[n], g)


def test_bf16_base_with_fp32_adapters(fused_calls):
    # PEFT keeps adapters in fp32 on a bf16 base (autocast_adapter_dtype=True): the Function takes that mix. Both
    # are compared with the same model computed in fp32: the fused path's error is at most about PEFT's own.
    peft_model = make("gemma_lm", dtype=torch.bfloat16)
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    fast = accelerated_copy(peft_model)
    reference = copy.deepcopy(peft_model).float()
    ids = input_ids()
    ref_out, ref_grads = loss_and_grads(reference, ids)
    want_out, want_grads = loss_and_grads(peft_model, ids)
    got_out, got_grads = loss_and_grads(fast, ids)
    assert fused_calls
    pairs = [("logits", got_out, want_out, ref_out)]
    pairs += [(f"grad {n}", got_grads[n], g, ref_grads[n]) for n, g in want_grads.items()]
    for what, got, want, ref in pairs:
        assert got.dtype == want.dtype, what
        err, peft_err = max_err(got, ref), max_err(want, ref)
        assert err <= 2 * peft_err + 1e-3 * ref.abs().max().item(), f"{what}: {err:.3g} vs PEFT's {peft_err:.3g}"


def test_dropout_trains_and_eval_matches(fused_calls):
    peft_model = make("gpt2_lm", lora_dropout=0.2)
    fast = accelerated_copy(peft_model)
    ids = input_ids(batch=4, seq=8)
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = fast(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert fused_calls and losses[-1] < losses[0], losses
    # In eval mode dropout is off: the trained adapters give PEFT's output when loaded into the untouched model.
    peft_model.load_state_dict(fast.state_dict())
    fast.eval()
    peft_model.eval()
    with torch.no_grad():
        assert_close("eval logits", fast(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_state_dict_and_saved_adapter_load_in_plain_peft(tmp_path):
    peft_model = make("gpt2_lm")
    fast = accelerated_copy(peft_model)
    assert list(fast.state_dict()) == list(peft_model.state_dict())
    fast.save_pretrained(tmp_path)
    plain = peft.PeftModel.from_pretrained(build("gpt2_lm"), tmp_path)
    assert not flp.is_accelerated(plain)
    ids = input_ids()
    with torch.no_grad():
        assert_close("reloaded logits", plain(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_merge_disable_and_unload(fused_calls):
    fast = accelerated_copy(make("gpt2_lm", bias="none"))  # with a trained bias, "disabled" is not the base
    base = build("gpt2_lm")
    ids = input_ids()
    with torch.no_grad():
        lora_out = fast(input_ids=ids).logits
        base_out = base(input_ids=ids).logits
        assert not torch.allclose(lora_out, base_out)
        with fast.disable_adapter():
            assert_close("disabled", fast(input_ids=ids).logits, base_out)
        fast.merge_adapter()
        n_before = len(fused_calls)
        assert_close("merged", fast(input_ids=ids).logits, lora_out)
        assert len(fused_calls) == n_before, "a merged layer must not add the LoRA term again"
        fast.unmerge_adapter()
        assert_close("unmerged", fast(input_ids=ids).logits, lora_out)
        merged = fast.merge_and_unload()
        assert not any(isinstance(m, flp.FusedLinear) for m in merged.modules())
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert_close("merge_and_unload", merged(input_ids=ids).logits, lora_out)


def test_unserved_layers_keep_peft_path_with_one_warning(fused_calls):
    # (DoRA layers are served: tests/test_dora_modules.py; lora_bias:
    # tests/test_peft_lora_bias.py.) A float64 model is a dtype the fused Function does not take.
    peft_model = make("gemma_lm", dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"base weight dtype torch.float64") as record:
        fast = flp.accelerate(copy.deepcopy(peft_model))
    ours = [str(w.message) for w in record if "fused_lora" in str(w.message)]
    assert len(ours) == 1 and "6 of 6 LoRA layers" in ours[0], ours
    ids = input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported: no per-call warning
        want, got = peft_model(input_ids=ids).logits, fast(input_ids=ids).logits
    assert not fused_calls
    assert_close("float64 logits", got, want)


def test_several_active_adapters_fall_back(fused_calls):
    peft_model = make("gpt2_lm")
    peft_model.add_adapter("other", peft.LoraConfig(**{**CASES["gpt2_lm"], "bias": "none"}, r=2,
                                                      init_lora_weights=False))
    fast = accelerated_copy(peft_model)  # one active adapter now: served
    for m in (peft_model, fast):
        m.base_model.set_adapter(["default", "other"])
    ids = input_ids()
    with pytest.warns(UserWarning, match="several active adapters"):
        got = fast(input_ids=ids).logits
    assert not fused_calls
    assert_close("two adapters", got, peft_model(input_ids=ids).logits)
    for m in (peft_model, fast):
        m.set_adapter("other")
    assert_close("adapter 'other'", fast(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    assert fused_calls


def test_restore_and_errors():
    fast = accelerated_copy(make("gpt2_lm"))
    assert flp.is_accelerated(fast)
    flp.restore(fast)
    assert not flp.is_accelerated(fast)
    assert type(fast.base_model.model.transformer.h[0].attn.c_attn) is peft.tuners.lora.Linear
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        flp.accelerate(build("gpt2_lm"))


class SubclassedLinear(nn.Linear):
    """Stands for a quantized layer (bitsandbytes' Linear4bit subclasses nn.Linear too): not served."""


def test_custom_base_keeps_peft_path(fused_calls):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), SubclassedLinear(8, 8))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False))
    with pytest.warns(UserWarning, match=r"1 of 2 LoRA layers.*SubclassedLinear") as record:
        fast = flp.accelerate(copy.deepcopy(peft_model))
    assert len([w for w in record if "fused_lora" in str(w.message)]) == 1
    x = torch.randn(3, 8)
    assert_close("output", fast(x), peft_model(x))
    assert len(fused_calls) == 1  # the nn.Linear layer only


def test_peft_introspection_is_unchanged():
    """repr and get_layer_status()/get_model_status() report PEFT's own layer type (five PEFT tests read
    them); is_accelerated tells the difference."""
    peft_model = make("gemma_lm")
    fast = accelerated_copy(peft_model)
    q_proj = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, flp.FusedLinear) and repr(q_proj).startswith("lora.Linear(")
    assert repr(q_proj) == repr(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    types = lambda m: [(s.name, s.module_type) for s in m.get_layer_status()]  # noqa: E731
    assert types(fast) == types(peft_model) and {t for _, t in types(fast)} == {"lora.Linear"}
    assert flp.is_accelerated(fast) and not flp.is_accelerated(peft_model)


def test_reasons_are_reported_once_per_process():
    peft_model = make("gemma_lm", dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        flp.accelerate(copy.deepcopy(peft_model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flp.accelerate(copy.deepcopy(peft_model))


def test_custom_lora_layer_classes_keep_peft_warning_last():
    """A user's own LoRA layer class (PEFT's dynamic dispatch, as in its TestDynamicDispatch): PEFT warns about it
    itself; accelerate adds nothing after that warning (PEFT's tests check it is the last one) and leaves the layer
    as it is."""

    class MyLora(nn.Module, peft.tuners.lora.LoraLayer):
        def __init__(self, base_layer, adapter_name, **kwargs):
            super().__init__()
            peft.tuners.lora.LoraLayer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name

    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(10, 20)
            self.head = nn.Linear(20, 4)

    config = peft.LoraConfig(target_modules=["lstm", "head"])
    config._register_custom_module({nn.LSTM: MyLora})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        peft_model = peft.get_peft_model(WithLSTM(), config)
        n_peft = len(record)
        flp.accelerate(peft_model)
    assert n_peft >= 1 and "Unsupported layer type" in str(record[-1].message)
    assert len(record) == n_peft, [str(w.message) for w in record[n_peft:]]
    assert type(peft_model.base_model.model.lstm) is MyLora
    assert type(peft_model.base_model.model.head) is flp.FusedLinear
