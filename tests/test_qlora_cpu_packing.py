"""bitsandbytes' CPU inference repack and the 4-bit paths before and after it.

On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight in place the first time its forward
runs in eval mode on an input without grad (``quant_state.packing_format_for_cpu``): codes regrouped for its bf16
kernel, block scales rounded to bf16. Its forward is then ~0.3% off in every mode and passes no input gradient.
fused-lora keeps the layers it serves in the standard packing (``bases.bnb4.standard_4bit_packing``) and reads a
weight repacked before it saw it back without loss. Checked here: the reading, bit for bit; eval → train → eval on a
4-bit model loaded through ``from_pretrained``, on every path, each LoRA layer's y, dX, dA and dB against fp64 on
``bitsandbytes.functional.dequantize_4bit`` of its weight (the rule of helpers.py); and what PEFT's own QLoRA
layers do there. On a CPU without AVX512-BF16 bitsandbytes does not repack: the tests then repack with its own
converter (private, test-only) or ask for the repack through the layer's flag, and skip what only the real kernel
shows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_within_torch_error, atol_for, spy
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from bitsandbytes import functional as F  # noqa: E402

from fused_lora import LoRAConfig, LoRALinear, inject_lora  # noqa: E402
from fused_lora import peft as flp  # noqa: E402
from fused_lora.backends import bnb4_triton  # noqa: E402
from fused_lora.backends.bnb4_triton import in_cpu_packing  # noqa: E402
from fused_lora.bases import prepare_all as standard_4bit_packing_everywhere  # noqa: E402
from fused_lora.bases.bnb4 import standard_4bit_packing  # noqa: E402
from fused_lora.quantized import QuantizedLoRALinear  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("bitsandbytes' CPU inference packing: CPU tensors only", allow_module_level=True)

REPACKS = bool(F.has_avx512bf16())  # whether bitsandbytes' own forward repacks on this CPU
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 1])
PATHS = ["torch", "triton-fused", "triton-composed"]


def repack(layer: nn.Module) -> None:
    """Puts ``layer``'s weight in bitsandbytes' CPU inference packing the way bitsandbytes does: eval-mode inference
    without grad (or its converter, where this CPU has no AVX512-BF16 and bitsandbytes would not)."""
    if REPACKS and getattr(layer, "support_avx512bf16_for_cpu", False):
        training = layer.training
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, layer.in_features, dtype=layer.compute_dtype or torch.float32))
        layer.train(training)
    else:
        convert = getattr(F, "_convert_weight_packed_for_cpu", None)
        if convert is None:
            pytest.skip("this bitsandbytes has no CPU inference packing")
        layer.weight.data, layer.weight.quant_state = convert(layer.weight.data, layer.weight.quant_state)
    assert in_cpu_packing(layer.weight)


def scales(state) -> torch.Tensor:
    """A standard quant state's block scales in fp32 (double quantization undone, as dequantize_4bit does)."""
    if state.nested:
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def with_bf16_scales(data: torch.Tensor, state) -> torch.Tensor:
    """W of a standard-packed weight with its block scales rounded to bf16: what the CPU packing keeps of it."""
    rounded = F.QuantState(absmax=scales(state).bfloat16().float(), shape=state.shape, code=state.code,
                           blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    return F.dequantize_4bit(data, rounded)


# ------------------------------------------------------------------------------------------ reading the packing


@pytest.mark.parametrize("quant_type, nested, storage", [("nf4", True, torch.uint8), ("nf4", False, torch.uint8),
                                                         ("fp4", False, torch.uint8), ("nf4", True, torch.bfloat16)],
                         ids=["nf4-double", "nf4", "fp4", "nf4-double-bf16-storage"])
def test_cpu_packing_is_read_without_loss(quant_type, nested, storage):
    """The repacked weight read back: the same codes bit for bit, the scales the repack kept (bf16), exactly; the
    layer in the standard packing again, its forward exact and no longer repacking."""
    torch.manual_seed(0)
    dense = nn.Linear(192, 96)
    layer = bnb.nn.Linear4bit(192, 96, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested, quant_storage=storage)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    data0, state0 = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
    w1 = with_bf16_scales(data0, state0)
    assert (w1 != F.dequantize_4bit(data0, state0)).any()  # the repack is lossy: what is kept is W1
    repack(layer)

    packed = bnb4_triton.Packed4bit.from_params(layer.weight)  # read without touching the weight
    assert in_cpu_packing(layer.weight) and not packed.nested
    assert torch.equal(packed.data, data0.reshape(-1).view(torch.uint8))
    assert torch.equal(bnb4_triton.dequantize_ref(packed), w1)
    assert torch.equal(bnb4_triton.dequantize(packed), w1)

    weight = standard_4bit_packing(layer)
    assert weight is layer.weight and not in_cpu_packing(weight) and not layer.support_avx512bf16_for_cpu
    assert weight.data.dtype == storage and weight.data.shape == data0.shape
    assert torch.equal(weight.data.view(torch.uint8), data0.view(torch.uint8))  # bytes: a bf16 storage holds NaNs
    assert weight.quant_state.dtype == state0.dtype
    assert torch.equal(F.dequantize_4bit(weight.data, weight.quant_state), w1)
    x = torch.randn(5, 192)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert not in_cpu_packing(layer.weight)  # the flag is off: eval-mode inference no longer repacks
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w1, layer.bias), rtol=1e-6, atol=1e-6)


