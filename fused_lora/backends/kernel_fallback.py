"""When a Triton kernel cannot run on the device: the call is computed by the PyTorch path instead, once.

A kernel that cannot be built or launched (``KERNEL_FAILURES``: out of shared memory or registers, a ptxas or
compiler error) does not stop the run: the call is computed by the PyTorch path with the kernels' own dropout mask (so
forward and backward still agree), one ``FallbackWarning`` per reason, and that signature is not tried again in this
process. Every Triton orchestration (LoRA dense/composed/4-bit, DoRA) runs its launches through :func:`guarded`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import AutotunerError, OutOfResources, PTXASError

from ..fallback import warn_fallback
from .dropout_triton import dropout_mask
from .triton_launch import on_device

# What a GPU can raise while building or launching a kernel that it cannot run. Not InterpreterError: under
# TRITON_INTERPRET=1 a kernel bug must fail the tests, not be hidden by the fallback.
KERNEL_FAILURES = (OutOfResources, PTXASError, CompilationError, AutotunerError)
# Signatures whose kernels failed once: computed by the PyTorch path from then on.
_failed: set[tuple] = set()

T = TypeVar("T")


def signature(device: torch.device, what: str, *tensors: torch.Tensor | None, **flags) -> tuple:
    """What identifies a launch for the failure record: device, the pass, dtypes and strides, flags."""
    return (device, what, *(None if t is None else (t.dtype, t.stride()) for t in tensors), *sorted(flags.items()))


def kernel_keep(seed: int, x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The kernels' boolean keep mask for x (None without dropout; all False at p = 1), for the PyTorch path."""
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros(x.shape, device=x.device, dtype=torch.bool)
    try:
        return dropout_mask(seed, tuple(x.shape), p, x.device) > 0
    except KERNEL_FAILURES as err:
        raise RuntimeError(
            f"fused_lora: the Triton kernels cannot run on {x.device} (even the dropout-mask kernel failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Run the PyTorch path: "
            "FUSED_LORA_BACKEND=torch (or backend='torch')") from err


def guarded(key: tuple, what: str, launch: Callable[[], T], fallback: Callable[[torch.Tensor | None], T],
            seed: int, x: torch.Tensor, p: float) -> T:
    """``launch()`` on x's device, or, when its kernels failed now or before for ``key``, ``fallback(keep)`` with the
    kernels' boolean keep mask for (seed, x, p)."""
    with on_device(x.device):
        if key not in _failed:
            try:
                return launch()
            except KERNEL_FAILURES as err:
                _failed.add(key)
                first = str(err).splitlines()[0] if str(err) else ""
                warn_fallback(f"a Triton kernel of the {what} failed on {key[0]} ({type(err).__name__}: "
                              f"{first[:160]}); this call and later ones with the same shapes and dtypes run the "
                              "PyTorch path, with the kernels' dropout mask")
        return fallback(kernel_keep(seed, x, p))
