"""QLoRA: fused LoRA on bitsandbytes 4-bit (NF4/FP4, double quantization or not) and 8-bit base layers.

bitsandbytes >= 0.47 runs these layers on CPU, so everything here runs in CI: outputs and every gradient against
an fp64 reference built on bitsandbytes' own dequantized weight (the same rule as the dense tests: at most 2× the
error of PEFT's computation plus a small atol), against PEFT's QLoRA layers on the same quantized model, with the
same dropout mask, saved bytes, state-dict keys, adapters both ways, merge/unload and bad inputs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import BACKENDS, DEVICE, assert_within_torch_error, atol_for, spy
from test_saved_memory import saved_storages
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fused_lora import (  # noqa: E402
    LoRAConfig,
    LoRALinear,
    bases,  # noqa: E402
    dropout_mask,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from fused_lora import peft as flp  # noqa: E402
from fused_lora.quantized import QuantizedLoRALinear  # noqa: E402

KINDS = {
    "nf4-double": dict(bits=4, quant_type="nf4", compress_statistics=True),
    "fp4": dict(bits=4, quant_type="fp4", compress_statistics=False),
    "int8": dict(bits=8),
}


def bnb_layer(kind: str, K: int, N: int, compute_dtype=torch.float32, bias: bool = True, seed: int = 0):
    """A bitsandbytes layer quantized from a random nn.Linear (bitsandbytes quantizes on .to(device))."""
    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    spec = KINDS[kind]
    if spec["bits"] == 4:
        layer = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=spec["quant_type"],
                                  compress_statistics=spec["compress_statistics"])
    else:
        layer = bnb.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    return layer.to(DEVICE)


def fp64_reference(layer, x, lora_A, lora_B, scaling, mask, grad_out):
    """y and the gradients in fp64, on bitsandbytes' dequantized weight (the base layer's exact W)."""
    w = bases.base_of(layer)[1].dequantized().double()
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    xs, As, Bs = leaves
    bias = layer.bias.detach().double() if layer.bias is not None else None
    x_d = xs if mask is None else xs * mask.double()
    y = torch.nn.functional.linear(xs, w, bias) + (x_d @ As.t() @ Bs.t()) * scaling
    y.backward(grad_out.double())
    return {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}


def peft_like(layer, x, lora_A, lora_B, scaling, mask, grad_out):
    """PEFT's QLoRA computation (peft.tuners.lora.bnb): the layer's output, plus the LoRA branch in the adapters'
    dtype rounded to the output's, with autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
    xs, As, Bs = leaves
    result = layer(xs)
    x_a = xs.to(As.dtype)
    if mask is not None:
        x_a = x_a * mask.to(x_a.dtype)
    y = result + ((x_a @ As.t() @ Bs.t()) * scaling).to(result.dtype)
    y.backward(grad_out.to(y.dtype))
    return {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}


def check_layer(kind, compute_dtype, x_dtype, backend, p, seed=3):
    layer = bnb_layer(kind, 70, 33, compute_dtype)
    lora = LoRALinear.from_linear(layer, r=5, lora_alpha=10, lora_dropout=p, init_lora_weights=False)
    assert isinstance(lora, QuantizedLoRALinear) and lora.lora_A.dtype == torch.float32
    x = torch.randn(3, 7, 70, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x_dtype).requires_grad_()
    from fused_lora.quantized import quantized_lora

    y = quantized_lora(x, layer, lora.lora_A, lora.lora_B, lora.scaling, p, True, dropout_seed=11, backend=backend)
    assert y.dtype == x_dtype and y.shape == (3, 7, 33)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, y.dtype)
    y.backward(grad_out)
    mask = dropout_mask(11, (21, 70), p, DEVICE, backend=backend).view(3, 7, 70) if p > 0 else None
    ref = fp64_reference(layer, x, lora.lora_A, lora.lora_B, lora.scaling, mask, grad_out)
    peft_out = peft_like(layer, x, lora.lora_A, lora.lora_B, lora.scaling, mask, grad_out)
    got = {"y": y.detach(), "dx": x.grad, "dA": lora.lora_A.grad, "dB": lora.lora_B.grad}
    for name in got:
        scale = ref[name].abs().max().item()
        # The base product is bitsandbytes' own in both: the error that differs is the LoRA branch's.
        assert_within_torch_error(name, got[name], peft_out[name], ref[name], atol_for(x_dtype, scale))
    assert layer.weight.grad is None


