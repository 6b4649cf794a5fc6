"""Never crash a training run on hardware or a case the kernels cannot serve.

Each fallback reason is forced on the tests' device (the CPU, or a GPU whose capability is faked) by injecting the
capability (``hardware.device_capability``), the ROCm build (``hardware.is_rocm``) or a kernel failure (a launcher
raising Triton's own exception), and the result is checked against the fp64 reference with the dropout mask the
path really used: the PyTorch path's own after a hardware fallback, the kernels' Philox mask after a kernel failure
(forward and backward must agree).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DEVICE, assert_matches_references, reference_pair
from test_functional import make_problem
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from fused_lora import FallbackWarning, diagnostics, dropout_mask, fallback, fused_lora_linear, hardware
from fused_lora.backends import lora_triton, masks, triton_launch


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Auto backend (conftest pins 'torch'), no warnings or failures remembered from other tests."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "auto")
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    monkeypatch.setattr(fallback, "_warned", set())
    diagnostics.clear()


def gpu_like(monkeypatch, capability: tuple[int, int], rocm: bool = False) -> None:
    """Make the tests' device (the CPU, or the real GPU) look like a GPU of ``capability`` to the path choice."""
    monkeypatch.setattr(hardware, "device_capability", lambda device: capability)
    monkeypatch.setattr(hardware, "is_rocm", lambda: rocm)


def counting(monkeypatch, module, name: str) -> list[int]:
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def run_checked(dtype, mask_backend: str, p: float = 0.25, layout: str = "linear", adapter_dtype=None):
    """One fused_lora_linear forward+backward (auto backend), checked against fp64 with ``mask_backend``'s mask."""
    x, weight, bias, lora_A, lora_B = make_problem((3, 11), 40, 28, 6, dtype, layout, True,
                                                   adapter_dtype=adapter_dtype, seed=2, device=DEVICE)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.5, p, weight_layout=layout, dropout_seed=77)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    y.backward(grad_out)
    mask = dropout_mask(77, (33, 40), p, x.device, backend=mask_backend).view(x.shape) if p > 0 else None
    ref, same = reference_pair(x, weight, bias, lora_A, lora_B, 1.5, layout, mask, grad_out)
    assert_matches_references(y, x, weight, bias, lora_A, lora_B, ref, same)


# -------------------------------------------------------------------------------------------- hardware


@pytest.mark.parametrize(("capability", "rocm", "dtype", "words"), [
    ((7, 0), False, torch.float16, "compute capability 7.0"),
    ((6, 1), False, torch.float32, "compute capability 6.1"),
    ((7, 5), False, torch.bfloat16, "no bf16 tensor cores"),
    ((9, 4), True, torch.float16, "ROCm"),
], ids=["volta", "pascal", "turing-bf16", "rocm"])
def test_hardware_the_kernels_cannot_serve_runs_the_torch_path(monkeypatch, capability, rocm, dtype, words):
    gpu_like(monkeypatch, capability, rocm)
    launches = counting(monkeypatch, lora_triton, "lora_down")
    with pytest.warns(FallbackWarning, match=words):
        run_checked(dtype, mask_backend="torch")
    assert not launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        run_checked(dtype, mask_backend="torch")


