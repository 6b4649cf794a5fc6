"""DoRA at the module and model level: ``LoRALinear(use_dora=True)`` and ``LoRAConfig(use_dora=True)``
through ``inject_lora`` against PEFT's DoRA models (outputs, gradients, the initial magnitude), merge / unmerge /
unload like PEFT's, adapter files both ways, ``fused_lora.peft.accelerate`` on PEFT's DoRA layers, and what the layer
keeps for backward."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import BACKENDS, DEVICE, spy
from test_saved_memory import saved_storages
from tiny_models import (
    assert_close,
    build,
    copy_peft_trainables,
    input_ids,
    loss_and_grads,
    make_pair,
    peft_name_to_ours,
)
from torch import nn

from fused_lora import (
    LoRAConfig,
    LoRALinear,
    fused_lora_linear,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
import fused_lora.peft as flp  # noqa: E402

# GPT-2: Conv1D bases (in×out weights, PEFT's fan_in_fan_out); Gemma: nn.Linear bases.
CASES = {
    "gpt2_lm": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True, bias="lora_only"),
    "gemma_lm": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
}


def dora_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(PEFT DoRA model, ours) with the same random A, B and magnitudes away from ‖W + s·B A‖ (g ≠ 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for GPT-2's Conv1D
        peft_model, ours = make_pair(name, CASES[name])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    copy_peft_trainables(peft_model, ours)
    return peft_model.to(DEVICE), ours.to(DEVICE)


def dora_call(name: str, kwargs: dict) -> bool:
    """A ``helpers.spy`` note: whether a call of the fused Function was a DoRA one (it passes the magnitude)."""
    return kwargs.get("magnitude") is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_peft_dora(name, backend, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    peft_model, ours = dora_pair(name)
    ids = input_ids().to(DEVICE)
    want, want_grads = loss_and_grads(peft_model, ids)
    got, got_grads = loss_and_grads(ours, ids)
    assert_close("logits", got, want)
    want_grads = {peft_name_to_ours(n): g for n, g in want_grads.items()}
    assert set(got_grads) == set(want_grads) and any("lora_magnitude_vector" in n for n in got_grads)
    for n, g in got_grads.items():
        assert_close(n, g, want_grads[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_initial_magnitude_is_peft_bit_for_bit(dtype, layout):
    """‖W‖ per output row in the weight's dtype, then the adapters' (fp32 on a half base), as PEFT initialises it."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = (nn.Linear(40, 24) if layout == "linear" else Conv1D(24, 40)).to(dtype)
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(
        r=4, target_modules=["0"], use_dora=True, fan_in_fan_out=layout == "conv1d"))
    want = model.base_model.model[0].lora_magnitude_vector["default"].weight
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, use_dora=True)
    assert layer.lora_magnitude_vector.dtype == want.dtype == torch.float32
    assert torch.equal(layer.lora_magnitude_vector, want)
    x = torch.randn(5, 40, dtype=dtype)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0.02 if dtype == torch.bfloat16 else 1e-5)


def test_layer_api():
    layer = LoRALinear(16, 12, r=2, lora_alpha=4, init_lora_weights=False, use_dora=True)
    assert "use_dora=True" in repr(layer) and layer.lora_magnitude_vector.shape == (12,)
    assert "lora_magnitude_vector" in dict(layer.named_parameters())
    assert "lora_magnitude_vector" not in dict(LoRALinear(16, 12, r=2).named_parameters())
    x = torch.randn(3, 16)
    want = fused_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                             magnitude=layer.lora_magnitude_vector)
    torch.testing.assert_close(layer(x), want)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.reset_lora_parameters()  # B back to zero and the magnitude back to ‖W‖: the base layer again
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.weight.norm(dim=1))
    torch.testing.assert_close(layer(x), layer.base_forward(x))
    with pytest.raises(TypeError, match="use_dora=True on a bitsandbytes"):
        bnb = pytest.importorskip("bitsandbytes")
        LoRALinear.from_linear(bnb.nn.Linear4bit(16, 12, quant_type="nf4"), use_dora=True)


