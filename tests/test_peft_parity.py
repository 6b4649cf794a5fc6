"""Parity with PEFT: the same model with PEFT's LoRA and ours, given the same A and B (B ≠ 0), gives the same outputs
and the same gradient on every trainable parameter (fp32, p = 0)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE
from tiny_models import assert_close, input_ids, logits, make_pair, peft_name_to_ours

pytest.importorskip("peft")

# fp32 through a 2-layer model: the fused path and PEFT's eager ops differ only by summation order (measured here:
# outputs bit-identical, gradients within 7e-7 relative), so 1e-5 / 1e-6 leaves room and still catches real bugs.
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "gpt2_lm": dict(r=4, lora_alpha=8, bias="all"),
    "gpt2_cls": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], layers_to_transform=[1],
                     bias="lora_only", modules_to_save=["score"], task_type="SEQ_CLS"),
    "gemma_lm": dict(r=8, lora_alpha=16),
    "gemma2_cls": dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[1],
                       task_type="SEQ_CLS"),
    "gemma3_lm": dict(r=6, lora_alpha=12, use_rslora=True, target_modules="all-linear"),
}


def run(model, ids, grad_out_seed=7):
    out = logits(model, ids)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.device)
    (out * grad_out).sum().backward()
    return out.detach()


def assert_parity(peft_model, ours, ids):
    want, got = run(peft_model, ids), run(ours, ids)
    assert_close("logits", got, want, RTOL, ATOL)
    theirs = {peft_name_to_ours(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_trainable) == set(theirs)
    for name, p in ours_trainable.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert_close(f"grad of {name}", p.grad, theirs[name].grad, RTOL, ATOL)
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_match_peft(name):
    peft_model, ours = make_pair(name, CASES[name])
    assert_parity(peft_model, ours, input_ids())


def test_parity_check_catches_a_small_adapter_difference():
    # The check above must be able to fail: nudge one entry of one B by 1e-4 relative (caught at least in the
    # gradient of that layer's bias, which sees B through dY's path).
    peft_model, ours = make_pair("gpt2_cls", CASES["gpt2_cls"])
    with torch.no_grad():
        b = ours.transformer.h[1].attn.c_attn.lora_B
        b[0, 0] *= 1 + 1e-4
    with pytest.raises(AssertionError, match=r"(logits|grad of transformer\.h\.[01]\.).*max abs error"):
        assert_parity(peft_model, ours, input_ids())


def test_outputs_and_gradients_match_peft_through_triton_kernels(monkeypatch):
    # The Triton kernels, run by Triton's interpreter on CPU (slow: a one-layer model, 5 tokens); on a GPU, on it.
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    from fused_lora.backends import lora_triton

    calls = []
    for op in ("lora_forward", "lora_dy_pass"):  # the fused GEMM forward, the dY pass backward
        fn = getattr(lora_triton, op)
        monkeypatch.setattr(lora_triton, op, lambda *a, _fn=fn, _op=op, **k: calls.append(_op) or _fn(*a, **k))
    peft_model, ours = make_pair("gpt2_cls", dict(r=2, target_modules=["c_attn", "c_fc"], bias="lora_only",
                                                  task_type="SEQ_CLS"), n_layer=1, n_embd=16)
    peft_model.to(DEVICE)
    ours.to(DEVICE)
    assert_parity(peft_model, ours, input_ids(batch=1, seq=5).to(DEVICE))
    assert sorted(calls) == ["lora_dy_pass", "lora_dy_pass", "lora_forward", "lora_forward"]  # both layers


def test_bf16_base_fp32_adapters_close_to_peft():
    # bf16 is what people train in: same adapter dtype policy as PEFT (fp32 adapters), bf16-level agreement.
    peft_model, ours = make_pair("gemma_lm", CASES["gemma_lm"])
    peft_model.to(torch.bfloat16)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # PEFT's autocast_adapter_dtype keeps adapters in fp32
    ours.to(torch.bfloat16)
    for module in ours.modules():
        if hasattr(module, "lora_A"):
            module.lora_A.data, module.lora_B.data = module.lora_A.data.float(), module.lora_B.data.float()
    ids = input_ids()
    with torch.no_grad():
        want, got = logits(peft_model, ids).float(), logits(ours, ids).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