# "torch"; the Triton backend's fused 4-bit path (W dequantized in the GEMMs' registers, bnb4_triton) and its composed
# path (bitsandbytes' own matmul, the rank-r term added in place), chosen with FUSED_LORA_GEMM.
PATHS = ["torch", "triton-fused", "triton-composed"]


@pytest.fixture
def path_calls(monkeypatch):
    """Select a path by name; returns the calls of the 4-bit GEMMs (to prove which path ran)."""
    from fused_lora.backends import bnb4_triton

    calls = spy(monkeypatch, bnb4_triton, "forward_4bit", "dx_4bit")

    def select(path: str) -> str:
        if path.startswith("triton-"):
            monkeypatch.setenv("FUSED_LORA_GEMM", path.removeprefix("triton-"))
            return "triton"
        return path

    return select, calls


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["nf4-double", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["compute-fp32", "compute-bf16"])
def test_4bit_layer_matches_reference(path, kind, compute_dtype, path_calls):
    select, calls = path_calls
    check_layer(kind, compute_dtype, compute_dtype, select(path), p=0.0)
    assert calls == (["forward_4bit", "dx_4bit"] if path == "triton-fused" else []), calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_layer_matches_reference(backend):
    check_layer("int8", torch.float32, torch.float32, backend, p=0.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_same_mask_with_dropout(path, kind, path_calls):
    select, calls = path_calls
    check_layer(kind, torch.float32, torch.float32, select(path), p=0.3)
    fused = path == "triton-fused" and kind != "int8"  # 8-bit bases always take the composed path
    assert calls == (["forward_4bit", "dx_4bit"] if fused else []), calls


def test_auto_times_the_4bit_paths_once_per_shape(path_calls, monkeypatch):
    """FUSED_LORA_GEMM=auto (the default on a GPU) times the fused 4-bit and the composed forward once per shape and
    keeps the faster; here with a timer injected as on a machine where bitsandbytes' matmul wins."""
    from fused_lora import diagnostics
    from fused_lora.backends import path_choice

    _, calls = path_calls
    monkeypatch.setattr("fused_lora.dispatch.resolve_gemm", lambda device: "auto")
    timed = []

    def timer(name, fn, device):
        timed.append(name)
        fn()
        return {"fused": 2.0, "composed": 1.0, "torch": 3.0}[name]

    diagnostics.clear()
    path_choice.set_timer(timer)
    try:
        check_layer("nf4-double", torch.float32, torch.float32, "triton", p=0.0)
        assert timed == ["fused"] * path_choice.REPEATS + ["composed"] * path_choice.REPEATS + \
            ["torch"] * path_choice.REPEATS
        (entry,) = diagnostics.path_report().values()
        assert entry["chosen"] == entry["runs"] == "composed"  # trained on the composed path
        calls.clear()
        check_layer("nf4-double", torch.float32, torch.float32, "triton", p=0.0)  # the same shape: no timing again
        assert len(timed) == 3 * path_choice.REPEATS and calls == []
    finally:
        path_choice.set_timer(None)
        diagnostics.clear()


def test_fp32_input_on_bf16_compute():
    """Linear4bit casts x to its compute dtype and the output back: the LoRA branch sees x as given (as PEFT)."""
    check_layer("nf4-double", torch.bfloat16, torch.float32, "torch", p=0.0)


def test_no_dequantized_weight_is_kept_or_saved():
    layer = bnb_layer("nf4-double", 64, 48, torch.float32)
    lora = LoRALinear.from_linear(layer, r=4, lora_dropout=0.1, init_lora_weights=False)
    assert {n for n, _ in lora.named_parameters()} == {"lora_A", "lora_B", "base_layer.weight", "base_layer.bias"}
    assert lora.weight.dtype == torch.uint8 and lora.weight is layer.weight
    x = torch.randn(40, 64, device=DEVICE, requires_grad=True)
    storages, y = saved_storages(lambda: lora(x))
    params = {t.untyped_storage().data_ptr() for t in lora.parameters()}
    activations = {ptr: n for ptr, n in storages.items() if ptr not in params}
    assert sum(activations.values()) <= x.untyped_storage().nbytes() + 40 * 4 * 4 + 8, activations
    y.sum().backward()


def test_saved_bytes_against_peft_qlora():
    """At p = 0.1 PEFT's QLoRA layer keeps x, the dropped copy and the mask; fused-lora keeps x and S."""
    layer = bnb_layer("nf4-double", 256, 256, torch.float32)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(layer)),
                                     peft.LoraConfig(target_modules=["0"], r=16, lora_dropout=0.1))
    ours = inject_lora(nn.Sequential(copy.deepcopy(layer)), LoRAConfig(target_modules=["0"], r=16, lora_dropout=0.1))
    x = torch.randn(512, 256, device=DEVICE, requires_grad=True)
    sizes = []
    for model in (peft_model, ours):
        storages, _ = saved_storages(lambda m=model: m(x))
        params = {t.untyped_storage().data_ptr() for t in model.parameters()}
        sizes.append(sum(n for ptr, n in storages.items() if ptr not in params))
    assert sizes[1] <= 0.55 * sizes[0], sizes


