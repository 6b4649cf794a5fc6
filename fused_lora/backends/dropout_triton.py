"""Launcher of ``kernels/dropout.py``: the kernels' dropout mask written out, for users, tests, the differentiable
backward and the PyTorch path standing in for a kernel (which must apply the kernels' own mask)."""

from __future__ import annotations

import torch

from ..kernels.dropout import dropout_mask_kernel
from .triton_launch import cdiv, drop_args, on_device, wide_offsets


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device, row_start: int = 0) -> torch.Tensor:
    """The scaled keep mask (fp32, 0 or 1/(1-p)) the kernels use for ``seed``; M×K: rows ``row_start`` …
    ``row_start + M − 1`` of x's mask (the mask is a function of (seed, row, column) alone)."""
    M, K = shape
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out
    block = 32
    grid = (cdiv(M, block), cdiv(K, block))
    with on_device(device):
        dropout_mask_kernel[grid](out, M, K, out.stride(0), out.stride(1), *drop_args(seed, p, device), row_start,
                                  WIDE=wide_offsets(out) or row_start + M > 2**31 - 1, BLOCK_M=block, BLOCK_K=block)
    return out