def test_unknown_packing_is_refused():
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4").to("cpu")
    repack(layer)
    layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.t()  # a layout this code does not know
    with pytest.raises(ValueError, match="CPU inference packing fused_lora does not know"):
        standard_4bit_packing(layer)


def test_wrapping_turns_the_repack_off():
    """A wrapped layer's own forward (adapter disabled, eval mode, no grad) keeps the standard packing too."""
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4").to("cpu")
    layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    lora = LoRALinear.from_linear(layer, r=4).eval()
    assert not layer.support_avx512bf16_for_cpu
    with torch.no_grad(), lora.disable_adapter():
        lora(torch.randn(3, 128))
    assert not in_cpu_packing(layer.weight)


# ------------------------------------------------------------------------------------------ a 4-bit model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Gemma2 classifier saved locally (no hub), to load in 4 bits. N of every projection a multiple of 32 and
    K of 64: the CPU packing's own requirements."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=2,
                                    pad_token_id=0, sliding_window=4)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma2-cpu-packing")
    transformers.Gemma2ForSequenceClassification(cfg).save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=torch.float32, double_quant=True):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["score"])
    model = transformers.Gemma2ForSequenceClassification.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=compute_dtype, attn_implementation="eager")
    if not REPACKS:  # ask for the repack as a CPU with AVX512-BF16 would (what fused-lora must turn off)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    return model.train()


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def randomize_b(model):
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)


def evaluate(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_step(model):
    """Loss and backward on inputs_embeds that require grad, so every layer's dX is a gradient (the first layers'
    included). Returns (logits, the gradient at the input embeddings, every trainable parameter's gradient)."""
    model.train()
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=LABELS)
    out.loss.backward()
    return out.logits.detach(), embeds.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def record_calls(model):
    """Each LoRA layer's last call: its x and y (forward hook), dY and dX (full backward hook)."""
    records = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLoRALinear):
            rec = records[name] = {}
            module.register_forward_hook(lambda m, args, out, rec=rec: rec.update(x=args[0].detach(), y=out.detach()))
            module.register_full_backward_hook(lambda m, gin, gout, rec=rec: rec.update(dx=gin[0], dy=gout[0]))
    return records


