"""Bad input gets an error that names the shapes or dtypes involved and what to do."""

from __future__ import annotations

import pytest
import torch

from fused_lora import LoRALinear, fused_lora_linear


def good():
    return dict(x=torch.randn(4, 10), weight=torch.randn(6, 10), bias=torch.randn(6),
                lora_A=torch.randn(3, 10), lora_B=torch.randn(6, 3), scaling=1.0)


def call(**overrides):
    args = good()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return fused_lora_linear(**args, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"x": torch.randn(4, 11)}, ValueError, ["(4, 11)", "in_features=10"]),
        ({"lora_A": torch.randn(3, 9)}, ValueError, ["lora_A (3, 9)", "r×in_features"]),
        ({"lora_B": torch.randn(6, 2)}, ValueError, ["lora_B (6, 2)"]),
        ({"bias": torch.randn(5)}, ValueError, ["(5,)", "(6,)"]),
        ({"x": torch.randn(4, 10, dtype=torch.float16)}, TypeError, ["torch.float16", "torch.float32"]),
        ({"lora_A": torch.randn(3, 10, dtype=torch.float16)}, TypeError, ["lora_A (torch.float16)"]),
        ({"x": torch.ones(4, 10, dtype=torch.long)}, TypeError, ["torch.int64"]),
        ({"dropout_p": 1.5}, ValueError, ["dropout_p=1.5", "[0, 1]"]),
        ({"dropout_p": -0.1}, ValueError, ["dropout_p=-0.1"]),
        ({"weight_layout": "transposed"}, ValueError, ["'transposed'", "conv1d"]),
        ({"weight": torch.randn(6, 10, requires_grad=True)}, ValueError, ["requires grad", "requires_grad_(False)"]),
        ({"weight": torch.randn(6, 10, device="meta")}, ValueError, ["weight on meta", "x on cpu"]),
        ({"backend": "cuda-graphs"}, ValueError, ["'cuda-graphs'", "torch"]),
    ],
)
def test_bad_input_is_named(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    message = str(info.value)
    assert message.startswith("fused_lora"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_conv1d_layout_error_names_layout():
    with pytest.raises(ValueError, match=r"conv1d layout, in×out"):
        call(weight=torch.randn(6, 10), weight_layout="conv1d")


def test_backend_env_var_is_checked(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND='fast'"):
        call()


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(8, 8, r=0)
    with pytest.raises(ValueError, match="lora_dropout=1.5"):
        LoRALinear(8, 8, lora_dropout=1.5)
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_linear(torch.nn.Embedding(5, 4))
    int_layer = torch.nn.Linear(4, 4)
    int_layer.weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8.*quantized"):
        LoRALinear.from_linear(int_layer)


def test_module_input_dtype_mismatch_says_what_to_do():
    layer = LoRALinear(8, 4)
    with pytest.raises(TypeError, match="autocast"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("overrides", [{"x": torch.randn(4, 11)}, {"lora_A": torch.randn(3, 9)},
                                       {"bias": torch.randn(5)}])
def test_shape_errors_are_also_pytorchs_runtime_error(overrides):
    """PEFT's layer raises PyTorch's RuntimeError for shapes that do not fit (its matmul does); ours raises one error
    that is both that and the ValueError it always raised, so code (and PEFT's tests) expecting either still works."""
    with pytest.raises(RuntimeError):
        call(**overrides)
    with pytest.raises(ValueError):
        call(**overrides)


def test_a_peft_layer_served_fused_raises_pytorchs_error_for_a_wrong_input():
    peft = pytest.importorskip("peft")
    from fused_lora import peft as flp

    model = flp.accelerate(peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(10, 6)),
                                               peft.LoraConfig(target_modules=["0"], r=2)))
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 11))
    layer = LoRALinear(10, 6, r=2)
    with pytest.raises(RuntimeError, match="in_features=10"):
        layer(torch.randn(4, 11))