def test_silenced_by_choosing_the_torch_path(monkeypatch):
    gpu_like(monkeypatch, (7, 0))
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checked(torch.float16, mask_backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_turing_takes_the_composed_path(monkeypatch, dtype):
    """sm_75: Triton's tl.dot is FMA there, so the base GEMM is cuBLAS's and the rank-r terms are added in place."""
    gpu_like(monkeypatch, (7, 5))
    fused = counting(monkeypatch, lora_triton, "lora_forward")
    added = counting(monkeypatch, lora_triton, "lora_up_add")
    dx_added = counting(monkeypatch, lora_triton, "lora_dx_add")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels serve it: no fallback warning
        run_checked(dtype, mask_backend="triton")
    assert not fused and len(added) == 1 and len(dx_added) == 1
    assert triton_launch.dot_precision(torch.float32, torch.device("cpu")) == "ieee"  # no TF32 before Ampere


def test_ampere_and_newer_take_the_fused_path(monkeypatch):
    gpu_like(monkeypatch, (8, 6))
    fused = counting(monkeypatch, lora_triton, "lora_forward")
    run_checked(torch.bfloat16, mask_backend="triton", adapter_dtype=torch.float32)
    assert len(fused) == 1


def test_gemm_mode_can_be_forced(monkeypatch):
    gpu_like(monkeypatch, (9, 0))
    monkeypatch.setenv("FUSED_LORA_GEMM", "composed")
    added = counting(monkeypatch, lora_triton, "lora_up_add")
    run_checked(torch.float32, mask_backend="triton", layout="conv1d")
    assert len(added) == 1
    monkeypatch.setenv("FUSED_LORA_GEMM", "cublas")
    with pytest.raises(ValueError, match="FUSED_LORA_GEMM='cublas'"):
        run_checked(torch.float32, mask_backend="triton")


def test_forced_triton_backend_is_honoured(monkeypatch):
    """backend='triton' is the user's choice: no hardware fallback (a kernel failure still falls back)."""
    gpu_like(monkeypatch, (7, 0))
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    launches = counting(monkeypatch, lora_triton, "lora_down")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checked(torch.float32, mask_backend="triton")
    assert launches


# ------------------------------------------------------------------------------------------ kernel failures


def failing(monkeypatch, name: str, error: Exception, module=lora_triton) -> list[int]:
    calls = []

    def raise_(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(module, name, raise_)
    return calls


FAILURES = {
    "out-of-resources": OutOfResources(240 * 1024, 99 * 1024, "shared memory"),
    "ptxas": PTXASError("ptxas fatal: Unknown option"),
    "compilation": CompilationError("lora.py", None, "unsupported on this target"),
}


# Launchers only the fused path runs; the others (S, the dY pass, dA) serve the composed path too.
FUSED_ONLY = ("lora_forward", "lora_dx")


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("launcher", ["lora_forward", "lora_down", "lora_dx", "lora_dy_pass", "lora_da"])
def test_kernel_failure_falls_back_with_the_kernels_mask(monkeypatch, launcher, failure):
    """A kernel that cannot build or launch on the device: the call runs the next path (fused → composed → PyTorch),
    every path with the Philox mask of the kernels, so a forward on one path and a backward on another agree; the
    key stays on the path that ran, and the path table records the failure."""
    gpu_like(monkeypatch, (8, 0))
    calls = failing(monkeypatch, launcher, FAILURES[failure])
    direction = "forward" if launcher in ("lora_forward", "lora_down") else "backward"
    with pytest.warns(FallbackWarning, match=f"a Triton kernel of the fused path's {direction} failed"):
        run_checked(torch.float32, mask_backend="triton")
    tried = len(calls)
    assert tried == (1 if launcher in FUSED_ONLY else 2), "the composed path shares the launcher: it fails there too"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checked(torch.float32, mask_backend="triton")
    assert len(calls) == tried, "a key whose kernels failed does not try them again"
    (entry,) = diagnostics.path_report().values()
    assert entry["runs"] == ("composed" if launcher in FUSED_ONLY else "torch")
    assert {f["path"] for f in entry["kernel_failures"]} == ({"fused"} if launcher in FUSED_ONLY
                                                             else {"fused", "composed"})


def test_other_kernel_errors_are_not_hidden(monkeypatch):
    """Only build/launch failures fall back: a bug (any other exception) still raises."""
    gpu_like(monkeypatch, (8, 0))
    failing(monkeypatch, "lora_forward", IndexError("a bug"))
    with pytest.raises(IndexError, match="a bug"):
        run_checked(torch.float32, mask_backend="triton")


def test_mask_kernel_failure_names_the_way_out(monkeypatch):
    gpu_like(monkeypatch, (8, 0))
    failing(monkeypatch, "lora_down", OutOfResources(1, 0, "registers"))  # fused and composed fail: the PyTorch path
    failing(monkeypatch, "dropout_mask", PTXASError("no"), module=masks)  # … needs the kernels' mask
    with pytest.raises(RuntimeError, match="FUSED_LORA_BACKEND=torch"), pytest.warns(FallbackWarning):
        run_checked(torch.float32, mask_backend="triton")
