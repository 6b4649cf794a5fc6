"""Launcher of ``kernels/dropout.py``: the kernels' dropout mask written out, for users, tests, the differentiable
backward and the PyTorch path standing in for a kernel (which must apply the kernels' own mask)."""

from __future__ import annotations

import torch

from ..call import Seed
from ..kernels.dropout import dropout_mask_kernel
from .fast_launch import LaunchSite
from .triton_launch import Fresh, cdiv, drop_args, on_device, remember, wide_offsets

_sites: dict[tuple, LaunchSite] = {}
_BLOCK = 32


def dropout_mask(seed: Seed, shape: tuple[int, int], p: float, device: torch.device,
                 row_start: int = 0) -> torch.Tensor:
    """The scaled keep mask (fp32, 0 or 1/(1-p)) the kernels use for ``seed``; M×K: rows ``row_start`` …
    ``row_start + M − 1`` of x's mask (the mask is a function of (seed, row, column) alone)."""
    M, K = shape
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out
    key = (M, K, device, row_start + M > 2**31 - 1)
    site = _sites.get(key)
    if site is None:
        wide = wide_offsets(Fresh((M, K))) or row_start + M > 2**31 - 1
        site = remember(_sites, key, LaunchSite((cdiv(M, _BLOCK), cdiv(K, _BLOCK)),
                                                dict(WIDE=wide, BLOCK_M=_BLOCK, BLOCK_K=_BLOCK), device))
    with on_device(device):  # a call of its own (the masks' users, the PyTorch path standing in for a kernel)
        site.launch(dropout_mask_kernel, (out, M, K, K, 1, *drop_args(seed, p, device), row_start))
    return out
