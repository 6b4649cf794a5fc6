"""Shared test helpers: fp64 references and tolerances that mean something.

The rule (flash-attention's): a kernel's error against the fp64 ground truth must be at most about
twice the error of the same computation done by PyTorch in the same dtype, plus a small atol.
"""

from __future__ import annotations

import contextlib

import torch

from fused_lora import lora_linear_ref

BACKENDS = ["torch", "triton"]
# Where the tests put their tensors: CUDA when there is a GPU (the "triton" backend needs CUDA tensors there: the
# interpreter is on only without CUDA, conftest.py), else the CPU (the kernels through Triton's interpreter).
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp64 leaf copy of ``t`` (requires grad when ``t`` does), for reference gradients."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def leaf_like(t: torch.Tensor | None) -> torch.Tensor | None:
    """A same-dtype leaf copy of ``t``, for the same-dtype PyTorch computation."""
    if t is None:
        return None
    return t.detach().clone().requires_grad_(t.requires_grad)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(name: str, got: torch.Tensor, torch_same: torch.Tensor, ref: torch.Tensor,
                              atol: float, factor: float = 2.0) -> None:
    """``|got - ref| <= factor · |torch_same - ref| + atol`` (max norms), with a readable failure."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, base = max_err(got, ref), max_err(torch_same, ref)
    assert err <= factor * base + atol, (
        f"{name}: error {err:.3g} > {factor}× PyTorch's same-dtype error {base:.3g} + atol {atol:.3g}")


def atol_for(dtype: torch.dtype, scale: float) -> float:
    """A small absolute slack relative to the size of the values compared."""
    eps = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    return eps * scale


def reference_pair(x, weight, bias, lora_A, lora_B, scaling, weight_layout, mask, grad_out):
    """(fp64 reference, same-dtype PyTorch reference): each a dict of output and gradients."""
    results = []
    for make, upcast in ((leaf64, torch.float64), (leaf_like, None)):
        xs, ws, bs, As, Bs = make(x), make(weight), make(bias), make(lora_A), make(lora_B)
        ws.requires_grad_(False)
        y = lora_linear_ref(xs, ws, bs, As, Bs, scaling, weight_layout=weight_layout, dropout_mask=mask,
                            upcast=upcast)
        y.backward(grad_out.to(y.dtype))
        results.append({"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad,
                        "dbias": bs.grad if bs is not None else None})
    return results


def assert_matches_references(y, x, weight, bias, lora_A, lora_B, ref: dict, same: dict,
                              scales: dict | None = None) -> None:
    """y and the gradients left on x, lora_A, lora_B and bias against ``reference_pair``'s results: the
    same gradients present, the same dtypes, errors within the rule; the frozen weight gets no gradient.
    ``scales``: the atol's scale per result (default: the reference's largest magnitude)."""
    got = {"y": y.detach(), "dx": x.grad, "dA": lora_A.grad, "dB": lora_B.grad,
           "dbias": bias.grad if bias is not None else None}
    assert weight.grad is None
    for name, value in got.items():
        if ref[name] is None:
            assert value is None, f"{name} should not have a gradient"
            continue
        assert value is not None, f"{name} is missing"
        assert value.dtype == same[name].dtype, f"{name}: dtype {value.dtype} != {same[name].dtype}"
        if not ref[name].numel():
            scale = 1.0
        else:
            scale = (scales[name] if scales is not None else ref[name].abs()).max().item()
        assert_within_torch_error(name, value, same[name], ref[name], atol_for(value.dtype, scale))


@contextlib.contextmanager
def legacy_tf32_flag(flag: bool):
    """Set ``torch.backends.cuda.matmul.allow_tf32`` for the block. Setting the legacy flag gives cuda.matmul a
    precision of its own ("ieee" once set back to False) that a later ``torch.backends.fp32_precision = "tf32"``
    would not override (what CI's test order hit), so on the way out cuda.matmul is put back to inheriting."""
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.fp32_precision = "none"


@contextlib.contextmanager
def reversed_program_order():
    """Under Triton's interpreter, every launch runs its programs in the reverse of the interpreter's own order (it runs
    them one at a time: x, then y, then z, each ascending). A GPU runs programs in no fixed order, so a result that
    depends on the order (a sum by fp32 atomics from several programs) differs between the two orders here."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    forward = builder.set_grid_idx

    def backward(x, y, z):
        nx, ny, nz = builder.grid_dim
        return forward(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    builder.set_grid_idx = backward
    try:
        yield
    finally:
        del builder.set_grid_idx  # the class's method again


def spy(monkeypatch, module, *names: str, note=None) -> list:
    """Wraps ``module.<name>`` for each of ``names``: every call first appends ``note(name, kwargs)`` (default: the
    name) to the returned list, then runs the original. Proves which entry points a path went through."""
    calls = []
    for name in names:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append(_name if note is None else note(_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls
