"""DoRA at the functional level: ``fused_lora_linear(..., magnitude=m)`` on both backends (the Triton DoRA
kernels through the interpreter on CPU), output and every gradient (x, A, B, magnitude, bias) against an fp64
reference of PEFT's semantics (``dora_ref``) with the flash-attention rule, and against PEFT's own DoRA layer.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKENDS,
    CUDA,
    DEVICE,
    assert_within_torch_error,
    atol_for,
    leaf64,
    leaf_like,
    reversed_program_order,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_lora import dora_ref, dropout_mask, fused_lora_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def make_problem(lead, K, N, r, dtype, layout, bias, adapter_dtype=None, magnitude_dtype=None, seed=0):
    """x, W (layout), b, A, B and a magnitude away from ‖W + s·B A‖ (so g ≠ 1 and every term of DoRA counts)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, dt=dtype, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dt)  # noqa: E731
    adapter_dtype = adapter_dtype or dtype
    x = rnd(*lead, K).requires_grad_()
    weight = rnd(N, K, scale=K**-0.5) if layout == "linear" else rnd(K, N, scale=K**-0.5)
    b = rnd(N).requires_grad_() if bias else None
    lora_A = rnd(r, K, dt=adapter_dtype, scale=K**-0.5).requires_grad_()
    lora_B = rnd(N, r, dt=adapter_dtype, scale=r**-0.5).requires_grad_()
    m = (0.5 + torch.rand(N, generator=gen)).to(DEVICE, magnitude_dtype or adapter_dtype).requires_grad_()
    return x, weight, b, lora_A, lora_B, m


def reference_pair(problem, scaling, layout, mask, grad_out):
    """(fp64 reference, same-dtype reference following PEFT's dtype rules): output and gradients by name."""
    results = []
    for make, upcast in ((leaf64, torch.float64), (leaf_like, None)):
        t = dict(zip(NAMES, (make(v) for v in problem), strict=True))
        t["weight"].requires_grad_(False)
        y = dora_ref(*t.values(), scaling, weight_layout=layout, dropout_mask=mask, upcast=upcast)
        y.backward(grad_out.to(y.dtype))
        results.append({"y": y.detach(), **{n: v.grad for n, v in t.items() if v is not None and n != "weight"}})
    return results


def grads_of(y, problem) -> dict:
    return {"y": y.detach(), **{n: v.grad for n, v in zip(NAMES, problem, strict=True)
                                if v is not None and n != "weight"}}


def assert_matches(got: dict, ref: dict, same: dict) -> None:
    for name, value in got.items():
        if ref.get(name) is None:
            assert value is None, f"{name} should not have a gradient"
            continue
        assert value is not None, f"{name} is missing"
        assert value.dtype == same[name].dtype, f"{name}: dtype {value.dtype} != {same[name].dtype}"
        scale = ref[name].abs().max().item() if ref[name].numel() else 1.0
        assert_within_torch_error(name, value, same[name], ref[name], atol_for(value.dtype, scale))


def run(problem, scaling, p, layout, backend, seed=1234, training=True):
    x, weight, bias, lora_A, lora_B, m = problem
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, training, weight_layout=layout,
                          dropout_seed=seed, backend=backend, magnitude=m)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], lora_B.shape[0])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(grad_out)
    assert weight.grad is None
    return y, grad_out


def the_mask(x, p, seed, backend):
    if p == 0:
        return None
    return dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, x.device, backend=backend).view(x.shape)


