"""fused_lora.peft.enable() / disable(): every PEFT LoRA model made while enabled is served by the fused path, through
each of PEFT's entry points, with no access to the model object; disable() gives PEFT back exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import spy
from tiny_models import assert_close, build, input_ids
from torch import nn

peft = pytest.importorskip("peft")

import fused_lora.peft as flp  # noqa: E402

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
TUNERS = [cls for cls in (peft.tuners.lora.LoraModel, getattr(peft.tuners, "MixedModel", None)) if cls is not None]


def class_state() -> list[dict]:
    return [dict(vars(cls)) for cls in TUNERS]


PRISTINE = class_state()  # PEFT's tuner classes as imported, before any test enabled anything


@pytest.fixture(autouse=True)
def always_disabled_after(monkeypatch):
    monkeypatch.setattr(flp, "_reported", set())
    yield
    flp.disable()
    assert class_state() == PRISTINE


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    return spy(monkeypatch, flp, "fused_lora_linear")


def lora_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def peft_model(**overrides) -> nn.Module:
    torch.manual_seed(123)
    return peft.get_peft_model(build("gemma_lm"), peft.LoraConfig(**{**CONFIG, **overrides}))


def assert_served_like_peft(model: nn.Module, plain: nn.Module, fused_calls: list[int], n_layers: int = 4) -> None:
    """All LoRA layers swapped, the fused Function ran once per layer, and the outputs are the plain PEFT model's."""
    assert lora_types(model) == {"FusedLinear"} and lora_types(plain) == {"Linear"}
    ids = input_ids()
    n = len(fused_calls)
    with torch.no_grad():
        assert_close("logits", model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) - n == n_layers


def test_get_peft_model_also_through_modules_that_imported_it_before(fused_calls):
    from peft import get_peft_model as bound_before  # bound before enable(), as TRL binds it

    plain = peft_model()
    flp.enable()
    assert flp.is_enabled()
    torch.manual_seed(123)
    fused = bound_before(build("gemma_lm"), peft.LoraConfig(**CONFIG))
    assert bound_before is peft.get_peft_model  # PEFT's function itself is not replaced
    assert_served_like_peft(fused, plain, fused_calls)


def test_peft_model_from_pretrained_and_auto_class(tmp_path, fused_calls):
    plain = peft_model()
    plain.save_pretrained(tmp_path)
    with flp.enabled():
        loaded = peft.PeftModel.from_pretrained(build("gemma_lm"), tmp_path)
        assert_served_like_peft(loaded, plain, fused_calls)
        for_lm = peft.PeftModelForCausalLM.from_pretrained(build("gemma_lm"), tmp_path)
        assert_served_like_peft(for_lm, plain, fused_calls)
    assert not flp.is_enabled()


def test_inject_adapter_in_model(fused_calls):
    plain = peft_model()
    state = {k.removeprefix("base_model.model."): v for k, v in plain.state_dict().items()}
    flp.enable()
    injected = peft.inject_adapter_in_model(peft.LoraConfig(**CONFIG), build("gemma_lm"))
    injected.load_state_dict(state)
    assert lora_types(injected) == {"FusedLinear"}
    ids = input_ids()
    with torch.no_grad():
        assert_close("inject_adapter_in_model", injected(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 4


def test_transformers_add_adapter():
    flp.enable()
    hf = build("gemma_lm")
    try:
        hf.add_adapter(peft.LoraConfig(**CONFIG))  # transformers' PeftAdapterMixin: inject_adapter_in_model
    except ValueError as err:  # transformers 5.25 asks for peft >= 0.22 here
        if "version of PEFT" not in str(err):
            raise
        pytest.skip(f"transformers' add_adapter refuses this peft: {err}")
    assert lora_types(hf) == {"FusedLinear"}


def test_mixed_model(fused_calls):
    plain = peft_model()
    flp.enable()
    torch.manual_seed(123)
    mixed = peft.get_peft_model(build("gemma_lm"), peft.LoraConfig(**CONFIG), mixed=True)
    assert isinstance(mixed, peft.PeftMixedModel)
    assert_served_like_peft(mixed, plain, fused_calls)


def test_add_and_load_adapter_on_an_enabled_model_serve_the_new_layers(tmp_path, fused_calls):
    other = dict(CONFIG, target_modules=["down_proj"])
    flp.enable()
    model = peft_model()
    model.add_adapter("other", peft.LoraConfig(**other))
    assert lora_types(model) == {"FusedLinear"} and len([m for m in model.modules() if type(m) is flp.FusedLinear]) == 6
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "other", adapter_name="again")
    assert lora_types(model) == {"FusedLinear"}
    model.set_adapter("again")
    with torch.no_grad():
        model(input_ids=input_ids())
    assert len(fused_calls) == 2  # the two down_proj layers, with adapter "again"


def test_model_made_before_enable_is_untouched(fused_calls):
    before = peft_model()
    reference = copy.deepcopy(before)
    flp.enable()
    assert lora_types(before) == {"Linear"}
    with torch.no_grad():
        assert torch.equal(before(input_ids=input_ids()).logits, reference(input_ids=input_ids()).logits)
    assert not fused_calls
    # PEFT injecting into it again while enabled serves the model as a whole, so that it never mixes layer classes.
    before.add_adapter("other", peft.LoraConfig(**dict(CONFIG, target_modules=["down_proj"])))
    assert lora_types(before) == {"FusedLinear"}
    with torch.no_grad():
        assert_close("after add_adapter", before(input_ids=input_ids()).logits, reference(input_ids=input_ids()).logits)
    assert len(fused_calls) == 4  # the active adapter is still "default" on q_proj and v_proj


def test_enable_disable_enable_and_idempotence(fused_calls):
    flp.enable()
    wrapper = peft.tuners.lora.LoraModel.inject_adapter
    flp.enable()  # a second call changes nothing: one wrapper, PEFT's original inside it
    assert peft.tuners.lora.LoraModel.inject_adapter is wrapper
    assert wrapper.__fused_lora_wrapped__ is peft.tuners.tuners_utils.BaseTuner.inject_adapter
    kept = peft_model()
    assert lora_types(kept) == {"FusedLinear"}
    flp.disable()
    assert class_state() == PRISTINE and not flp.is_enabled()
    assert peft.tuners.lora.LoraModel.inject_adapter is peft.tuners.tuners_utils.BaseTuner.inject_adapter
    flp.disable()  # again: nothing to undo
    assert lora_types(peft_model()) == {"Linear"}  # PEFT exactly
    assert lora_types(kept) == {"FusedLinear"}  # models made while enabled keep their layers ...
    assert lora_types(flp.restore(kept)) == {"Linear"}  # ... until restore()
    flp.enable()
    assert lora_types(peft_model()) == {"FusedLinear"}


def test_context_manager_keeps_an_enabled_state():
    flp.enable()
    with flp.enabled():
        pass
    assert flp.is_enabled()
    flp.disable()
    with flp.enabled():
        assert flp.is_enabled()
    assert not flp.is_enabled()


def test_unserved_layers_warn_once_at_creation():
    flp.enable()
    with pytest.warns(UserWarning, match=r"fused_lora.peft: 4 of 4 LoRA layers keep PEFT's unfused forward: base "
                                         r"weight dtype torch.float64") as record:
        model = peft.get_peft_model(build("gemma_lm").double(), peft.LoraConfig(**CONFIG))
    assert len([w for w in record if "fused_lora" in str(w.message)]) == 1
    assert lora_types(model) == {"FusedLinear"}  # swapped; each call takes PEFT's forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=input_ids())


def test_subclassed_tuners_and_other_methods_keep_peft_behaviour():
    flp.enable()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fused_lora")
        ada = peft.get_peft_model(build("gemma_lm"), peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
        ia3 = peft.get_peft_model(build("gemma_lm"), peft.IA3Config(target_modules=["q_proj"],
                                                                      feedforward_modules=[]))
    assert lora_types(ada) == {"SVDLinear"} and not flp.is_accelerated(ada) and not flp.is_accelerated(ia3)


def test_trl_binding_of_get_peft_model_is_reached():
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    flp.enable()
    assert trl_sft.get_peft_model is peft.get_peft_model  # TRL's own binding, never patched ...
    model = trl_sft.get_peft_model(build("gemma_lm"), peft.LoraConfig(**CONFIG))
    assert lora_types(model) == {"FusedLinear"}  # ... and still served