# --------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def gemma2_checkpoint(tmp_path_factory):
    """A tiny Gemma2 sequence classifier saved locally (no hub), to load in 4 bits."""
    # Sizes multiples of 64: bitsandbytes' CPU inference repacking (eval mode, no grad) needs K a multiple of its
    # blocksize and N of 32; the 4-bit layers (and so PEFT's QLoRA layers) crash in eval mode on CPU otherwise.
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=2,
                                    pad_token_id=0, sliding_window=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma2")
    transformers.Gemma2ForSequenceClassification(cfg).save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=torch.float32):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                             llm_int8_skip_modules=["score"])
    model = transformers.Gemma2ForSequenceClassification.from_pretrained(
        path, quantization_config=config, device_map=str(DEVICE) if DEVICE.type == "cpu" else {"": 0},
        torch_dtype=compute_dtype, attn_implementation="eager")
    return model.train()


QLORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="SEQ_CLS")
IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
LABELS = torch.tensor([0, 1, 1], device=DEVICE)


def peft_name(name: str) -> str:
    """A PEFT QLoRA model's state-dict key → ours (adapters as ``lora_A``/``lora_B``, the base layer's keys as in the
    base model, the trained head in place)."""
    name = name.replace("base_model.model.", "").replace(".modules_to_save.default", "")
    if "lora_" in name:
        return name.replace(".default", "").replace(".weight", "")
    return name.replace(".base_layer", "")


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=LABELS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def randomize_b(model):
    """Non-zero B (PEFT's init makes the branch zero) so outputs and A's gradients test something."""
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_4bit_gemma2_matches_peft_qlora(gemma2_checkpoint, compute_dtype):
    peft_model = peft.get_peft_model(load_4bit(gemma2_checkpoint, compute_dtype), peft.LoraConfig(**QLORA))
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb", type(q_proj)  # PEFT's own QLoRA layer
    randomize_b(peft_model)
    ours = inject_lora(load_4bit(gemma2_checkpoint, compute_dtype), LoRAConfig(**QLORA))
    ours.load_state_dict({peft_name(k): v for k, v in peft_model.state_dict().items() if "original_module" not in k},
                         strict=False)
    want_logits, want = loss_and_grads(peft_model)
    got_logits, got = loss_and_grads(ours)
    tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    for name, grad in want.items():
        torch.testing.assert_close(got[peft_name(name)], grad, rtol=tol * 10, atol=tol * grad.abs().max().item())