def run_and_check(problem, scaling, p, layout, backend, seed=1234):
    y, grad_out = run(problem, scaling, p, layout, backend, seed)
    ref, same = reference_pair(problem, scaling, layout, the_mask(problem[0], p, seed, backend), grad_out)
    assert_matches(grads_of(y, problem), ref, same)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_fp64_reference(backend, dtype, layout, p):
    # Odd sizes (no tile multiple): 39 tokens, 70 → 52, r = 6; 3-D input; bias on for half the cases.
    bias = (layout == "conv1d") != (p > 0)
    problem = make_problem((3, 13), 70, 52, 6, dtype, layout, bias)
    run_and_check(problem, 1.5, p, layout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_on_half_base(backend, dtype, p):
    """LoRALinear's and PEFT's default: fp32 A, B and magnitude on a half base."""
    problem = make_problem((2, 19), 64, 40, 8, dtype, "conv1d", True, adapter_dtype=torch.float32)
    run_and_check(problem, 0.5, p, "conv1d", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("r", "adapter_dtype", "magnitude_dtype"), [
    (1, torch.float32, None), (40, torch.bfloat16, torch.float32), (80, torch.bfloat16, None),
    (33, torch.float32, None)])
def test_ranks_and_magnitude_dtype(backend, r, adapter_dtype, magnitude_dtype):
    # r = 80 with half adapters spans two 64-rank chunks, r = 33 with fp32 ones three 16-rank chunks (every kernel's
    # rank loop or rank grid); an fp32 magnitude beside bf16 adapters.
    dtype = torch.bfloat16 if adapter_dtype == torch.bfloat16 else torch.float32
    problem = make_problem((37,), 45, 33, r, dtype, "linear", True, adapter_dtype, magnitude_dtype)
    run_and_check(problem, 16 / r, 0.1, "linear", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_non_contiguous_input_and_weight(backend, layout):
    x, weight, bias, lora_A, lora_B, m = make_problem((40,), 70, 52, 6, torch.float32, layout, True)
    wide = torch.randn(80, 140).to(DEVICE)
    x = wide[::2, 10:80].requires_grad_()
    weight = weight.t().contiguous().t()  # the other stride order, read in place
    run_and_check((x, weight, bias, lora_A, lora_B, m), 1.5, 0.25, layout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_without_grad_frozen_bias_and_magnitude(backend):
    problem = make_problem((21,), 34, 18, 5, torch.float32, "linear", True)
    for t in (problem[0], problem[2], problem[5]):
        t.requires_grad_(False)
    run_and_check(problem, 1.0, 0.1, "linear", backend)
    assert problem[0].grad is None and problem[2].grad is None and problem[5].grad is None


class _Allocations(TorchDispatchMode):
    """The shapes of the tensors that the ops run inside create: outputs of ops that neither write in place nor return
    a view (factory functions, out-of-place results)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and not any(r.alias_info for r in func._schema.returns):
            self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_frozen_magnitude_forms_no_p(backend, p):
    """P = x_d Wᵀ + s·S Bᵀ (M×N) serves only the magnitude's gradient: with the magnitude frozen the forward neither
    allocates nor writes it. The only M×N buffer the Triton forward makes is then y (before: y and P); the PyTorch
    path makes only y at p = 0 (before: y and P) and with dropout also x_d Wᵀ, PEFT's base_result, which y needs.
    Output and gradients are a trainable magnitude's, bit for bit; the magnitude gets none."""
    M, K, N = 37, 45, 29  # M×N is no other tensor's size
    problem = make_problem((M,), K, N, 5, torch.float32, "linear", True)

    def call(train_magnitude: bool):
        x, weight, bias, lora_A, lora_B, m = (t.detach().clone().requires_grad_(t.requires_grad) for t in problem)
        m.requires_grad_(train_magnitude)
        with _Allocations() as made:
            y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.5, p, dropout_seed=77, backend=backend,
                                  magnitude=m)
        y.backward(torch.ones_like(y))
        results = [y.detach(), x.grad, bias.grad, lora_A.grad, lora_B.grad]
        return [t for t in made.shapes if t == (M, N)], results, m.grad

    trained_mn, trained, dmag = call(True)
    frozen_mn, frozen, no_dmag = call(False)
    assert dmag is not None and no_dmag is None
    assert len(trained_mn) == 2
    assert len(frozen_mn) == (2 if backend == "torch" and p > 0 else 1), frozen_mn
    for a, b in zip(frozen, trained, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    x, weight, bias, lora_A, lora_B, m = make_problem((2, 0), 30, 20, 4, torch.float32, "linear", True)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.1, backend=backend, magnitude=m)
    assert y.shape == (2, 0, 20)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (lora_A, lora_B, bias, m):
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_and_p_one(backend):
    """Outside training x_d = x (PEFT's base_result path); p = 1 drops every input of the branch (PEFT's
    nn.Dropout(p=1)): the output is the base layer's and the adapters and magnitude get zero gradients."""
    problem = make_problem((29,), 40, 24, 4, torch.float32, "linear", True)
    y_eval, _ = run(problem, 2.0, 0.5, "linear", backend, training=False)
    ref, same = reference_pair(problem, 2.0, "linear", None, torch.randn(y_eval.shape,
                               generator=torch.Generator().manual_seed(7)).to(DEVICE))
    assert_matches(grads_of(y_eval, problem), ref, same)
    for t in problem:
        if t is not None:
            t.grad = None
    x, weight, bias, lora_A, lora_B, m = problem
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 1.0, backend=backend, magnitude=m)
    torch.testing.assert_close(y, nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in (lora_A, lora_B, m))
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_deterministic(backend, p):
    """Same inputs and seed: bitwise-identical output and gradients (CPU; the GPU's atomics are not); another
    seed: another mask."""
    outs = []
    for seed in (5, 5, 6):
        problem = make_problem((31,), 40, 36, 4, torch.float32, "linear", True)
        y, _ = run(problem, 1.0, p, "linear", backend, seed=seed)
        outs.append([y.detach()] + [t.grad for t in problem if t is not None and t.grad is not None])
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][0], outs[2][0]) == (p == 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the interpreter's inf/NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_rows(backend):
    """A zero-norm row (W and B rows zero: g = m/0), a zero magnitude, NaN and Inf in x: non-finite values land exactly
    where the fp64 reference has them (PEFT's semantics: 0·inf is NaN there too), the finite ones match it. Inf or NaN
    may differ where both are non-finite: PEFT forms y = base(x) + (g − 1)·(base(x) − b) + …, so an infinite input gives
    inf − inf = NaN there, where g ⊙ P gives ±inf."""
    x, weight, bias, lora_A, lora_B, m = make_problem((23,), 40, 24, 4, torch.float32, "linear", True)
    with torch.no_grad():
        weight[3] = 0.0
        lora_B[3] = 0.0
        m[5] = 0.0
        x[7, 2] = float("nan")
        x[11, 9] = float("inf")
    for p in (0.0, 0.2):
        problem = tuple(t.detach().clone().requires_grad_(t.requires_grad)
                        for t in (x, weight, bias, lora_A, lora_B, m))
        y, grad_out = run(problem, 1.0, p, "linear", backend)
        ref, _ = reference_pair(problem, 1.0, "linear", the_mask(problem[0], p, 1234, backend), grad_out)
        for name, value in grads_of(y, problem).items():
            if name == "bias":  # Σ dY: the bias enters y once. PEFT's (base(x) − b) path makes it inf − inf = NaN in a
                torch.testing.assert_close(value, grad_out.sum(0))  # zero-norm column (g = inf)
                continue
            want = ref[name]
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(value), finite), (p, name, "non-finite pattern")
            assert finite.any() or name != "y", (p, name)
            torch.testing.assert_close(value[finite].double(), want[finite], rtol=1e-4, atol=1e-5)
        assert torch.isnan(y[:, 3]).all()  # g = m/0 times P = 0 (the zero row)
        assert not torch.isfinite(y[11]).all() and torch.isfinite(y[:7, 4:]).all()


