"""Determinism: same inputs, seed and backend give the same bits; one dropout mask per call.

What this file adds to the tests that already touch the subject (not repeated here):

- ``test_dropout.py``: ``dropout_mask`` is a function of the seed (seed 5 vs 6), its keep-rate, the
  forward applies the seeded mask, ``torch.manual_seed`` reproduces ``fused_lora_linear``'s forward.
- ``test_ecosystem.py``: ``torch.utils.checkpoint`` (both ``use_reentrant``) replays the mask for one fp32
  ``LoRALinear``; HF ``gradient_checkpointing_enable`` gives the same gradients.
- ``test_functional.py::test_split_reductions_match_single_pass``: the split (atomics) reductions agree
  with the single pass to a tolerance.

Here: bitwise identical outputs *and gradients* run after run (with freed memory poisoned between runs,
so an unwritten output element cannot pass by reusing the same block), with the split-reduction paths
forced, and in a fresh process; the mask used by the backward kernels read off the gradients and
compared with the forward's, element by element (plain, split, and through a checkpointed recompute
whose seed comes from the restored global RNG); checkpointed recompute of a block with two LoRA
layers and an ``nn.Dropout`` (half base, fp32 adapters, trainable bias) bitwise equal to the plain run,
and a control showing the same test fails when the RNG state is not restored; different seeds give
unrelated masks (not a shifted copy); a ``LoRALinear`` training loop reproducible under
``torch.manual_seed``.

GPU caveat (README, Known limits): dB and dbias (and dS, dA when split; dX through dS) are reduced with fp32
atomics, whose order is not fixed on a GPU, so there the Triton backend's gradients are compared with a tight
tolerance instead of bitwise; its outputs, and everything on the interpreter (one program at a time, in
a fixed order) and on the PyTorch backend, are compared bitwise. Which results a GPU's program order can change
is checked here by reversing the interpreter's order (``test_which_results_depend_on_program_order``).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import BACKENDS, CUDA, DEVICE, reversed_program_order

from fused_lora import LoRALinear, dropout_mask, fused_lora_linear
from fused_lora.backends import lora_triton
from fused_lora.kernels.configs import INTERPRET

GRADS = ("dx", "dA", "dB", "dbias")


def make_inputs(device, dtype=torch.float32, adapter_dtype=None, layout="linear", lead=(3, 23), K=70, N=52, r=12,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, dt=dtype, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dt)
    adapter_dtype = adapter_dtype or dtype
    x = rnd(*lead, K)
    weight = rnd(*((N, K) if layout == "linear" else (K, N)), scale=K**-0.5)
    bias = rnd(N)
    lora_A = rnd(r, K, dt=adapter_dtype, scale=K**-0.5)
    lora_B = rnd(N, r, dt=adapter_dtype, scale=r**-0.5)
    grad_out = rnd(*lead, N)
    return x, weight, bias, lora_A, lora_B, grad_out


def run_once(inputs, backend, p=0.3, seed=1234, layout="linear", scaling=2.0):
    """y and every gradient of one forward+backward, from fresh leaves (nothing accumulates across runs)."""
    x, weight, bias, lora_A, lora_B, grad_out = (t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, lora_A, lora_B, bias)]
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout=layout, dropout_seed=seed,
                          backend=backend)
    grads = torch.autograd.grad(y, leaves, grad_out)
    return {"y": y.detach(), **dict(zip(GRADS, grads, strict=True))}


def poison_freed_memory(like: dict, copies: int = 4) -> None:
    """Fill and free NaN blocks of the results' sizes, so the next run's ``torch.empty`` buffers (which the
    allocator takes from the blocks freed last) hold NaN rather than the previous run's values: an output
    element a kernel forgot to write then shows up as a difference instead of passing unseen."""
    blocks = [torch.full_like(t, float("nan")) for t in like.values() for _ in range(copies)]
    del blocks


def assert_same(a: dict, b: dict, bitwise_grads: bool = True) -> None:
    for name in a:
        if name == "y" or bitwise_grads:
            assert torch.equal(a[name], b[name]), f"{name} differs run to run (max |Δ| " \
                f"{(a[name].double() - b[name].double()).abs().max().item():.3g})"
        else:  # fp32 atomics on a GPU: the summation order changes run to run
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6 * a[name].abs().max().item())


def atomics_are_ordered(backend: str, device: torch.device) -> bool:
    return backend == "torch" or device.type != "cuda"


CONFIGS = {
    "fp32-linear": dict(dtype=torch.float32, layout="linear", p=0.3),
    "bf16-conv1d-fp32-adapters": dict(dtype=torch.bfloat16, adapter_dtype=torch.float32, layout="conv1d", p=0.1),
    "fp16-no-dropout": dict(dtype=torch.float16, layout="linear", p=0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_bitwise_identical_run_after_run(backend, config, device):
    cfg = dict(CONFIGS[config])
    p, layout = cfg.pop("p"), cfg["layout"]
    inputs = make_inputs(device, **cfg)
    first = run_once(inputs, backend, p=p, layout=layout)
    for _ in range(2):
        poison_freed_memory(first)
        assert_same(first, run_once(inputs, backend, p=p, layout=layout), atomics_are_ordered(backend, device))
    for value in first.values():
        assert torch.isfinite(value).all()


def force_split(monkeypatch, factor=3) -> list:
    """Make the launchers split dS over N slices, dA over M slices and S over K slices (what a GPU launch picks to
    fill its SMs; on CPU the factor is always 1). Returns the list of requested factors, to check the path ran."""
    calls = []

    def split(programs, max_split, device, cap=32):
        calls.append(factor)
        return factor

    monkeypatch.setattr(lora_triton, "split_factor", split)
    return calls


def test_split_reductions_bitwise_identical_run_after_run(monkeypatch, device):
    inputs = make_inputs(device, lead=(2, 37), K=66, N=100, r=20)
    single = run_once(inputs, "triton")
    calls = force_split(monkeypatch)
    first = run_once(inputs, "triton")
    assert calls == [3, 3, 3], "S = x Aᵀ, the dS pass and the dA kernel should each have asked for a split factor"
    poison_freed_memory(first)
    assert_same(first, run_once(inputs, "triton"), atomics_are_ordered("triton", device))
    # the split path is a different summation order, not a different result
    for name in GRADS:
        torch.testing.assert_close(first[name], single[name], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="the interpreter's program order is what this test reverses")
@pytest.mark.parametrize("use_dora", [False, True])
def test_which_results_depend_on_program_order(use_dora, monkeypatch):
    """The README's list of what is bitwise repeatable on a GPU (Known limits), where programs run in no fixed order.
    With every split path forced (S and DoRA's norm over K, dS over N, dA over M), running each launch's programs in
    the reverse of the interpreter's order leaves y bitwise unchanged (its GEMM tiles store, S's and the norm's slices
    are summed in a fixed order) and changes the results reduced with fp32 atomics: dB, dbias (and DoRA's d magnitude)
    always, dS when split, and through dS, dX and dA."""
    from fused_lora.backends import dora_triton

    inputs = make_inputs("cpu", lead=(2, 37), K=66, N=100, r=20)
    x, weight, bias, lora_A, lora_B, grad_out = inputs
    magnitude = (weight.norm(dim=1) * (0.5 + torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(1))))
    calls = force_split(monkeypatch)
    monkeypatch.setattr(dora_triton, "split_factor", lambda programs, max_split, device, cap=32: calls.append(3) or 3)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B, bias, magnitude)]
        y = fused_lora_linear(leaves[0], weight, leaves[3], leaves[1], leaves[2], 2.0, 0.3, dropout_seed=1234,
                              backend="triton", magnitude=leaves[4] if use_dora else None)
        wanted = leaves if use_dora else leaves[:4]
        grads = torch.autograd.grad(y, wanted, grad_out)
        return {"y": y.detach(), **dict(zip(("dx", "dA", "dB", "dbias", "dmag"), grads, strict=False))}

    ordered = run()
    assert calls == [3, 3, 3], calls  # LoRA: S, dS, dA; DoRA (p > 0): the norm, dS, dA
    with reversed_program_order():
        reverse = run()
    assert torch.equal(reverse["y"], ordered["y"])
    for name in ordered.keys() - {"y"}:
        assert not torch.equal(reverse[name], ordered[name]), f"{name}: no atomics any more? update the README"
        torch.testing.assert_close(reverse[name], ordered[name], rtol=1e-5, atol=1e-6 * ordered[name].abs().max())


FRESH_PROCESS = textwrap.dedent("""
    import hashlib, json, sys
    sys.path.insert(0, sys.argv[1])
    from test_determinism import make_inputs, run_once
    out = {}
    for backend in sys.argv[2:]:
        result = run_once(make_inputs("cpu"), backend)
        out[backend] = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in result.items()}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_same_bits_in_a_fresh_process():
    """No hidden state (a global generator, an allocator's leftovers, an autotuning choice) changes the bits."""
    # CPU tensors: the kernels run on them only through the interpreter
    backends = ["torch", "triton"] if INTERPRET else ["torch"]
    tests_dir = str(Path(__file__).parent)
    # the child inherits TRITON_INTERPRET (set by conftest.py before fused_lora was imported)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, tests_dir, *backends], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend in backends:
        here = run_once(make_inputs("cpu"), backend)
        digests = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in here.items()}
        assert digests == fresh[backend], f"{backend}: results differ between processes"


