"""Adversarial inputs, one test per row of docs/adversarial-inputs.md that no other test file covers.

Each bad input gets an error of a stated type whose message names the offending thing (argument, layer, shapes,
dtypes, devices) and says what to do, and leaves nothing half-changed; each odd-but-legal input (NaN/Inf, zero
rows, very wide or tall shapes, merge twice) gets the defined result. Rows already covered elsewhere are named in
the doc's table instead of repeated here.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE
from test_errors import call
from test_functional import make_problem, run_and_check
from tiny_models import assert_unchanged, build, input_ids, logits, state_of
from torch import nn
from transformers.pytorch_utils import Conv1D

import fused_lora.injector as injector
from fused_lora import (
    LoRAConfig,
    LoRALinear,
    dropout_mask,
    fused_lora_linear,
    inject_lora,
    lora_linear_ref,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from fused_lora.injector import get_state

NAN, INF = float("nan"), float("inf")


def raises_naming(error, call_, *words):
    """Runs ``call_``, which must raise ``error`` whose message contains every one of ``words``."""
    with pytest.raises(error) as info:
        call_()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------------------
# fused_lora_linear: the rows test_errors.py does not cover
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        # rank r = 0 and zero-width layers
        ({"lora_A": torch.randn(0, 10), "lora_B": torch.randn(6, 0)}, ValueError, ["lora_A (0, 10)", "r=0",
                                                                                  "must be >= 1"]),
        ({"x": torch.randn(4, 0), "weight": torch.randn(6, 0), "lora_A": torch.randn(3, 0)}, ValueError,
         ["weight (6, 0)", "in_features=0", "both >= 1"]),
        ({"weight": torch.randn(0, 10), "bias": None, "lora_B": torch.randn(0, 3)}, ValueError,
         ["weight (0, 10)", "out_features=0"]),
        # A and B of different ranks
        ({"lora_A": torch.randn(4, 10)}, ValueError, ["lora_A (4, 10)", "lora_B (6, 3)", "r×in_features"]),
        # devices (meta stands for the second device)
        ({"lora_A": torch.randn(3, 10, device="meta")}, ValueError, ["lora_A on meta", "x on cpu", "Move"]),
        ({"lora_B": torch.randn(6, 3, device="meta")}, ValueError, ["lora_B on meta", "weight on cpu"]),
        ({"bias": torch.randn(6, device="meta")}, ValueError, ["bias on meta", "module.to(device)"]),
        # dtypes that do not go together
        ({"x": torch.randn(4, 10, dtype=torch.float64), "weight": torch.randn(6, 10, dtype=torch.float64)},
         TypeError, ["torch.float64", "float32, float16 or bfloat16"]),
        ({"lora_A": torch.randn(3, 10, dtype=torch.float64), "lora_B": torch.randn(6, 3, dtype=torch.float64)},
         TypeError, ["lora_A (torch.float64)", "either x's (torch.float32) or float32"]),
        ({"x": torch.randn(4, 10, dtype=torch.float16), "weight": torch.randn(6, 10, dtype=torch.float16),
          "bias": None, "lora_A": torch.randn(3, 10, dtype=torch.bfloat16),
          "lora_B": torch.randn(6, 3, dtype=torch.bfloat16)}, TypeError, ["lora_A (torch.bfloat16)",
                                                                          "x's (torch.float16)"]),
        ({"bias": torch.randn(6, dtype=torch.float16)}, TypeError, ["bias is torch.float16", "x's dtype"]),
        ({"weight": torch.ones(6, 10, dtype=torch.int8)}, TypeError, ["weight is torch.int8", "cast"]),
        # non-float x
        ({"x": torch.ones(4, 10, dtype=torch.bool)}, TypeError, ["torch.bool", "embedding"]),
        ({"x": torch.randn(4, 10, dtype=torch.complex64)}, TypeError, ["torch.complex64"]),
        # dropout and scaling that are not numbers in range
        ({"dropout_p": NAN}, ValueError, ["dropout_p=nan", "[0, 1]"]),
        ({"dropout_p": "0.1"}, TypeError, ["dropout_p='0.1'", "must be a number"]),
        ({"dropout_p": None}, TypeError, ["dropout_p=None"]),
        ({"scaling": INF}, ValueError, ["scaling=inf", "finite"]),
        ({"scaling": "2"}, TypeError, ["scaling='2'", "must be a number"]),
    ],
    ids=[
        "r=0", "in_features=0", "out_features=0", "A-and-B-ranks-differ", "lora_A-on-other-device",
        "lora_B-on-other-device", "bias-on-other-device", "float64-x-and-weight", "float64-adapters",
        "bf16-adapters-on-fp16-x", "fp16-bias-on-fp32-x", "int8-weight", "bool-x", "complex-x", "dropout-nan",
        "dropout-string", "dropout-None", "scaling-inf", "scaling-string",
    ],
)
def test_functional_bad_input_is_named(overrides, error, words):
    message = raises_naming(error, lambda: call(**overrides), *words)
    assert message.startswith("fused_lora_linear:"), message


def test_functional_x_on_other_device_than_layer():
    raises_naming(ValueError, lambda: call(x=torch.randn(4, 10, device="meta")), "x on meta", "weight on cpu")


# ---------------------------------------------------------------------------------------------------------------
# NaN and Inf: propagated exactly as lora_linear_ref propagates them, forward and backward, both backends
# ---------------------------------------------------------------------------------------------------------------

M, K, N, R = 6, 10, 7, 3
POISON = {  # which tensor gets a non-finite value, where, and which value
    "x-nan": ("x", (2, 4), NAN),
    "x-+inf": ("x", (1, 0), INF),
    "x--inf": ("x", (5, 9), -INF),
    "lora_A-nan": ("lora_A", (1, 3), NAN),
    "lora_A-inf": ("lora_A", (0, 7), INF),
    "lora_B-nan": ("lora_B", (4, 2), NAN),
    "lora_B--inf": ("lora_B", (6, 0), -INF),
    "bias-nan": ("bias", (3,), NAN),
    "weight-inf": ("weight", (2, 5), INF),
}


def poisoned(case: str, index: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(M, K, generator=g), "weight": torch.randn(N, K, generator=g) * K**-0.5,
         "bias": torch.randn(N, generator=g), "lora_A": torch.randn(R, K, generator=g) * K**-0.5,
         "lora_B": torch.randn(N, R, generator=g)}
    name, default_index, value = POISON[case]
    t[name][default_index if index is None else index] = value
    return {k: v.to(DEVICE) for k, v in t.items()}


def outputs_and_grads(fn, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {k: v.clone().requires_grad_(k != "weight") for k, v in t.items()}
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"])
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape))
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in leaves.items() if k != "weight"}}


def assert_same_propagation(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in want:
        g, w = got[name], want[name]
        for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
            assert torch.equal(test(g), test(w)), f"{name}: {kind} at {test(g).nonzero().tolist()}, the reference " \
                                                  f"has them at {test(w).nonzero().tolist()}"
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-5, msg=f"{name}: finite values differ")


def nan_cases():
    for p in (0.0, 0.3):
        for case in POISON:
            for backend in BACKENDS:
                yield pytest.param(backend, case, p, id=f"{backend}-{case}-p{p}")


NUMPY_NAN_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter


@NUMPY_NAN_WARNING
@pytest.mark.parametrize(("backend", "case", "p"), list(nan_cases()))
def test_nan_inf_propagate_like_the_reference(backend, case, p):
    seed = 11
    mask = dropout_mask(seed, (M, K), p, DEVICE, backend=backend) if p > 0 else None
    index = None
    if mask is not None and POISON[case][0] == "x":  # a kept element here; a dropped one is the next test's
        kept = (mask != 0).nonzero()
        index = tuple(kept[len(kept) // 2].tolist())
    t = poisoned(case, index)
    got = outputs_and_grads(lambda x, w, b, a, bb: fused_lora_linear(x, w, b, a, bb, 2.0, p, dropout_seed=seed,
                                                                     backend=backend), t)
    want = outputs_and_grads(lambda x, w, b, a, bb: lora_linear_ref(x, w, b, a, bb, 2.0, dropout_mask=mask), t)
    assert not all(torch.isfinite(v).all() for v in want.values()), "the poison did not reach anything"
    assert_same_propagation(got, want)


@NUMPY_NAN_WARNING
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF])
def test_nan_inf_at_a_dropped_element_propagate_like_the_reference(backend, value):
    p, seed = 0.5, 11
    mask = dropout_mask(seed, (M, K), p, DEVICE, backend=backend)
    dropped = (mask == 0).nonzero()
    t = poisoned("x-nan", tuple(dropped[len(dropped) // 2].tolist()))
    t["x"][t["x"].isnan()] = value
    got = outputs_and_grads(lambda x, w, b, a, bb: fused_lora_linear(x, w, b, a, bb, 2.0, p, dropout_seed=seed,
                                                                     backend=backend), t)
    want = outputs_and_grads(lambda x, w, b, a, bb: lora_linear_ref(x, w, b, a, bb, 2.0, dropout_mask=mask), t)
    assert_same_propagation(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Very wide and very tall shapes (the interpreter is slow: modest sizes for the kernels)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "lead", "K", "N", "r"), [
    ("torch", (1,), 4096, 4096, 16),  # one token through a wide layer
    ("torch", (1,), 16384, 4, 4),  # very wide input, narrow output
    ("torch", (1, 1), 4, 16384, 4),  # narrow input, very wide output
    ("triton", (1,), 256, 512, 8),
    ("triton", (1,), 512, 256, 16),
], ids=["torch-M1-K4096-N4096", "torch-M1-K16384-N4", "torch-M1-K4-N16384", "triton-M1-K256-N512",
        "triton-M1-K512-N256"])
def test_very_wide(backend, lead, K, N, r):
    x, weight, bias, lora_A, lora_B = make_problem(lead, K, N, r, torch.float32, "linear", True, device=DEVICE)
    run_and_check(x, weight, bias, lora_A, lora_B, scaling=2.0, p=0.1, layout="linear", backend=backend)


@pytest.mark.parametrize(("backend", "rows"), [("torch", 200_000), ("triton", 512)])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_very_tall_with_one_feature_and_rank_one(backend, rows, layout):
    # K = N = r = 1: dA and dB are sums over every row. The fp32 sum's rounding grows like sqrt(rows), so the
    # check is against fp64 with that slack (a wrong mask, scale or missing block is off by O(1)).
    x, weight, bias, lora_A, lora_B = make_problem((rows,), 1, 1, 1, torch.float32, layout, True, device=DEVICE)
    p, seed = 0.1, 5
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, weight_layout=layout, dropout_seed=seed,
                          backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    y.backward(dy)
    mask = dropout_mask(seed, (rows, 1), p, DEVICE, backend=backend)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, bias, lora_A, lora_B)]
    ref = lora_linear_ref(leaves[0], weight.double(), leaves[1], leaves[2], leaves[3], 2.0, weight_layout=layout,
                          dropout_mask=mask)
    ref.backward(dy.double())
    slack = 8 * math.sqrt(rows) * torch.finfo(torch.float32).eps
    for name, got, want in zip(("y", "dx", "dbias", "dA", "dB"), (y, x.grad, bias.grad, lora_A.grad, lora_B.grad),
                               (ref, *(t.grad for t in leaves)), strict=True):
        err = (got.double() - want).abs().max().item()
        assert err <= slack * (1 + want.abs().max().item()), f"{name}: error {err:.3g} at {rows} rows"


# ---------------------------------------------------------------------------------------------------------------
# LoRALinear
# ---------------------------------------------------------------------------------------------------------------

def layer(**kwargs) -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(10, 6, r=3, init_lora_weights=False, **kwargs)


@pytest.mark.parametrize("state", ["fused", "merged", "disabled"])
@pytest.mark.parametrize(("x", "error", "words"), [
    (torch.randn(4, 11), ValueError, ["(4, 11)", "in_features=10"]),
    (torch.tensor(1.0), ValueError, ["shape ()", "in_features=10"]),
    (torch.randn(4, 10, device="meta"), ValueError, ["x is on meta", "weight is on cpu", "module.to(device)"]),
], ids=["last-dim", "scalar", "device"])
def test_layer_bad_input_names_the_layer(state, x, error, words):
    mod = layer()
    if state == "merged":
        mod.merge()
    mod.enabled = state != "disabled"
    raises_naming(error, lambda: mod(x), "LoRALinear(in_features=10, out_features=6, r=3)", *words)


@pytest.mark.parametrize(("x", "error", "words"), [
    (torch.ones(2, 10, dtype=torch.long), TypeError, ["torch.int64", "embedding"]),
    (torch.randn(2, 10, dtype=torch.float64), TypeError, ["torch.float64"]),
], ids=["token-ids", "float64"])
def test_layer_non_float_input(x, error, words):
    raises_naming(error, lambda: layer()(x), *words)


@pytest.mark.parametrize("which", ["lora_A", "lora_B", "both"])
def test_layer_adapters_of_another_rank(which):
    mod = layer()
    with torch.no_grad():
        if which in ("lora_A", "both"):
            mod.lora_A = nn.Parameter(torch.randn(5, 10))
        if which in ("lora_B", "both"):
            mod.lora_B = nn.Parameter(torch.randn(6, 5))
    weight = mod.weight.detach().clone()
    words = ["LoRALinear(in_features=10, out_features=6, r=3)", "needs (3, 10) and (6, 3)", "build a layer"]
    raises_naming(ValueError, lambda: mod(torch.randn(2, 10)), *words)
    raises_naming(ValueError, mod.merge, *words)
    assert torch.equal(mod.weight, weight) and not mod.merged


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    (dict(r=-1), ValueError, ["r=-1", "positive integer"]),
    (dict(r=True), ValueError, ["r=True"]),
    (dict(r=2.0), ValueError, ["r=2.0"]),
    (dict(lora_dropout=-0.1), ValueError, ["lora_dropout=-0.1", "[0, 1]"]),
    (dict(in_features=0), ValueError, ["in_features=0", ">= 1"]),
    (dict(out_features=0), ValueError, ["out_features=0"]),
    (dict(dtype=torch.int8), TypeError, ["dtype=torch.int8", "floating point"]),
    (dict(adapter_dtype=torch.int32), TypeError, ["adapter_dtype=torch.int32", "floating point"]),
], ids=["r=-1", "r=True", "r=2.0", "dropout=-0.1", "in_features=0", "out_features=0", "int8-weight",
        "int32-adapters"])
def test_layer_constructor_refuses(kwargs, error, words):
    args = {"in_features": 10, "out_features": 6, **kwargs}
    raises_naming(error, lambda: LoRALinear(**args), *words)


def test_layer_dropout_changed_after_construction():
    mod = layer()
    mod.lora_dropout = 1.5
    raises_naming(ValueError, lambda: mod(torch.randn(2, 10)), "dropout_p=1.5", "[0, 1]")
    mod.eval()  # refused in eval mode too: the value is wrong whether or not it is used
    raises_naming(ValueError, lambda: mod(torch.randn(2, 10)), "dropout_p=1.5")


def test_from_linear_of_a_lora_layer():
    raises_naming(TypeError, lambda: LoRALinear.from_linear(layer()), "already a LoRALinear", "not stacked")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_unfrozen_weight_is_refused(backend, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    mod = layer()
    mod.weight.requires_grad_(True)
    raises_naming(ValueError, lambda: mod(torch.randn(2, 10)), "LoRALinear(in_features=10, out_features=6, r=3)",
                  "base weight (6, 10) requires grad", "requires_grad_(False)")
    assert mod.weight.grad is None


def test_layer_unfrozen_weight_when_merged_or_disabled_is_nn_linear():
    # No LoRA computation runs: the layer is the base layer, and trains it like nn.Linear would.
    mod = layer()
    mod.weight.requires_grad_(True)
    with mod.disable_adapter():
        mod(torch.randn(2, 10)).sum().backward()
    assert mod.weight.grad is not None and mod.lora_A.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_twice_is_one_merge_and_unmerge_unmerged_is_a_no_op(kind):
    base = nn.Linear(10, 6) if kind == "linear" else Conv1D(6, 10)
    mod = LoRALinear.from_linear(base, r=3, init_lora_weights=False)
    original = mod.weight.detach().clone()
    mod.unmerge()  # not merged: nothing happens
    assert torch.equal(mod.weight, original) and not mod.merged
    mod.merge()
    once = mod.weight.detach().clone()
    assert not torch.equal(once, original)
    mod.merge()
    assert torch.equal(mod.weight, once) and mod.merged
    mod.unmerge()
    mod.unmerge()
    torch.testing.assert_close(mod.weight, original, rtol=0, atol=1e-6)
    assert not mod.merged


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_merge_refuses_non_finite_adapters(which, value):
    mod = layer()
    with torch.no_grad():
        getattr(mod, which)[0, 0] = value
    weight = mod.weight.detach().clone()
    raises_naming(ValueError, mod.merge, "LoRALinear(in_features=10, out_features=6, r=3)", f"{which} holds NaN or Inf",
                  "left unchanged", "reset_lora_parameters")
    assert torch.equal(mod.weight, weight) and not mod.merged


def test_merge_refuses_an_overflowing_half_weight():
    mod = LoRALinear(4, 4, r=1, init_lora_weights=False, dtype=torch.float16, adapter_dtype=torch.float16)
    with torch.no_grad():
        mod.weight.fill_(60000.0)
        mod.lora_A.fill_(100.0)
        mod.lora_B.fill_(100.0)
    weight = mod.weight.detach().clone()
    raises_naming(ValueError, mod.merge, "overflows torch.float16", "left unchanged")
    assert torch.equal(mod.weight, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", ["fused", "merged"])
def test_layer_zero_rows(backend, state, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    mod = layer(lora_dropout=0.1).to(DEVICE)
    if state == "merged":
        mod.merge()
    x = torch.randn(3, 0, 10, device=DEVICE, requires_grad=True)
    y = mod(x)
    assert y.shape == (3, 0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    if state == "fused":
        assert torch.count_nonzero(mod.lora_A.grad) == 0 and torch.count_nonzero(mod.lora_B.grad) == 0


# ---------------------------------------------------------------------------------------------------------------
# inject_lora and the model-level operations
# ---------------------------------------------------------------------------------------------------------------

def lora_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def assert_unchanged_nan_aware(model, before):
    """tiny_models.assert_unchanged for a model holding NaN on purpose (NaN == NaN here)."""
    after = state_of(model)
    assert after[1:] == before[1:], "requires_grad flags or module types changed"
    assert after[0].keys() == before[0].keys()
    for key in before[0]:
        torch.testing.assert_close(after[0][key], before[0][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_unfrozen_injected_model_is_refused_at_forward():
    model = inject_lora(build("gpt2_lm"), LoRAConfig(r=2))
    model.requires_grad_(True)  # the mistake: e.g. a training script that unfreezes everything
    raises_naming(ValueError, lambda: logits(model, input_ids()), "LoRALinear(in_features=32, out_features=96, r=2)",
                  "requires grad", "model.requires_grad_(True)", "requires_grad_(False)", "unload_lora")


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(lora_dropout="0.1"), TypeError, ["lora_dropout='0.1'", "number"]),
    (dict(target_modules=5), TypeError, ["target_modules must be a list", "5"]),
    (dict(r=True), ValueError, ["r=True"]),
    (dict(r=-3), ValueError, ["r=-3"]),
], ids=["dropout-string", "target_modules-int", "r=True", "r=-3"])
def test_config_refuses(kwargs, error, words):
    raises_naming(error, lambda: LoRAConfig(**kwargs), "LoRAConfig", *words)


def test_inject_failing_half_way_leaves_the_model_as_it_was(monkeypatch):
    model = build("gemma_lm")
    model.model.layers[0].self_attn.k_proj.requires_grad_(False)  # a mix of flags to restore
    before = state_of(model)
    real = LoRALinear.from_linear
    calls = []

    def fail_on_third(layer, **kwargs):
        calls.append(layer)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real(layer, **kwargs)
    monkeypatch.setattr(injector.LoRALinear, "from_linear", fail_on_third)
    with pytest.raises(MemoryError):
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert len(calls) == 3
    assert_unchanged(model, before)
    assert not lora_paths(model) and get_state(model) is None
    monkeypatch.undo()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))  # and it can be injected after


def test_merge_lora_twice_and_unmerge_lora_unmerged():
    model = inject_lora(build("gpt2_lm"), LoRAConfig(r=2, init_lora_weights=False))
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    unmerge_lora(model)
    assert all(torch.equal(model.state_dict()[n], w) for n, w in weights.items())
    merge_lora(model)
    once = {n: p.detach().clone() for n, p in model.state_dict().items()}
    merge_lora(model)
    assert all(torch.equal(model.state_dict()[n], w) for n, w in once.items())


@pytest.mark.parametrize("operation", ["merge_lora", "unload_lora"])
def test_merge_with_one_poisoned_layer_merges_nothing(operation):
    model = inject_lora(build("gpt2_lm"), LoRAConfig(r=2, init_lora_weights=False, target_modules=["c_attn", "c_fc"]))
    paths = lora_paths(model)
    with torch.no_grad():
        model.get_submodule(paths[-1]).lora_B[0, 0] = NAN  # the last layer: the others merge first
    before = state_of(model)
    run = {"merge_lora": lambda: merge_lora(model), "unload_lora": lambda: unload_lora(model, merge=True)}[operation]
    raises_naming(ValueError, run, "merge refused", "lora_B holds NaN or Inf", "left unchanged")
    assert_unchanged_nan_aware(model, before)
    assert not any(model.get_submodule(p).merged for p in paths)


def test_merged_model_unmerge_with_poisoned_layer_unmerges_nothing():
    model = merge_lora(inject_lora(build("gpt2_lm"), LoRAConfig(r=2, init_lora_weights=False)))
    paths = lora_paths(model)
    with torch.no_grad():
        model.get_submodule(paths[-1]).lora_A[0, 0] = INF
    before = state_of(model)
    raises_naming(ValueError, lambda: unmerge_lora(model), "unmerge refused")
    assert_unchanged_nan_aware(model, before)
    assert all(model.get_submodule(p).merged for p in paths)


def test_layers_on_different_devices_get_adapters_on_their_own_device():
    model = build("gemma_lm")
    model.model.layers[1].to("meta")  # e.g. a layer offloaded by device_map
    inject_lora(model, LoRAConfig(r=2))
    for path in lora_paths(model):
        mod = model.get_submodule(path)
        assert mod.lora_A.device == mod.lora_B.device == mod.weight.device, path
    assert model.model.layers[1].self_attn.q_proj.lora_A.device.type == "meta"
    assert model.model.layers[0].self_attn.q_proj.lora_A.device.type == "cpu"
