"""The dropout seed (drawn on the host, one per call) and the PyTorch path's keep mask made from it.

No path stores a mask: each regenerates it from the seed where it is needed (forward, backward, a checkpointed
recompute). The Triton kernels draw theirs with Philox inside the kernels (``kernels/dropout.py``; the launcher that
writes it out is ``backends/dropout_triton.py``); the PyTorch path with a seeded ``torch.Generator`` (below). Each is
exact and reproducible from its seed; the two differ from each other.
"""

from __future__ import annotations

import threading

import torch

from .hardware import capturing


def draw_dropout_seed(device: torch.device | str | None = None) -> torch.Tensor:
    """A one-element int64 tensor seeding the dropout mask, drawn from PyTorch's generator of ``device`` (the CPU's
    when None).

    Drawing from PyTorch's generators makes runs reproducible under ``torch.manual_seed`` and lets
    ``torch.utils.checkpoint`` (which restores the RNG states before recomputing) replay the same mask. On a GPU the
    seed is drawn on the GPU and the kernels read it from device memory: no host sync, and under CUDA graph capture the
    draw belongs to the graph (PyTorch's CUDA generator is graph-safe), so each replay takes a new mask. It stays a
    tensor (no ``.item()``) so ``torch.compile`` traces it without a graph break.
    """
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def seed_tensor(p: float, dropout_seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The call's seed on ``device``: None without dropout, the given one (an int, or a one-element tensor), or a
    fresh draw (:func:`draw_dropout_seed`)."""
    if p == 0:
        return None
    if dropout_seed is None:
        return draw_dropout_seed(device)
    if not isinstance(dropout_seed, torch.Tensor) or dropout_seed.device != device:
        _refuse_host_seed_in_capture(dropout_seed, device)
    if isinstance(dropout_seed, torch.Tensor):
        return dropout_seed.reshape(1).to(device, torch.int64)
    return torch.tensor([int(dropout_seed)], dtype=torch.int64, device=device)


def _refuse_host_seed_in_capture(dropout_seed, device: torch.device) -> None:
    """A seed on the host must be copied to the GPU (a synchronising copy, illegal during CUDA graph capture), and a
    captured graph would replay that one seed, hence one mask, forever."""
    if capturing():
        what = "an int" if not isinstance(dropout_seed, torch.Tensor) else f"a tensor on {dropout_seed.device}"
        raise RuntimeError(f"fused_lora: dropout_seed is {what} while a CUDA graph is being captured on {device}: "
                           "copying it to the GPU synchronises (illegal during capture) and every replay would reuse "
                           "its one mask. Leave dropout_seed=None (the layer draws the seed on the GPU, part of the "
                           "graph: each replay a new mask), or pass a one-element int64 tensor on the GPU")


def seed_value(seed: torch.Tensor | int | None) -> int:
    """The seed as a Python int, for the PyTorch path's Generator (a ``.item()`` for a tensor: a host sync on a GPU,
    read once per call; the Triton path never reads it on the host)."""
    if seed is None:
        return 0
    return seed if isinstance(seed, int) else int(seed.item())


def drop_scale(p: float) -> float:
    """1/(1-p), the scale of kept values; 0 at p = 1 (everything dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


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


_local = threading.local()  # one Generator per thread and device: re-seeded per call, never shared mid-draw


def _generator(device: torch.device) -> torch.Generator:
    gens = getattr(_local, "generators", None)
    if gens is None:
        gens = _local.generators = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen


def keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The PyTorch path's boolean keep mask for ``seed``: 64-bit random words from a seeded Generator, cut into four
    16-bit lanes, kept where a lane is >= round(p·65536) - 32768.

    One RNG draw feeds four elements: 4.3 ms for 2048×1024 on this project's 2-core CPU, against 8.9 ms
    for ``rand`` + ``ge_`` and 23 ms for ``bernoulli_`` (bench/results/cpu-2026-11-24/NOTES.md), and it
    runs twice per step (forward and backward). The drop probability is p rounded to a multiple of
    1/65536 (|error| <= 7.6e-6); the kept values are scaled by exactly 1/(1-p), as nn.Dropout does. The Generator
    is reused (one per thread and device, re-seeded each call: constructing one cost ~1 µs a call).
    """
    gen = _generator(device)
    gen.manual_seed(generator_seed(seed))
    n = shape[0] * shape[1]
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen, device=device)
    lanes = words.view(torch.int16)
    if lanes.numel() != n:
        lanes = lanes[:n]
    return lanes.view(shape) >= round(p * 65536) - 32768


def scaled_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The PyTorch path's scaled keep mask (fp32, 0 or 1/(1-p)) for ``seed``; M×K."""
    return keep_mask(seed, shape, p, device).float().mul_(1.0 / (1.0 - p))