def test_4bit_state_dict_keys_and_base_checkpoint(gemma2_checkpoint):
    """The injected model's state dict is the 4-bit base model's plus the adapters, key for key, and a base 4-bit
    state dict loads into it as into the base model (which itself reports bitsandbytes' quantization-state keys as
    unexpected: bitsandbytes reads them only in from_pretrained)."""
    base = load_4bit(gemma2_checkpoint)
    base_sd = base.state_dict()
    ours = inject_lora(load_4bit(gemma2_checkpoint), LoRAConfig(**QLORA))
    sd = ours.state_dict()
    lora_keys = {k for k in sd if k.endswith(("lora_A", "lora_B"))}
    assert set(base_sd) <= set(sd) and set(sd) - set(base_sd) == lora_keys
    want = base.load_state_dict(base_sd, strict=False)
    got = ours.load_state_dict(base_sd, strict=False)
    assert set(got.missing_keys) == lora_keys and not want.missing_keys
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys)
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.weight,
                               base.model.layers[0].self_attn.q_proj.weight)


def test_4bit_adapters_both_ways_with_peft(gemma2_checkpoint, tmp_path):
    # Outputs compared in training mode (no dropout here) without grad: in eval mode on CPU bitsandbytes' own 4-bit
    # layers (PEFT's bases, and the MLPs LoRA leaves out) repack their weight for a bf16 kernel ~0.3% off
    # (tests/test_qlora_cpu_packing.py); fused-lora's layers compute the same in both modes.
    ours = inject_lora(load_4bit(gemma2_checkpoint), LoRAConfig(**QLORA))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(load_4bit(gemma2_checkpoint), tmp_path / "ours").train()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, ours(input_ids=IDS).logits)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(load_4bit(gemma2_checkpoint), tmp_path / "peft")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, QuantizedLoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits)


def test_accelerate_serves_peft_qlora_layers(gemma2_checkpoint, monkeypatch):
    peft_model = peft.get_peft_model(load_4bit(gemma2_checkpoint), peft.LoraConfig(**QLORA))
    randomize_b(peft_model)
    fast = copy.deepcopy(peft_model)
    calls = spy(monkeypatch, flp, "quantized_lora")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flp.accelerate(fast)
    assert repr(fast.base_model.model.model.layers[0].self_attn.q_proj).startswith("lora.Linear4bit(")
    want_logits, want = loss_and_grads(peft_model)
    got_logits, got = loss_and_grads(fast)
    assert len(calls) == 8  # q, k, v, o in two layers
    torch.testing.assert_close(got_logits, want_logits)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_merge_unmerge_unload_4bit(gemma2_checkpoint):
    """PEFT's semantics: merging dequantizes, adds and quantizes again (lossy, warned), bit for bit as PEFT's merge;
    the error it introduces is at most half a step of the 4-bit code per element; unload gives back the
    bitsandbytes layers."""
    peft_model = peft.get_peft_model(load_4bit(gemma2_checkpoint), peft.LoraConfig(**QLORA))
    randomize_b(peft_model)
    ours = inject_lora(load_4bit(gemma2_checkpoint), LoRAConfig(**QLORA))
    ours.load_state_dict({peft_name(k): v for k, v in peft_model.state_dict().items() if "lora_" in k}, strict=False)
    layer = ours.model.layers[0].self_attn.q_proj
    base = bases.base_of(layer.base_layer)[1]
    exact = base.dequantized().float() + layer.delta_weight()
    with pytest.warns(UserWarning, match="lossy"):
        merge_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own "may get different generations" warning
        peft_model.merge_adapter()
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(layer.weight.data, peft_layer.weight.data)
    merged = base.dequantized().float()
    code = layer.weight.quant_state.code
    half_step = (code[1:] - code[:-1]).abs().max().item() / 2
    absmax = (exact.abs().reshape(-1, layer.weight.quant_state.blocksize).amax(1, keepdim=True)
              .expand(-1, layer.weight.quant_state.blocksize).reshape(exact.shape))
    assert ((merged - exact).abs() <= half_step * absmax * 1.01 + 1e-6).all()
    assert (merged - exact).abs().max() > 0  # lossy indeed
    with pytest.warns(UserWarning, match="lossy"):
        unmerge_lora(ours)
    with pytest.warns(UserWarning, match="lossy"):
        unloaded = unload_lora(ours, merge=True)
    q_proj = unloaded.model.layers[0].self_attn.q_proj
    assert type(q_proj) is bnb.nn.Linear4bit and q_proj.weight.quant_state is not None


