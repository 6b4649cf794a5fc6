"""Tiny transformers models built from configs (random weights, no downloads) and PEFT ↔ fused_lora helpers
shared by the injector, adapter and parity tests."""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

PEFT_PREFIX = "base_model.model."
VOCAB = 64


def gpt2_config(**overrides) -> transformers.GPT2Config:
    kw = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2Config(**{**kw, **overrides})


def _gemma_kw(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0)
    return {**kw, **overrides}


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny model by name, in train mode (all model dropouts are 0, so outputs are deterministic)."""
    torch.manual_seed(seed)
    if name == "gpt2_lm":
        model = transformers.GPT2LMHeadModel(gpt2_config(**overrides))
    elif name == "gpt2_cls":
        model = transformers.GPT2ForSequenceClassification(gpt2_config(num_labels=2, **overrides))
    elif name == "gemma_lm":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**_gemma_kw(**overrides)))
    elif name == "gemma2_cls":
        cfg = transformers.Gemma2Config(**_gemma_kw(num_labels=3, sliding_window=4, **overrides))
        cfg._attn_implementation = "eager"  # Gemma2's softcapping is only exact in eager attention
        model = transformers.Gemma2ForSequenceClassification(cfg)
    elif name == "gemma3_lm":
        cfg = transformers.Gemma3TextConfig(**_gemma_kw(sliding_window=4, **overrides))
        cfg._attn_implementation = "eager"
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise KeyError(name)
    return model.train()


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    # No pad token (0): sequence classification pools the last non-pad token.
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def peft_name_to_ours(name: str) -> str:
    """A PeftModel parameter name → the same parameter's name in a fused_lora-injected model."""
    name = name.removeprefix(PEFT_PREFIX)
    for infix, repl in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                        (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"),
                        (".base_layer.", "."), (".modules_to_save.default.", ".")):
        name = name.replace(infix, repl)
    return name


def copy_peft_trainables(peft_model: nn.Module, ours: nn.Module) -> None:
    """Give our model PEFT's trainable values (A, B, biases, modules_to_save), after checking both models train
    exactly the same set of parameters."""
    peft_trainable = {peft_name_to_ours(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(peft_trainable) == set(ours_trainable), (
        f"trainable sets differ: only PEFT {sorted(set(peft_trainable) - set(ours_trainable))[:5]}, "
        f"only ours {sorted(set(ours_trainable) - set(peft_trainable))[:5]}")
    with torch.no_grad():
        for n, p in ours_trainable.items():
            p.copy_(peft_trainable[n])


def make_pair(name: str, peft_kwargs: dict, **build_kwargs) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, our model) from the same base weights, with the same random A and B (B ≠ 0)."""
    from peft import LoraConfig, get_peft_model

    from fused_lora import LoRAConfig, inject_lora

    base = build(name, **build_kwargs)
    torch.manual_seed(123)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **peft_kwargs))
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(init_lora_weights=False, **peft_kwargs))
    copy_peft_trainables(peft_model, ours)
    return peft_model, ours


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``max|got - want| <= rtol · max|want| + atol``. Relative to the tensor's scale rather than elementwise:
    gradients hold near-cancelling entries whose elementwise relative error says nothing about correctness."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    bound = rtol * (want.double().abs().max().item() if want.numel() else 0.0) + atol
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} (rtol {rtol:g} of max |want|, atol {atol:g})"


def state_of(model):
    """Everything about a model that a failed call must leave as it was."""
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model, before):
    after = state_of(model)
    assert after[2] == before[2], "module types changed"
    assert after[1] == before[1], "requires_grad flags changed"
    assert after[0].keys() == before[0].keys()
    for k in before[0]:
        assert torch.equal(after[0][k], before[0][k]), k


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every trainable parameter's gradient of a mean-square loss (each gradient must exist)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out.float().square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    return out.detach(), grads


def accelerated_copy(model: nn.Module) -> nn.Module:
    """``fused_lora.peft.accelerate`` on a deep copy of a PEFT model, with any warning an error: a model it fully
    serves takes no fallback."""
    import warnings

    import fused_lora.peft as flp

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return flp.accelerate(copy.deepcopy(model))
