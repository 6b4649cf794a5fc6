"""Which implementation runs a call: the Triton kernels or the pure-PyTorch path.

``auto`` (the default) runs the kernels on CUDA tensors, and on CPU tensors too when the process was
started with ``TRITON_INTERPRET=1`` (that is how CI tests the kernels); otherwise CPU tensors take the
PyTorch path. Force one with ``fused_lora_linear(..., backend="torch")`` or the environment variable
``FUSED_LORA_BACKEND=torch|triton|auto``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .kernels import INTERPRET

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FUSED_LORA_BACKEND"


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """'triton' or 'torch' for a call on ``device``."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend=" if requested is not None else f"{ENV_VAR}="
        raise ValueError(f"fused_lora: {source}{choice!r} is not a backend; choose one of {BACKENDS}")
    if choice == "auto":
        return "triton" if device.type == "cuda" or INTERPRET else "torch"
    if choice == "triton" and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"fused_lora: the Triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing fused_lora to run the kernels on CPU through Triton's interpreter, or use "
            "backend='torch'"
        )
    return choice


def backend_ops(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward``/``dropout_mask`` for a resolved backend."""
    if name == "triton":
        from . import triton_ops

        return triton_ops
    from . import torch_ops

    return torch_ops