# ------------------------------------------------------------------------------------------ bad inputs


def test_4bit_layer_without_quant_state_is_named():
    layer = bnb.nn.Linear4bit(16, 8, quant_type="nf4")  # never moved to a device: not quantized
    with pytest.raises(ValueError, match=r"Linear4bit has no quant_state.*layer\.to"):
        LoRALinear.from_linear(layer)


class QuantLinear(nn.Module):
    """Stands for a GPTQ/AWQ-style packed layer: an integer weight bitsandbytes does not describe."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.zeros(8, 4, dtype=torch.int32))


def test_other_quantized_formats_are_named():
    with pytest.raises(TypeError, match=r"QuantLinear holds a torch.int32 weight.*GPTQ"):
        LoRALinear.from_linear(QuantLinear())
    model = nn.Sequential(type("QuantLinearInt", (nn.Linear,), {})(4, 8))
    model[0].weight = nn.Parameter(model[0].weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"'0'.*torch.int8 weight.*not supported"):
        inject_lora(model, LoRAConfig(target_modules=["0"]))


def test_quantized_head_in_modules_to_save_is_named(gemma2_checkpoint):
    """A SEQ_CLS head trains in full: a quantized one gets our error naming it and the fix, not PyTorch's "only
    Tensors of floating point dtype can require gradients"."""
    model = load_4bit(gemma2_checkpoint)
    model.score = bnb_layer("nf4-double", 64, 2, bias=False)
    with pytest.raises(TypeError, match=r"'score'.*llm_int8_skip_modules=\['score'\]"):
        inject_lora(model, LoRAConfig(**QLORA))


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism(backend):
    layer = bnb_layer("nf4-double", 40, 24, torch.float32)
    runs = []
    for _ in range(2):
        lora = LoRALinear.from_linear(copy.deepcopy(layer), r=4, lora_dropout=0.2, init_lora_weights=False)
        torch.manual_seed(0)
        lora.reset_lora_parameters(False)
        from fused_lora.quantized import quantized_lora

        x = torch.randn(9, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
        y = quantized_lora(x, lora.base_layer, lora.lora_A, lora.lora_B, lora.scaling, 0.2, True, dropout_seed=4,
                           backend=backend)
        y.square().sum().backward()
        runs.append([y.detach(), x.grad, lora.lora_A.grad, lora.lora_B.grad])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_unaligned_k_takes_the_composed_path_on_a_gpu():
    """A 4-bit layer whose in_features is not a multiple of its blocksize runs bitsandbytes' matmul on a GPU (the
    unaligned kernels' tiles spilled there: kernels/configs.py); aligned layers and CPU runs keep the choice."""
    from types import SimpleNamespace

    from fused_lora import dispatch
    from fused_lora.bases import bnb4

    layer = SimpleNamespace(weight=SimpleNamespace(quant_state=SimpleNamespace(blocksize=64)))
    base = SimpleNamespace(layer=layer, compute_dtype=torch.float32)
    gpu = lambda k: SimpleNamespace(device=torch.device("cuda"), shape=(3, k), dtype=torch.float32)  # noqa: E731
    cpu = SimpleNamespace(device=torch.device("cpu"), shape=(3, 70), dtype=torch.float32)

    def gemm(x):
        fits = bnb4.fused_fits(x, base)
        _, path, candidates = dispatch.route(dispatch.LORA, bnb4.NAME, x.device, torch.float32, "triton",
                                             fused_ok=fits)
        return path, ",".join(candidates)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fused_lora.hardware.device_capability", lambda device: (9, 0) if device.type == "cuda" else None)
        mp.setattr("fused_lora.dispatch.resolve_gemm", lambda device: "auto")
        assert gemm(gpu(70)) == ("auto", "composed,torch")  # timed, but never the fused GEMM
        assert gemm(gpu(128)) == ("auto", "fused,composed,torch")
        mp.setattr("fused_lora.dispatch.resolve_gemm", lambda device: "fused")
        assert gemm(gpu(70))[0] == "composed"
        assert gemm(gpu(128))[0] == "fused"
        assert gemm(cpu)[0] == "fused"
