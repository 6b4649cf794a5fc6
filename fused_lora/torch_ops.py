"""The pure-PyTorch backend: same semantics as the Triton kernels, for CPU tensors (and anywhere a
user forces it).

Like the kernels it keeps no M×K tensor beside x for backward: the dropout mask is regenerated from a
seeded ``torch.Generator`` in backward (once, shared by dX and dA) instead of saving the mask or the
dropped copy of x as PEFT does. The base GEMM and the rank-r update are chained with in-place
``addmm_`` so y is written once when the adapters share x's dtype. The base is any layer of ``base_ops``
(dense, or bitsandbytes 4/8-bit): ``forward``/``backward`` are the dense case.
"""

from __future__ import annotations

import torch

from .base_ops import DenseBase


def generator_seed(seed: int) -> int:
    """The 32-bit seed of the Generator for a 64-bit dropout seed.

    The CPU Generator's Mersenne Twister keeps only the low 32 bits of what ``manual_seed`` gets, so seeds
    that differ above bit 31 would share a mask. The high word is hashed (splitmix64's finalizer) into the
    low one; seeds in [0, 2**32), every seed the layer draws itself, map to themselves. A 32-bit state can
    still not tell every pair of 64-bit seeds apart (the kernels' Philox key uses all 64 bits).
    """
    seed &= 2**64 - 1
    low, high = seed & 0xFFFFFFFF, seed >> 32
    if high == 0:
        return low
    z = (high * 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return low ^ ((z ^ (z >> 31)) & 0xFFFFFFFF)


def keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask for ``seed``: 64-bit random words from a seeded Generator, cut into four 16-bit
    lanes, kept where a lane is >= round(p·65536) - 32768.

    One RNG draw feeds four elements: 4.3 ms for 2048×1024 on this project's 2-core CPU, against 8.9 ms
    for ``rand`` + ``ge_`` and 23 ms for ``bernoulli_`` (bench/results/cpu-2026-11-24/NOTES.md), and it
    runs twice per step (forward and backward). The drop probability is p rounded to a multiple of
    1/65536 (|error| <= 7.6e-6); the kept values are scaled by exactly 1/(1-p), as nn.Dropout does.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(generator_seed(seed))
    n = shape[0] * shape[1]
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen, device=device)
    return words.view(torch.int16)[:n].view(shape) >= round(p * 65536) - 32768


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The scaled keep mask (fp32, 0 or 1/(1-p)) this backend uses for ``seed``; M×K."""
    return keep_mask(seed, shape, p, device).float().mul_(1.0 / (1.0 - p))


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # x · keep, not torch.where(keep, x, 0): a NaN/Inf at a dropped element stays NaN (NaN·0), as in the
    # reference, the kernels and nn.Dropout. Single-threaded at 2048×1024 fp32: 2.3 ms, where's 2.9 ms.
    return x * keep


def composed_forward(
    x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float, seed: int,
    *, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) + scaling · dropout(x) Aᵀ Bᵀ for any base of ``base_ops`` (its ``forward`` is the layer's own).
    Returns (y M×N in the base's output dtype, S = dropout(x) Aᵀ M×r in the adapters' dtype). ``keep``: a boolean
    keep mask to use instead of this backend's own (the kernels' mask, when a kernel failed and this path stands
    in)."""
    y = base.forward(x)
    x_a = x.to(lora_A.dtype)
    if p == 0:
        s = x_a @ lora_A.t()
    else:
        # (keep ⊙ x) Aᵀ / (1-p): the 1/(1-p) goes on the M×r result, not on an M×K tensor.
        x_d = _masked(x_a, keep if keep is not None else keep_mask(seed, tuple(x.shape), p, x.device))
        s = (x_d @ lora_A.t()).mul_(1.0 / (1.0 - p))
    if lora_B.dtype == y.dtype:
        y.addmm_(s, lora_B.t(), alpha=scaling)
    else:  # fp32 adapters on a half base: the update is computed in fp32, then rounded once (as PEFT)
        y.add_((s @ lora_B.t()).mul_(scaling).to(y.dtype))
    return y, s


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str, gemm: str = "",
    *, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`composed_forward` on a dense weight (either layout); ``gemm`` is the kernels' choice, ignored here."""
    return composed_forward(x, DenseBase(weight, bias, weight_layout), lora_A, lora_B, scaling, p, seed, keep=keep)


def composed_backward(
    dy: torch.Tensor, x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, p: float, seed: int,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, *, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Returns (dX, dA, dB, dbias), None where not needed: dX is the base's input gradient with m ⊙ (dS A) added in
    place. The mask is regenerated once, for dA and dX (or ``keep`` is used, as in :func:`composed_forward`)."""
    dx = da = db = dbias = None
    dy_lora = dy.to(lora_B.dtype)
    if need_db:
        db = (dy_lora.t() @ s.to(lora_B.dtype)).mul_(scaling)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    if not (need_dx or need_da):
        return dx, da, db, dbias
    ds = (dy_lora @ lora_B).mul_(scaling)
    if p > 0 and keep is None:
        keep = keep_mask(seed, tuple(x.shape), p, x.device)
    elif p == 0:
        keep = None
    drop_scale = 1.0 / (1.0 - p)
    if need_da:
        x_a = x.to(lora_A.dtype)
        da = ds.t() @ x_a if keep is None else (ds.t() @ _masked(x_a, keep)).mul_(drop_scale)
    if need_dx:
        dx = base.input_grad(dy, x.dtype)
        if keep is None and lora_A.dtype == dx.dtype:
            dx.addmm_(ds, lora_A)
        elif keep is None:
            dx.add_((ds @ lora_A).to(dx.dtype))
        else:
            dx.add_(_masked(ds @ lora_A, keep).to(dx.dtype), alpha=drop_scale)
    return dx, da, db, dbias


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, gemm: str = "",
    *, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """:func:`composed_backward` on a dense weight (either layout)."""
    return composed_backward(dy, x, DenseBase(weight, None, weight_layout), lora_A, lora_B, s, scaling, p, seed,
                             need_dx, need_da, need_db, need_dbias, keep=keep)
