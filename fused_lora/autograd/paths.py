"""Which path a Triton-backend call runs, and its first-call check: shared by the three Functions.

Within the Triton backend a call runs one of the paths of its row of the router's table (``"fused"``,
``"composed"``) or the PyTorch path (``"torch"``), which ``auto`` times as a candidate too and which a failed
self-check moves a key to. All of them apply the kernels' Philox dropout mask (the PyTorch path gets it as ``keep``),
so a forward on one path and a backward on another agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backends import gemm_choice, self_check
from ..backends.kernel_fallback import kernel_keep

GRAD_NAMES = ("dx", "dA", "dB", "dbias", "dmag")


def forward(kind: str, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, layout: str, weight_shape,
            gemm: str, candidates: str, call: Callable[[str], tuple], ref64: Callable[[], tuple]) -> tuple[tuple, str]:
    """(``call(path)``'s results, the path) for the path ``gemm`` resolves to (``auto``: timed once per key among the
    comma-separated ``candidates``), moved on by failed checks, and checked on its first call (``self_check``): on a
    mismatch the PyTorch path's results. ``call(path)`` returns (y, …); ``ref64()`` the same in fp64. The key:
    ``gemm_choice.key`` of ``kind`` (variant and base), the 2-D input, the adapters and the weight's ``layout``."""
    key, device, candidates = gemm_choice.key(kind, x, lora_A, lora_B, layout), x.device, tuple(candidates.split(","))
    path = self_check.current(key, gemm_choice.resolve(gemm, key, device, call, candidates))
    self_check.note_run(key, path)
    result = call(path)
    if self_check.wanted(key, path, "forward", device):
        def same():
            r = call("torch")
            return {"y": r[0], "_all": r}

        fixed = self_check.check(key, path, "forward", device, {"y": result[0]}, same, lambda: {"y": ref64()[0]},
                                 {**describe(x, lora_A, lora_B, weight_shape), "candidates": candidates})
        if fixed is not None:
            self_check.note_run(key, "torch")
            return fixed["_all"], "torch"
    return result, path


def backward(kind: str, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, layout: str, weight_shape,
             path: str, candidates: str, call: Callable[[str], tuple], ref64: Callable[[], tuple]) -> tuple:
    """``call(path)``'s gradients (dX, dA, dB, dbias[, d magnitude]; None where not needed) for the forward's path (or
    the later one a failed check moved the key to), checked on the first backward of the key (as :func:`forward`)."""
    key, device = gemm_choice.key(kind, x, lora_A, lora_B, layout), x.device
    path = self_check.current(key, gemm_choice.resolved(path, key))
    grads = call(path)
    if self_check.wanted(key, path, "backward", device):
        got = dict(zip(GRAD_NAMES, grads, strict=False))
        fixed = self_check.check(key, path, "backward", device, got,
                                 lambda: dict(zip(GRAD_NAMES, call("torch"), strict=False)),
                                 lambda: dict(zip(GRAD_NAMES, ref64(), strict=False)),
                                 {**describe(x, lora_A, lora_B, weight_shape),
                                  "candidates": tuple(candidates.split(","))})
        if fixed is not None:
            return tuple(fixed[name] for name in GRAD_NAMES[:len(grads)])
    return grads


def kernels_mask(seed: int, x: torch.Tensor, p: float) -> Callable[[], torch.Tensor | None]:
    """A function returning the kernels' boolean keep mask for (seed, x, p), made on first use only (the PyTorch path
    needs it; the kernels make their own)."""
    made: list[torch.Tensor | None] = []

    def mask() -> torch.Tensor | None:
        if not made:
            made.append(kernel_keep(seed, x, p))
        return made[0]

    return mask


def upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """fp64 copies for the self-check's reference (None stays None)."""
    return [None if t is None else t.double() for t in tensors]


def describe(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, weight_shape) -> dict:
    """Shapes and dtypes for the self-check's warning and report line."""
    return {"shapes": {"x": list(x.shape), "weight": list(weight_shape), "lora_A": list(lora_A.shape),
                       "lora_B": list(lora_B.shape)},
            "dtypes": {"x": str(x.dtype).removeprefix("torch."), "adapters": str(lora_A.dtype).removeprefix("torch.")}}