def test_norm_split_is_bitwise_repeatable():
    """DoRA's row norm split over K, as a GPU launch splits it when the row tiles alone leave SMs idle (split_k ≈ 5 at
    4096² on an H100): the same bits run after run and whatever order the programs run in (on the interpreter: its own
    order, then reversed), so a checkpointed recompute of the forward gets the forward's norm; and within fp32 rounding
    of the unsplit norm and of the fp64 one. The slices' partial sums used to meet in fp32 atomics: the reversed order
    then changed 40 of the 100 (by up to 1.7·2⁻²³ relative)."""
    from fused_lora.backends import dora_triton

    gen = torch.Generator().manual_seed(3)
    K, N, r = 330, 100, 20  # 11 K tiles of the interpreter's 32 over 5 slices (3, 2, 2, 2, 2 tiles)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    weight, lora_A, lora_B = rnd(N, K), rnd(r, K), rnd(N, r)
    norm = lambda split: dora_triton.dora_norm(weight, lora_A, lora_B, 0.5, "linear", split_k=split)  # noqa: E731
    one, split = norm(1), norm(5)
    assert torch.equal(norm(5), split)
    if not CUDA:
        with reversed_program_order():
            assert torch.equal(norm(5), split)
    want = (weight.double() + 0.5 * lora_B.double() @ lora_A.double()).norm(dim=1)
    torch.testing.assert_close(split, one, rtol=4e-7, atol=0)
    torch.testing.assert_close(split.double(), want, rtol=4e-7, atol=0)


