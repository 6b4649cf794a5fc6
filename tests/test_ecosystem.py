"""torch.compile (fullgraph), autocast and activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE
from transformers import GPT2Config, GPT2LMHeadModel

from fused_lora import LoRALinear, fused_lora_linear


def make_layer(kind="linear", dropout=0.2, dtype=torch.float32):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20).to(dtype)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
    return layer


def grads_of(layer, fn, x):
    torch.manual_seed(123)  # same dropout seed draw in every run
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, compiler, monkeypatch):
    if compiler == "inductor" and backend == "triton":
        pytest.skip("the op is opaque to inductor: the aot_eager case already covers the traced graph")
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch._dynamo.reset()
    layer = make_layer().to(DEVICE)
    x = torch.randn(3, 7, 24).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    eager = grads_of(layer, layer, x)
    # Inductor draws random numbers with its own generator unless told to fall back to eager's; with it,
    # the compiled graph draws the same dropout seed as eager.
    with torch._inductor.config.patch(fallback_random=True):
        traced = grads_of(layer, compiled, x)
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_functional_no_graph_break():
    torch._dynamo.reset()
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    a, b = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)

    def fn(x):
        return fused_lora_linear(x, w, None, a, b, 2.0, 0.1, weight_layout="linear").relu()

    explanation = torch._dynamo.explain(fn)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_computes_like_nn_linear(backend, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    layer = make_layer(dropout=0.0).to(DEVICE)
    x = torch.randn(6, 24).to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 == base.dtype
    # LoRA term in fp32 from fp32 adapters, added to the bf16 base GEMM: compare with that computation
    xb, wb, bb = x.detach().bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()
    expected = torch.addmm(bb, xb, wb.t()).float() + layer.scaling * (xb.float() @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32  # flows back through autocast's cast
    assert layer.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_replays_the_same_dropout_mask(backend, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    layer = make_layer(dropout=0.3).to(DEVICE)
    x = torch.randn(2, 9, 24).to(DEVICE)
    plain = grads_of(layer, layer, x)
    ckpt = grads_of(layer, lambda t: torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False), x)
    reentrant = grads_of(layer, lambda t: torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=True), x)
    for a, b, c in zip(plain, ckpt, reentrant, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_transformers_gradient_checkpointing_same_gradients():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64)

    def run(checkpointing):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        model.requires_grad_(False)
        for block in model.transformer.h:
            block.attn.c_attn = LoRALinear.from_linear(block.attn.c_attn, r=4, lora_alpha=8, lora_dropout=0.2,
                                                       init_lora_weights=False)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        return [p.grad for n, p in model.named_parameters() if "lora_" in n]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_over_a_4bit_layer(backend, monkeypatch):
    """A quantized base runs the same custom ops as the dense one (its base object passed by handle): torch.compile
    with fullgraph=True traces a QLoRA layer without a graph break, and matches eager."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 20, bias=True, compute_dtype=torch.float32, quant_type="nf4").to(DEVICE)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
    x = torch.randn(3, 5, 64).to(DEVICE)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = grads_of(layer, layer, x)
    traced = grads_of(layer, compiled, x)
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