def layer_reference(module, x, dy, exact: bool) -> dict:
    """y = base(x) + scaling · x Aᵀ Bᵀ with W = dequantize_4bit(weight) and its gradients: in fp64 (``exact``), or
    the same computation in the layer's dtypes (bitsandbytes' casts: x and the base product in the compute dtype, the
    LoRA branch in the adapters' dtype rounded to y's)."""
    weight = module.weight
    w = F.dequantize_4bit(weight.data, weight.quant_state)
    compute = torch.float64 if exact else (module.base_layer.compute_dtype or torch.float32)
    def leaf(t):
        return (t.detach().double() if exact else t.detach().clone()).requires_grad_()

    xs, a, b = leaf(x), leaf(module.lora_A), leaf(module.lora_B)
    bias = module.bias.detach().to(compute) if module.bias is not None else None
    base = torch.nn.functional.linear(xs.to(compute), w.to(compute), bias).to(xs.dtype)
    y = base + ((xs.to(a.dtype) @ a.t() @ b.t()) * module.scaling).to(base.dtype)
    out = {"y": y.detach()}
    if dy is not None:
        y.backward(dy.to(y.dtype))
        out.update(dx=xs.grad, dA=a.grad, dB=b.grad)
    return out


def check_layers(model, records, label, grads: bool):
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLoRALinear):
            continue
        rec = records[name]
        assert not in_cpu_packing(module.weight), f"{label} {name}: left in the CPU packing"
        got = {"y": rec["y"]}
        if grads:
            got.update(dx=rec["dx"], dA=module.lora_A.grad, dB=module.lora_B.grad)
        ref = layer_reference(module, rec["x"], rec["dy"] if grads else None, exact=True)
        same = layer_reference(module, rec["x"], rec["dy"] if grads else None, exact=False)
        for key, value in got.items():
            assert value is not None, f"{label} {name}: no {key}"
            assert_within_torch_error(f"{label} {name} {key}", value, same[key], ref[key],
                                      atol_for(value.dtype, ref[key].abs().max().item()))


@pytest.fixture
def select_path(monkeypatch):
    """Selects a path by name; returns the list the fused 4-bit GEMMs append their names to."""
    calls = spy(monkeypatch, bnb4_triton, "forward_4bit", "dx_4bit")

    def select(path):
        if path.startswith("triton-"):
            monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
            monkeypatch.setenv("FUSED_LORA_GEMM", path.removeprefix("triton-"))
        else:
            monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
        return calls

    return select


def injected(path, compute_dtype=torch.float32, double_quant=True, evaluated_before=False):
    model = load_4bit(path, compute_dtype, double_quant)
    if evaluated_before:  # bitsandbytes' own eval-mode inference before fused-lora sees the model
        for layer in four_bit_layers(model):
            repack(layer)
    torch.manual_seed(3)  # lora_A's initialization
    model = inject_lora(model, LoRAConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, task_type="SEQ_CLS"))
    randomize_b(model)
    return model


def eval_train_eval(model, label):
    """eval → train → eval, each LoRA layer checked against fp64 after each step; the two evaluations identical."""
    records = record_calls(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered")
        first = evaluate(model)
        check_layers(model, records, f"{label} eval 1", grads=False)
        step = train_step(model)
        check_layers(model, records, f"{label} train", grads=True)
        second = evaluate(model)
        check_layers(model, records, f"{label} eval 2", grads=False)
    assert torch.equal(first, second)
    assert not any(in_cpu_packing(m.weight) for m in four_bit_layers(model))
    return step


@pytest.mark.parametrize("path", PATHS)
def test_eval_train_eval_on_every_path(checkpoint, path, select_path):
    """Evaluation changes nothing: each layer exact against fp64 in every step, and the training step's logits and
    gradients (the input embeddings' included) bit for bit those of a model that was never evaluated."""
    calls = select_path(path)
    model = injected(checkpoint)
    step = eval_train_eval(model, path)
    if path == "triton-fused":
        assert "forward_4bit" in calls and "dx_4bit" in calls
    else:
        assert not calls
    fresh = train_step(injected(checkpoint))
    assert torch.equal(step[0], fresh[0]) and torch.equal(step[1], fresh[1])
    assert step[2].keys() == fresh[2].keys() and all(torch.equal(step[2][k], fresh[2][k]) for k in step[2])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_weights_repacked_before_injection_are_read_without_loss(checkpoint, path, double_quant, select_path):
    """A model evaluated by bitsandbytes before fused-lora wraps it: every path computes with what the repacked weight
    holds (W with its block scales rounded to bf16, read back bit for bit), exactly, in every step."""
    select_path(path)
    model = injected(checkpoint, double_quant=double_quant, evaluated_before=True)
    fresh = load_4bit(checkpoint, double_quant=double_quant)
    fresh_layers = dict(fresh.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLoRALinear):
            weight, before = module.weight, fresh_layers[name.removeprefix("base_model.")].weight
            got = F.dequantize_4bit(weight.data, weight.quant_state)  # reads the standard packing here
            assert torch.equal(got, with_bf16_scales(before.data, before.quant_state)), name
    eval_train_eval(model, path)


def test_eval_train_eval_in_bf16(checkpoint):
    model = injected(checkpoint, compute_dtype=torch.bfloat16)
    eval_train_eval(model, "torch bf16")


def test_other_4bit_layers_of_the_model(checkpoint):
    """The 4-bit layers LoRA leaves out (here the MLPs) pass the gradient to the layers below them only if they were
    not repacked: ``standard_4bit_packing_everywhere`` keeps them in the standard packing too."""
    def attention_only():
        torch.manual_seed(3)
        model = inject_lora(load_4bit(checkpoint), LoRAConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS[:4],
                                                              task_type="SEQ_CLS"))
        randomize_b(model)
        assert standard_4bit_packing_everywhere(model) == 14
        return model

    model = attention_only()
    evaluate(model)
    step, fresh = train_step(model), train_step(attention_only())
    assert torch.equal(step[1], fresh[1]) and all(torch.equal(step[2][k], fresh[2][k]) for k in step[2])