def test_split_reductions_match_single_pass():
    """The atomics path a GPU launch picks to fill its SMs: the dY pass over N slices."""
    from fused_lora.backends import dora_triton

    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 70, 66, 100, 20
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    weight, lora_A, lora_B = rnd(N, K), rnd(r, K), rnd(N, r)
    one = dora_triton.dora_norm(weight, lora_A, lora_B, 0.5, "linear", split_k=1)
    dy, s, P, m = rnd(M, N), rnd(M, r), rnd(M, N), rnd(N).abs()
    single = dora_triton.dora_dy_pass(dy, lora_B, s, P, one, m, 0.5, True, True, True, True, True, True, split_n=1)
    split = dora_triton.dora_dy_pass(dy, lora_B, s, P, one, m, 0.5, True, True, True, True, True, True, split_n=3)
    for a, b in zip(single, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = m / one
    torch.testing.assert_close(single[0], 0.5 * (dy * g) @ lora_B, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single[3], (dy * P).sum(0) / one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single[4], dy * (g - 1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- the norm: PEFT's, bit for bit
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)], ids=str)
def test_pytorch_norm_is_peft_bit_for_bit(layout, dtype, adapter_dtype):
    """The PyTorch path's ‖W + s·B A‖ (``dora_torch.weight_norm``, what it saves and divides by) is the norm PEFT's DoRA
    forward computes (``DoraLinearLayer.get_lora_weight`` / ``get_weight_norm`` in the adapters' dtype), bit for bit,
    with B ≠ 0, both weight layouts. It was √(Σ v²) in fp32: 318 of 1000 rows of an nn.Linear(1000, 1000) differed
    from torch.linalg.norm's."""
    peft = pytest.importorskip("peft")
    from peft.utils.integrations import dequantize_module_weight
    from transformers.pytorch_utils import Conv1D

    from fused_lora.backends import dora_torch

    torch.manual_seed(0)
    base = (nn.Linear(300, 200) if layout == "linear" else Conv1D(200, 300)).to(dtype)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["0"], use_dora=True, init_lora_weights=False,
        fan_in_fan_out=layout == "conv1d")).to(adapter_dtype).to(DEVICE)
    layer = model.base_model.model[0]
    base = layer.get_base_layer().to(dtype)
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    dora = layer.lora_magnitude_vector["default"]
    with torch.no_grad():  # as DoraLinearLayer.forward, x in the adapters' dtype
        lora_weight = dora.get_lora_weight(lora_A=lora_A, lora_B=lora_B).to(adapter_dtype)
        weight = dequantize_module_weight(base).to(adapter_dtype)
        want = dora.get_weight_norm(weight, lora_weight, layer.scaling["default"])
        got = dora_torch.weight_norm(base.weight, lora_A.weight, lora_B.weight, layer.scaling["default"], layout)
    assert lora_B.weight.abs().max() > 0
    assert got.dtype == torch.float32 and want.dtype == adapter_dtype
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_pytorch_path_at_init_is_the_base_layer(layout, dtype, p):
    """At init (B = 0, the magnitude ‖W‖ as PEFT and ``LoRALinear`` initialise it, adapters in the weight's dtype) the
    PyTorch path's g is exactly 1 and its output is the base layer's, bit for bit, with and without dropout, as PEFT's
    DoRA is (y = base(x) + (g − 1)·base_result + g·lora·s there). Before, g was 1 ± 1 ulp on some rows (√(Σ v²) against
    PEFT's torch.linalg.norm) and y = g ⊙ (x Wᵀ) + b added the bias after the product: 2.4e-7 off nn.Linear's output
    (x Wᵀ + b by one addmm) on PEFT's own test."""
    from fused_lora import bases
    from fused_lora.autograd.driver import call_record
    from fused_lora.backends import dora_torch
    from fused_lora.call import Operands
    from fused_lora.reference import dora_weight_norm

    x, weight, bias, lora_A, lora_B, _ = make_problem((29,), 64, 48, 4, dtype, layout, True)
    with torch.no_grad():
        lora_B.zero_()
    magnitude = dora_weight_norm(weight, lora_A, lora_B, 2.0, layout)
    norm = dora_torch.weight_norm(weight, lora_A, lora_B, 2.0, layout)
    assert torch.equal(magnitude.float() / norm, torch.ones_like(norm))
    t = Operands(x.detach(), weight, bias.detach(), lora_A.detach(), lora_B.detach(), magnitude)
    y, *_ = dora_torch.forward(t, call_record("dora", bases.get("dense"), layout, 2.0, p, "torch", "torch", ("torch",)),
                               1234)
    base = torch.nn.functional.linear(x.detach(), weight if layout == "linear" else weight.t(), bias.detach())
    assert torch.equal(y, base)


