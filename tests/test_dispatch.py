"""The router's table (fused_lora/dispatch.py), cell by cell: every (variant, base kind, backend, GEMM setting, GPU)
→ what runs (backend, path, the candidates auto times), or the refusal; and per call, what a function transform, the
native shortcut and the Function each get."""

from __future__ import annotations

import warnings

import pytest
import torch

from fused_lora import FallbackWarning, bases, dispatch, fallback, fused_lora_linear, hardware

ALL = ("fused", "composed", "torch")
NO_FUSED = ("composed", "torch")
TORCH = ("torch", "torch", ("torch",))

# (variant, kind, GEMM setting) on an sm_90-like device → (backend, path, candidates); "refused" where the kind
# refuses the variant. "warns": the cell runs the PyTorch path and says why.
TABLE = {
    ("lora", "dense", "auto"): ("triton", "auto", ALL),
    ("lora", "dense", "fused"): ("triton", "fused", ALL),
    ("lora", "dense", "composed"): ("triton", "composed", ALL),
    ("lora", "bnb-4bit", "auto"): ("triton", "auto", ALL),
    ("lora", "bnb-4bit", "fused"): ("triton", "fused", ALL),
    ("lora", "bnb-4bit", "composed"): ("triton", "composed", ALL),
    ("lora", "bnb-8bit", "auto"): ("triton", "auto", NO_FUSED),
    ("lora", "bnb-8bit", "fused"): ("triton", "composed", NO_FUSED),  # the kind has no fused path: its other one
    ("lora", "bnb-8bit", "composed"): ("triton", "composed", NO_FUSED),
    ("dora", "dense", "auto"): ("triton", "auto", ("fused", "torch")),
    ("dora", "dense", "fused"): ("triton", "fused", ("fused", "torch")),
    ("dora", "dense", "composed"): "warns",  # DoRA has no composed kernels: the PyTorch path (cuBLAS)
    ("dora", "bnb-4bit", "auto"): "refused",
    ("dora", "bnb-8bit", "auto"): "refused",
}


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setattr(hardware, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fallback, "_warned", set())
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)


@pytest.mark.parametrize(("variant", "kind", "gemm"), sorted(TABLE))
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_every_cell_of_the_table(sm90, monkeypatch, variant, kind, gemm, backend):
    monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    want = TABLE[(variant, kind, gemm)]
    if want == "refused":
        why = dispatch.refusal(variant, kind)
        assert why is not None and "quantized base" in why and "PEFT" in why
        with pytest.raises(TypeError, match="here: use_dora=True on a bitsandbytes"):
            dispatch.check_supported(variant, kind, "here")
        return
    assert dispatch.refusal(variant, kind) is None
    requested = None if backend == "auto" else backend
    if want == "warns" and backend != "torch":
        with pytest.warns(FallbackWarning, match="DoRA has no composed kernels"):
            got = dispatch.route(variant, kind, torch.device("cpu"), torch.float16, requested)
        assert got == TORCH
        return
    got = dispatch.route(variant, kind, torch.device("cpu"), torch.float16, requested)
    assert got == (TORCH if backend == "torch" else want)


@pytest.mark.parametrize("kind", ["dense", "bnb-4bit"])
def test_turing_and_unfit_inputs_leave_the_fused_path_out(sm90, monkeypatch, kind):
    monkeypatch.setenv("FUSED_LORA_GEMM", "auto")
    assert dispatch.route("lora", kind, torch.device("cpu"), torch.float16, "triton", fused_ok=False) == \
        ("triton", "auto", NO_FUSED)
    monkeypatch.setattr(hardware, "device_capability", lambda device: (7, 5))  # Turing: Triton's dots on FMA units
    assert dispatch.route("lora", kind, torch.device("cpu"), torch.float16, "triton") == ("triton", "auto", NO_FUSED)


@pytest.mark.parametrize(("capability", "dtype", "words"), [((7, 0), torch.float16, "7.0"),
                                                           ((7, 5), torch.bfloat16, "no bf16 tensor cores")])
def test_gpus_the_kernels_cannot_serve_take_the_pytorch_path(monkeypatch, capability, dtype, words):
    monkeypatch.setattr(hardware, "device_capability", lambda device: capability)
    monkeypatch.setattr(fallback, "_warned", set())
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    with pytest.warns(FallbackWarning, match=words):
        assert dispatch.route("lora", "dense", torch.device("cpu"), dtype) == TORCH


def test_the_table_is_the_registered_kinds():
    """The router reads the kinds' passes: what each kind serves per variant and path."""
    served = {(k.name, v): (k.paths(v), k.serves(v)) for k in bases.registered() for v in ("lora", "dora")}
    assert served == {
        ("dense", "lora"): (("fused", "composed"), True), ("dense", "dora"): (("fused",), True),
        ("bnb-4bit", "lora"): (("fused", "composed"), True), ("bnb-4bit", "dora"): ((), False),
        ("bnb-8bit", "lora"): (("composed",), True), ("bnb-8bit", "dora"): ((), False),
    }


@pytest.mark.parametrize("native", [None, "0"])
def test_native_shortcut_can_be_switched_off(monkeypatch, native):
    """p = 0 with adapters in x's dtype on the PyTorch backend takes native autograd ops unless FUSED_LORA_NATIVE=0,
    which makes the call run the autograd Function (what a test that means the Function sets)."""
    if native is None:
        monkeypatch.delenv("FUSED_LORA_NATIVE", raising=False)
    else:
        monkeypatch.setenv("FUSED_LORA_NATIVE", native)
    x = torch.randn(3, 8, requires_grad=True)
    w, A, B = torch.randn(5, 8), torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = fused_lora_linear(x, w, None, A, B, 2.0, 0.0, backend="torch")
    ran_function = "Function" in type(y.grad_fn).__name__
    assert ran_function == (native == "0"), type(y.grad_fn).__name__


@pytest.mark.parametrize(("p", "adapter_dtype", "function"), [
    (0.0, torch.float32, False),  # the native shortcut
    (0.1, torch.float32, True),  # dropout: the Function (its mask regenerated in backward)
    (0.0, torch.float64, True),  # adapters in another dtype than x: the Function (no fp64 copy of x kept)
])
def test_what_a_pytorch_backend_call_runs(monkeypatch, p, adapter_dtype, function):
    monkeypatch.delenv("FUSED_LORA_NATIVE", raising=False)
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8)
    A, B = torch.randn(2, 8, dtype=adapter_dtype), torch.randn(5, 2, dtype=adapter_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = dispatch.lora_call(x, w, None, A.requires_grad_(), B.requires_grad_(), 2.0, p, "linear", backend="torch")
    assert ("Function" in type(y.grad_fn).__name__) == function


def test_function_transforms_take_peft_plain_ops():
    """Under torch.func (grad, vmap, jvp) the call is PEFT's plain ops, which every transform differentiates."""
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    A, B = torch.randn(2, 8), torch.randn(5, 2)

    def loss(a):
        return dispatch.lora_call(x, w, None, a, B, 2.0, 0.0, "linear", backend="torch").square().sum()

    grad = torch.func.grad(loss)(A)
    want = torch.autograd.functional.jacobian(loss, A)
    torch.testing.assert_close(grad, want)