@pytest.mark.parametrize("name", list(CASES))
def test_merge_unmerge_unload_like_peft(name):
    peft_model, ours = dora_pair(name)
    peft_model.eval()
    ours.eval()
    ids = input_ids().to(DEVICE)
    before = ours(input_ids=ids).logits.detach()
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith(".weight")}
    merge_lora(ours)
    assert_close("merged logits", ours(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    ours_weights = dict(ours.named_parameters())
    for n, w in merged.named_parameters():  # PEFT's merge (it folds the magnitude the same way)
        assert_close(n, ours_weights[n], w, rtol=1e-5, atol=1e-6)
    unmerge_lora(ours)
    for n, w in weights.items():
        assert_close(n, dict(ours.named_parameters())[n], w, rtol=1e-5, atol=1e-6)
    assert_close("unmerged logits", ours(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    unloaded = unload_lora(ours, merge=True)
    assert [type(m) for m in unloaded.modules()] == [type(m) for m in merged.modules()]
    assert_close("unloaded logits", unloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5,
                 atol=1e-5)


def test_merge_refusals_leave_the_weight():
    layer = LoRALinear(8, 6, r=2, init_lora_weights=False, use_dora=True)
    w = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector[1] = float("nan")
    with pytest.raises(ValueError, match="merge refused, lora_magnitude_vector holds NaN"):
        layer.merge()
    assert torch.equal(layer.weight, w) and not layer.merged
    with torch.no_grad():
        layer.lora_magnitude_vector[1] = 0.0  # a zero row merges (to zeros) but cannot be divided back
    layer.merge()
    with pytest.raises(ValueError, match="unmerge refused, a DoRA row factor"):
        layer.unmerge()
    assert layer.merged


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_files_both_ways_with_peft(name, tmp_path):
    from safetensors.torch import load_file

    peft_model, ours = dora_pair(name)
    ids = input_ids().to(DEVICE)
    want = peft_model(input_ids=ids).logits.detach()
    save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k for k in keys if "magnitude" in k} == {k.replace("lora_A.weight", "lora_magnitude_vector")
                                                     for k in keys if k.endswith("lora_A.weight")}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(build(name).to(DEVICE), tmp_path / "ours")
    assert_close("PEFT loads ours", theirs(input_ids=ids).logits, want)
    peft_model.save_pretrained(tmp_path / "peft")
    plain = load_adapter(build(name).to(DEVICE), tmp_path / "peft")
    assert_close("we load PEFT's", plain(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="use_dora=True but layer"):  # DoRA weights into LoRA layers
        config = LoRAConfig(**{**CASES[name], "use_dora": False})
        load_adapter(inject_lora(build(name).to(DEVICE), config), tmp_path / "peft")


def test_config_round_trip_and_quantized_targets():
    config = LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True)
    data = config.to_peft_dict()
    assert data["use_dora"] is True and LoRAConfig.from_peft_dict(data).use_dora is True
    assert peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"}).use_dora is True
    with pytest.raises(TypeError, match="use_dora"):
        LoRAConfig(use_dora="yes")
    with pytest.raises(ValueError, match="use_dora"):
        LoRAConfig.from_peft_dict({**data, "use_dora": "yes"})
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear4bit(16, 8, quant_type="nf4"))
    with pytest.raises(TypeError, match="target '0': use_dora=True on a bitsandbytes Linear4bit"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"], use_dora=True))
    assert type(model[0]).__name__ == "Linear4bit"


@pytest.mark.parametrize("name", list(CASES))
def test_accelerate_serves_peft_dora_layers(name, monkeypatch):
    monkeypatch.setattr(flp, "_reported", set())
    calls = spy(monkeypatch, flp, "fused_lora_linear", note=dora_call)
    peft_model, _ = dora_pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every DoRA layer served: no fallback warning
        fast = flp.accelerate(copy.deepcopy(peft_model))
    ids = input_ids().to(DEVICE)
    want, want_grads = loss_and_grads(peft_model, ids)
    got, got_grads = loss_and_grads(fast, ids)
    assert calls and all(calls)
    assert_close("logits", got, want)
    for n, g in got_grads.items():
        assert_close(n, g, want_grads[n], rtol=1e-4, atol=1e-7)
    # Dropout outside training is no dropout, as in PEFT's DoRA (its base_result path), even when the dropout module
    # itself was left in training mode: PEFT's DoRA asks the LoRA layer's flag.
    for model in (fast, peft_model):
        model.eval()
        for layer in model.modules():
            if hasattr(layer, "lora_dropout"):
                layer.lora_dropout["default"] = nn.Dropout(0.3).train()
    assert_close("eval with p > 0", fast(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_peft_dora_at_init_leaves_the_base_output(monkeypatch):
    """PEFT 0.21.2's own test ``tests/test_initialization.py::TestLoraInitialization::test_lora_use_dora_linear``
    through ``fused_lora.peft.accelerate``, on the PyTorch path: DoRA at init leaves an fp32 ``nn.Linear(1000, 1000)``'s
    output unchanged, under ``torch.allclose`` as PEFT checks it (its g is exactly 1 there: the magnitude was
    initialised by the same ``torch.linalg.norm`` computation, and B = 0)."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    monkeypatch.setattr(flp, "_reported", set())
    served = spy(monkeypatch, flp, "fused_lora_linear", note=dora_call)

    class MyModule(nn.Module):  # PEFT's test model, less the embedding and convolution it does not target
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1000, 1000)

        def forward(self, x):
            return self.linear(x)

    data = torch.rand(10, 1000, device=DEVICE)
    torch.manual_seed(0)
    model = MyModule().eval().to(DEVICE)
    output_base = model(data)
    model = flp.accelerate(peft.get_peft_model(model, peft.LoraConfig(target_modules=["linear"], use_dora=True)))
    with model.disable_adapter():
        output_disabled = model(data)
    output_dora = model(data)
    assert served == [True]  # the fused DoRA Function ran (disable_adapter is PEFT's own forward)
    assert torch.allclose(output_base, output_disabled)
    assert torch.allclose(output_base, output_dora), (output_dora - output_base).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_are_x_s_p_and_the_norms(backend, p):
    """x itself, S (M×r), P (M×N, for the magnitude's gradient), the row norms (N, fp32) and the seed; no mask and
    no dropped copy of x. At p = 0.1 that is under half of what PEFT's DoRA layer keeps."""
    M, K, N, r = 96, 80, 64, 8
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    layer = LoRALinear(K, N, r=r, lora_alpha=16, lora_dropout=p, init_lora_weights=False, use_dora=True).to(DEVICE)
    params = {t.untyped_storage().data_ptr() for t in layer.parameters()}
    storages, y = saved_storages(lambda: fused_lora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, p, backend=backend,
        magnitude=layer.lora_magnitude_vector))
    activations = {ptr: n for ptr, n in storages.items() if ptr not in params}
    assert x.untyped_storage().data_ptr() in activations, "x itself (not a copy) should be saved"
    assert sum(activations.values()) <= x.untyped_storage().nbytes() + M * r * 4 + M * N * 4 + N * 4 + 8, activations
    y.sum().backward()
    layer.lora_magnitude_vector.requires_grad_(False)  # a frozen magnitude: no P (it serves only its gradient)
    storages, _ = saved_storages(lambda: fused_lora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, p, backend=backend,
        magnitude=layer.lora_magnitude_vector))
    assert sum(n for ptr, n in storages.items() if ptr not in params) <= x.untyped_storage().nbytes() + M * r * 4 \
        + N * 4 + 8
    if p > 0:
        model = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)), peft.LoraConfig(
            r=r, lora_alpha=16, lora_dropout=p, target_modules=["0"], use_dora=True)).to(DEVICE)
        theirs, _ = saved_storages(lambda: model(x))
        theirs_params = {t.untyped_storage().data_ptr() for t in model.parameters()}
        theirs = sum(n for ptr, n in theirs.items() if ptr not in theirs_params)
        assert sum(activations.values()) <= 0.5 * theirs, (sum(activations.values()), theirs)


def _grads(layer, fn, x):
    torch.manual_seed(123)  # the same dropout seed draw in every run
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_checkpoint_and_autocast(backend, monkeypatch):
    """torch.compile(fullgraph=True) traces the DoRA custom ops; checkpointing replays the same mask; under autocast
    the base GEMMs run in bf16 and the fp32 adapters and magnitude keep fp32 gradients."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(24, 20), r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False,
                                   use_dora=True).to(DEVICE)
    x = torch.randn(3, 7, 24, device=DEVICE)
    eager = _grads(layer, layer, x)
    compiled = _grads(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    ckpt = _grads(layer, lambda t: torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False), x)
    for a, b, c in zip(eager, compiled, ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, c)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32 and layer.weight.grad is None
