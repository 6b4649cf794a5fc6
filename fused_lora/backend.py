"""Which implementation runs a call: the Triton kernels or the pure-PyTorch path, and for the kernels, which
base GEMM.

``auto`` (the default) runs the kernels on CUDA tensors, and on CPU tensors too when the process was
started with ``TRITON_INTERPRET=1`` (that is how CI tests the kernels); otherwise CPU tensors take the
PyTorch path. Force one with ``fused_lora_linear(..., backend="torch")`` or the environment variable
``FUSED_LORA_BACKEND=torch|triton|auto``.

``auto`` never picks kernels a GPU cannot run well or at all (each case warns once, ``FallbackWarning``):

| GPU | path |
|---|---|
| NVIDIA sm_80 and newer (A100, A10/L4/RTX 30-40, H100/H200, B200/RTX 50) | Triton, fused base GEMM |
| sm_75 (T4, RTX 20), fp16/fp32 | Triton rank-r kernels + cuBLAS base GEMM ("composed") [1] |
| sm_75 with bf16 | PyTorch path: Turing has no bf16 tensor cores |
| older than sm_75, or a ROCm build | PyTorch path: the kernels are built and checked for NVIDIA sm_75+ only |

[1] Triton lowers ``tl.dot`` to FMA instructions on Turing (no tensor cores); cuBLAS uses them.

A kernel that fails to build or launch at run time falls back too, call by call (``triton_ops``). The base GEMM
of the kernels can be forced with ``FUSED_LORA_GEMM=fused|composed|auto``.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from .kernels import INTERPRET

BACKENDS = ("auto", "triton", "torch")
GEMM_MODES = ("auto", "fused", "composed")
ENV_VAR = "FUSED_LORA_BACKEND"
GEMM_ENV_VAR = "FUSED_LORA_GEMM"


class FallbackWarning(UserWarning):
    """A call runs a slower path than the fused kernels (the reason is in the message). Silence it by choosing the
    path yourself (``FUSED_LORA_BACKEND=torch``), or with
    ``warnings.filterwarnings("ignore", category=fused_lora.FallbackWarning)``."""


_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """One warning per reason per process."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fused_lora: {reason}. Silence: set {ENV_VAR}=torch to choose the PyTorch path yourself, or "
                  "filter fused_lora.FallbackWarning", FallbackWarning, stacklevel=4)


_capabilities: dict[torch.device, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, read once per device (not on every call); None elsewhere. A plain dict
    rather than functools.cache: torch.compile traces this and warns about cache wrappers."""
    if device.type != "cuda":
        return None
    if device not in _capabilities:
        _capabilities[device] = torch.cuda.get_device_capability(device)
    return _capabilities[device]


def is_rocm() -> bool:
    return torch.version.hip is not None


def _hardware_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why ``auto`` must not run the kernels for this device and dtype, or None."""
    capability = device_capability(device)
    if capability is None:  # not a GPU
        return None
    if is_rocm():
        return f"{device} is a ROCm device; the Triton kernels are built and checked for NVIDIA GPUs only"
    if capability < (7, 5):
        return (f"{device} has compute capability {capability[0]}.{capability[1]}; the kernels need 7.5 or newer "
                "(T4 and later)")
    if capability < (8, 0) and dtype == torch.bfloat16:
        return (f"{device} (compute capability {capability[0]}.{capability[1]}) has no bf16 tensor cores; use "
                "float16 on this GPU for the fused kernels")
    return None


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'torch' for a call on ``device`` computing in ``dtype``."""
    if requested is None and device.type == "cpu" and not INTERPRET and ENV_VAR not in os.environ:
        return "torch"  # the CPU path of every call without a GPU: decided before anything else (host cost)
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend=" if requested is not None else f"{ENV_VAR}="
        raise ValueError(f"fused_lora: {source}{choice!r} is not a backend; choose one of {BACKENDS}")
    if choice == "auto":
        if device.type != "cuda" and not INTERPRET:
            return "torch"
        reason = _hardware_reason(device, dtype)
        if reason is not None:
            warn_fallback(f"{reason}: running the PyTorch path")
            return "torch"
        return "triton"
    if choice == "triton" and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"fused_lora: the Triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing fused_lora to run the kernels on CPU through Triton's interpreter, or use "
            "backend='torch'"
        )
    return choice


def resolve_gemm(device: torch.device) -> str:
    """'fused' (Triton base GEMM with the rank-r term folded in), 'composed' (cuBLAS base GEMM plus in-place
    rank-r kernels) or 'auto' (timed on first use per shape: ``gemm_choice``) for the Triton backend on ``device``."""
    choice = os.environ.get(GEMM_ENV_VAR, "auto")
    if choice not in GEMM_MODES:
        raise ValueError(f"fused_lora: {GEMM_ENV_VAR}={choice!r}; choose one of {GEMM_MODES}")
    if choice != "auto":
        return choice
    capability = device_capability(device)
    if capability is None:  # CPU under the interpreter: nothing to time
        return "fused"
    # Turing: Triton compiles tl.dot to FMA instructions (no HMMA, stack spills in every GEMM config:
    # bench/results/compile/sm_75-*), while cuBLAS uses its tensor cores: composed, without timing.
    return "composed" if capability < (8, 0) else "auto"


_OPS: dict[str, ModuleType] = {}


def backend_ops(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward``/``dropout_mask`` for a resolved backend (imported on first
    use: triton_ops needs Triton's launcher machinery; looked up from a dict afterwards, since this runs per call)."""
    ops = _OPS.get(name)
    if ops is None:
        if name == "triton":
            from . import triton_ops as ops
        else:
            from . import torch_ops as ops
        _OPS[name] = ops
    return ops
