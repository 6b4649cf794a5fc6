"""The dropout mask of a call, for every variant and backend, in one place.

No path stores a mask: the kernels regenerate theirs with Philox from the call's seed (``kernels/dropout.py``), the
PyTorch backend from a seeded Generator (``dropout.keep_mask``). Where a mask must exist as a tensor, it comes from
here: the PyTorch path standing in for the kernels (it must apply the kernels' mask, so that a forward on one path and
a backward on another agree), ``backward(create_graph=True)`` (plain differentiable ops with the forward's mask), the
self-check, and the user's ``fused_lora.dropout_mask``.
"""

from __future__ import annotations

import torch

from ..dropout import keep_mask
from ..dropout import seed_value as _seed_value
from .dropout_triton import dropout_mask
from .kernel_errors import KERNEL_FAILURES

__all__ = ["keep", "keep_rows", "scaled"]


def keep(backend: str, seed: torch.Tensor | int | None, shape: tuple[int, int], p: float,
         device: torch.device) -> torch.Tensor | None:
    """The boolean keep mask (M×K) ``backend`` applies for ``seed``: None without dropout, all False at p = 1."""
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=torch.bool)
    if backend == "triton":
        return _kernels_mask(seed, shape, p, device) > 0
    return keep_mask(_seed_value(seed), tuple(shape), p, device)


def keep_rows(backend: str, seed: torch.Tensor | int | None, row_start: int, rows: int, K: int, p: float,
              device: torch.device) -> torch.Tensor | None:
    """Rows ``row_start`` … ``row_start + rows − 1`` of :func:`keep` for an x of ``K`` columns (the self-check reads a
    few rows at a time: the whole M×K mask would grow with M). The kernels' mask only: the PyTorch backend's Generator
    draws a whole mask at once."""
    if backend != "triton":
        raise ValueError("masks.keep_rows: the PyTorch backend's mask is drawn whole (masks.keep)")
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros((rows, K), device=device, dtype=torch.bool)
    return _kernels_mask(seed, (rows, K), p, device, row_start) > 0


def scaled(backend: str, seed: torch.Tensor | int | None, shape: tuple[int, int], p: float,
           device: torch.device) -> torch.Tensor | None:
    """The scaled keep mask (fp32: 0 or 1/(1-p), all zeros at p = 1) ``backend`` applies for ``seed``; None when
    p = 0."""
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    if backend == "triton":
        return _kernels_mask(seed, shape, p, device)
    return keep_mask(_seed_value(seed), tuple(shape), p, device).float().mul_(1.0 / (1.0 - p))


def _kernels_mask(seed, shape, p, device, row_start: int = 0) -> torch.Tensor:
    try:
        return dropout_mask(seed, tuple(shape), p, device, row_start)
    except KERNEL_FAILURES as err:
        raise RuntimeError(
            f"fused_lora: the Triton kernels cannot run on {device} (even the dropout-mask kernel failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Run the PyTorch path: "
            "FUSED_LORA_BACKEND=torch (or backend='torch')") from err