# ------------------------------------------------------------------------------------------ against PEFT's layer
class FixedMask(nn.Module):
    """Stands in for PEFT's nn.Dropout with a given scaled mask: PEFT's DoRA then takes its dropout branch (x_d Wᵀ
    computed again), with the mask our backend drew."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_peft_dora_layer(backend, layout, p):
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    K, N, r, M = 48, 40, 4, 26
    torch.manual_seed(0)
    base = nn.Linear(K, N) if layout == "linear" else Conv1D(N, K)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=r, lora_alpha=8, lora_dropout=p, target_modules=["0"], use_dora=True, init_lora_weights=False,
        fan_in_fan_out=layout == "conv1d")).to(DEVICE)
    layer = model.base_model.model[0]
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        magnitude.mul_(0.5 + torch.rand(N, device=DEVICE))  # g ≠ 1
    base = layer.get_base_layer()
    base.bias.requires_grad_(True)
    x = torch.randn(2, M // 2, K, device=DEVICE, requires_grad=True)
    seed = 77
    if p > 0:
        layer.lora_dropout["default"] = FixedMask(the_mask(x, p, seed, backend))
    grad_out = torch.randn(2, M // 2, N, device=DEVICE)
    params = [x, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude]
    y_peft = model(x)
    want = [y_peft.detach(), *torch.autograd.grad(y_peft, params, grad_out)]
    y = fused_lora_linear(x, base.weight, base.bias, params[2], params[3], layer.scaling["default"], p,
                          weight_layout=layout, dropout_seed=seed, backend=backend, magnitude=magnitude)
    got = [y.detach(), *torch.autograd.grad(y, params, grad_out)]
    for name, a, b in zip(("y", "x", "bias", "A", "B", "magnitude"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_bad_magnitude_is_refused():
    x, weight, bias, lora_A, lora_B, m = make_problem((4,), 8, 6, 2, torch.float32, "linear", True)
    with pytest.raises(ValueError, match=r"magnitude has shape \(5,\).*\(6,\)"):
        fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, magnitude=m[:5])
    with pytest.raises(TypeError, match="magnitude is torch.float16"):
        fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, magnitude=m.half())
    with pytest.raises(TypeError, match="must be a tensor"):
        fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, magnitude=[1.0] * 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_matches_reference(backend, p):
    """backward(create_graph=True) takes the differentiable recompute with the forward's dropout mask (the backend's
    own: one mask function for every variant): a gradient penalty's gradient is exact."""
    problem = make_problem((9,), 12, 10, 3, torch.float32, "linear", True)
    x, weight, bias, lora_A, lora_B, m = problem
    mask = dropout_mask(11, (9, 12), p, x.device, backend=backend) if p > 0 else None

    def penalty(fn):
        y = fn()
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [lora_A, lora_B, m])

    got = penalty(lambda: fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.5, p, backend=backend, magnitude=m,
                                            dropout_seed=11))
    want = penalty(lambda: dora_ref(x, weight, bias, lora_A, lora_B, m, 1.5, dropout_mask=mask))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