# ---------------------------------------------------------------------------- one mask per call


MASK_MODES = ["single-pass", "split", "checkpoint", "checkpoint-reentrant"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_backward_regenerates_the_forward_mask(backend, mode, device, monkeypatch):
    """Identity adapters and a zero base weight make every result show its mask:
    y = m ⊙ x (the forward's mask), dX = m ⊙ dY (the dX kernel's), dA = dB = dYᵀ y (the dA kernel's).
    split: the atomics reductions forced; checkpoint: y is the first forward's, the gradients come from the
    recomputed forward with the seed drawn from the global RNG (restored by torch.utils.checkpoint)."""
    if mode == "split" and backend == "torch":
        pytest.skip("the split reductions are the Triton launchers'")
    calls = force_split(monkeypatch) if mode == "split" else []
    M, K, p, seed = 37, 70, 0.4, 99  # K = r = 70 > 64: two rank chunks in every kernel
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(M, K, generator=gen) + 0.5).to(device).requires_grad_()  # no zeros: y = 0 only if dropped
    dy = (torch.rand(M, K, generator=gen) + 0.5).to(device)
    eye = torch.eye(K, device=device)
    lora_A, lora_B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    zero_weight = torch.zeros(K, K, device=device)
    layer = lambda t, dropout_seed=None: fused_lora_linear(t, zero_weight, None, lora_A, lora_B, 1.0, p,
                                                           dropout_seed=dropout_seed, backend=backend)
    if mode.startswith("checkpoint"):
        torch.manual_seed(seed)
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=mode.endswith("reentrant"))
    else:
        y = layer(x, dropout_seed=seed)
    y.backward(dy)
    assert calls == ([3, 3, 3] if mode == "split" else [])  # S over K, dS over N, dA over M
    kept = y.detach() != 0
    dropped_fraction = 1 - kept.double().mean().item()
    assert abs(dropped_fraction - p) < 0.05, f"dropped {dropped_fraction:.3f}, expected about {p}"
    assert torch.equal(x.grad != 0, kept), "the dX kernel used another mask than the forward"
    scaled = kept / (1 - p)
    if not mode.startswith("checkpoint"):
        expected = dropout_mask(seed, (M, K), p, device, backend=backend)
        assert torch.equal(kept, expected != 0), "the forward mask differs from dropout_mask(seed)"
        scaled = expected
    torch.testing.assert_close(y.detach(), x.detach() * scaled, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, dy * scaled, rtol=1e-6, atol=0)
    dyt_y = dy.t() @ y.detach()
    torch.testing.assert_close(lora_A.grad, dyt_y, rtol=1e-5, atol=1e-5, msg="the dA kernel used another mask")
    torch.testing.assert_close(lora_B.grad, dyt_y, rtol=1e-5, atol=1e-5, msg="dB = dYᵀ S: S is not the forward's")