def test_inject_lora_keeps_the_other_4bit_layers_standard(checkpoint):
    model = inject_lora(load_4bit(checkpoint), LoRAConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS[:4],
                                                          task_type="SEQ_CLS"))
    evaluate(model)
    assert not any(in_cpu_packing(m.weight) for m in four_bit_layers(model))


# ------------------------------------------------------------------------------------------ PEFT there


def peft_model(checkpoint):
    model = peft.get_peft_model(load_4bit(checkpoint), peft.LoraConfig(r=8, lora_alpha=16,
                                                                       target_modules=PROJECTIONS,
                                                                       task_type="SEQ_CLS"))
    randomize_b(model)
    return model


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.skipif(not REPACKS, reason="bitsandbytes repacks (and runs its gemv kernel) only with AVX512-BF16")
def test_peft_qlora_loses_the_input_gradient_after_an_evaluation(checkpoint):
    """What README's QLoRA section says: after one evaluation PEFT's QLoRA layers run bitsandbytes' repacked kernel,
    which passes no input gradient (measured: the gradient at the input embeddings 82% off, LoRA gradients 67% off
    in the median, up to 96%); the same PEFT model under ``fused_lora.peft.accelerate`` is unaffected."""
    model = peft_model(checkpoint)
    fresh = copy.deepcopy(model)
    evaluate(model)
    assert all(in_cpu_packing(m.weight) for m in four_bit_layers(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "an autograd kernel was not registered" (once per process)
        _, embeds_grad, grads = train_step(model)
    _, want_embeds, want = train_step(fresh)
    assert relative(embeds_grad, want_embeds) > 0.3
    assert max(relative(grads[k], want[k]) for k in want) > 0.5

    accelerated = flp.accelerate(copy.deepcopy(fresh))
    fresh_accelerated = flp.accelerate(copy.deepcopy(fresh))
    evaluate(accelerated)
    step, want = train_step(accelerated), train_step(fresh_accelerated)
    assert torch.equal(step[1], want[1]) and all(torch.equal(step[2][k], want[2][k]) for k in want[2])


def test_accelerate_keeps_the_other_4bit_layers_standard(checkpoint):
    """fused_lora.peft.accelerate (and so enable()) keeps the 4-bit layers PEFT left out of target_modules in the
    standard packing too: an evaluation does not cut their gradient."""
    import peft

    from fused_lora import peft as flp

    model = peft.get_peft_model(load_4bit(checkpoint), peft.LoraConfig(r=8, lora_alpha=16,
                                                                       target_modules=PROJECTIONS[:4],
                                                                       task_type="SEQ_CLS"))
    flp.accelerate(model)
    evaluate(model)
    assert not any(in_cpu_packing(m.weight) for m in four_bit_layers(model))