class Block(torch.nn.Module):
    """Attention-like: q and v adapters read the same x (each draws its own seed), then an nn.Dropout."""

    def __init__(self, dtype):
        super().__init__()
        self.q = LoRALinear(24, 20, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, dtype=dtype,
                            weight_layout="conv1d")
        self.v = LoRALinear(24, 20, r=5, lora_alpha=10, lora_dropout=0.5, init_lora_weights=False, dtype=dtype)
        self.v.bias.requires_grad_(True)  # bias="lora_only"-style trainable bias
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.q(x) * self.drop(self.v(x))


def block_grads(block, fn, x):
    torch.manual_seed(123)
    for param in block.parameters():
        param.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.float().square().sum().backward()
    trained = [param.grad.clone() for param in block.parameters() if param.requires_grad]
    assert len(trained) == 5 and all(g.abs().sum() > 0 for g in trained)
    return [y.detach(), x.grad, *trained]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_bitwise_equal(backend, dtype, use_reentrant, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch.manual_seed(0)
    block = Block(dtype).to(DEVICE)  # bf16 base: adapters default to fp32 (PEFT's choice)
    x = torch.randn(2, 9, 24).to(DEVICE, dtype)
    plain = block_grads(block, block, x)
    ckpt = block_grads(block, lambda t: torch.utils.checkpoint.checkpoint(block, t, use_reentrant=use_reentrant), x)
    for i, (a, b) in enumerate(zip(plain, ckpt, strict=True)):
        assert torch.equal(a, b), f"result {i} differs after the checkpointed recompute"


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_without_rng_restore_changes_the_mask(backend, monkeypatch):
    """Control for the test above: if the RNG state were not restored before the recompute, the backward
    would regenerate other masks and the gradients would differ, so that test can fail."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    torch.manual_seed(0)
    block = Block(torch.float32).to(DEVICE)
    block.drop.p = 0.0  # only the LoRA masks depend on the RNG state
    x = torch.randn(2, 9, 24).to(DEVICE)
    plain = block_grads(block, block, x)
    loose = block_grads(block, lambda t: torch.utils.checkpoint.checkpoint(
        block, t, use_reentrant=False, preserve_rng_state=False), x)
    assert torch.equal(plain[0], loose[0])  # the forward is the same ...
    for i in (2, 3, 5, 6):  # the adapters' gradients (q.lora_A, q.lora_B, v.lora_A, v.lora_B)
        assert not torch.equal(plain[i], loose[i]), f"result {i}: the recompute drew the same seeds without a restore"


# ------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearby_seeds_give_unrelated_masks(backend):
    """Seeds s and s+1 (as consecutive layers might get) must not give equal, shifted or correlated masks."""
    p, shape = 0.5, (64, 96)
    masks = [dropout_mask(seed, shape, p, DEVICE, backend=backend) != 0 for seed in (1000, 1001, 1002 + 2**20)]
    n = masks[0].numel()
    sigma = math.sqrt(2 * p * (1 - p) * (1 - 2 * p * (1 - p)) / n)
    for other in masks[1:]:
        mismatch = (masks[0] != other).double().mean().item()
        assert abs(mismatch - 2 * p * (1 - p)) < 6 * sigma, f"mismatch rate {mismatch:.3f}, independent: 0.5"
        flat_a, flat_b = masks[0].flatten(), other.flatten()
        for shift in (1, 2, 3, 4, shape[1]):  # one Philox call feeds 4 columns; shape[1]: one row down
            assert not torch.equal(flat_a[shift:], flat_b[:-shift]) and not torch.equal(flat_b[shift:], flat_a[:-shift])


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_the_seed_changes_every_result(backend):
    inputs = make_inputs(DEVICE, lead=(2, 11), K=40, N=24, r=6)
    a, b = run_once(inputs, backend, seed=7), run_once(inputs, backend, seed=8)
    for name in ("y", "dx", "dA", "dB"):  # dbias = Σ dY does not depend on the mask
        assert not torch.equal(a[name], b[name]), f"{name} is the same for seeds 7 and 8"
    assert torch.equal(a["dbias"], b["dbias"])


# The torch backend's Mersenne Twister keeps 32 bits of its seed: dropout.generator_seed folds the high
# word in, so seeds that differ only above bit 31 (or by sign) still get different masks.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", [5 + 2**32, 5 + 2**40, 5 - 2**63, -5])
def test_seeds_differing_above_32_bits_give_different_masks(backend, other):
    shape = (16, 32)
    assert not torch.equal(dropout_mask(5, shape, 0.5, DEVICE, backend=backend),
                           dropout_mask(other, shape, 0.5, DEVICE, backend=backend))


# ------------------------------------------------------------------------------ LoRALinear


def train_steps(layout, init_seed, run_seed, lr=0.1, steps=3):
    """A few SGD steps of a LoRALinear with dropout: init from ``init_seed``, masks from ``run_seed``."""
    torch.manual_seed(init_seed)
    layer = LoRALinear(24, 20, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, weight_layout=layout)
    layer = layer.to(DEVICE)
    layer.bias.requires_grad_(True)
    opt = torch.optim.SGD([param for param in layer.parameters() if param.requires_grad], lr=lr)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    torch.manual_seed(run_seed)
    outputs = []
    for _ in range(steps):
        y = layer(x)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outputs.append(y.detach())
    return outputs, {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_lora_linear_training_reproducible_under_manual_seed(backend, layout, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    outs_a, state_a = train_steps(layout, init_seed=0, run_seed=0)
    outs_b, state_b = train_steps(layout, init_seed=0, run_seed=0)
    assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b, strict=True))
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"{key} differs after the same training steps"
    # same initial weights, another RNG stream: other masks, so other updates
    outs_c, state_c = train_steps(layout, init_seed=0, run_seed=1)
    assert torch.equal(state_a["weight"], state_c["weight"]) and not torch.equal(state_a["lora_A"], state_c["lora_A"])
    # each call draws a fresh seed: with the weights held still (lr=0) consecutive steps still differ
    outs_still, _ = train_steps(layout, init_seed=0, run_seed=0, lr=0.0)
    assert torch.equal(outs_still[0], outs_a[0]) and not torch.equal(outs_still[0], outs_still[1])
