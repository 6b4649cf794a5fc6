"""``FUSED_LORA_GEMM=auto``: which base GEMM the Triton backend runs, chosen by timing the candidates on first use.
The one mechanism for every variant and base kind (dense LoRA, 4-bit LoRA, DoRA): the router says ``auto``, and the
first forward of a key resolves it here (:func:`resolve`), at run time (also inside ``torch.compile``'s custom ops).

The fused path folds the rank-r term into a Triton GEMM (one write of y, one of dX); the composed path runs
cuBLAS's GEMM and adds the rank-r term in place (one more read and write of y and of dX). Which is faster depends on
the GPU and the shape: on an H100 a pointer-load Triton GEMM typically trails cuBLAS by 10-30 % while the fusion
saves only the rank-r update's M×N pass (bench/traffic_model.py). So the first forward of a key (variant and base,
device, dtypes, layout, K, N, rank, token bucket) runs each candidate a few times and keeps the fastest; every later
call, forward and backward, takes the kept choice (a dict lookup). Choices can be kept across processes in a JSON file
(``FUSED_LORA_GEMM_CACHE=path``), written atomically.

Timing uses CUDA events by default; tests inject a timer (``set_timer``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..hardware import device_name
from ..kernels.configs import m_bucket

CACHE_ENV = "FUSED_LORA_GEMM_CACHE"
REPEATS = 3  # timed runs of each path after one warm-up (which also compiles and autotunes the kernels)

_choices: dict[str, str] = {}
_times: dict[str, dict[str, float]] = {}  # key → candidate → seconds (median), for self_check.report()
_loaded_from: str | None = None
_timer: Callable[[str, Callable[[], object], torch.device], float] | None = None
_keys: dict[tuple, str] = {}  # (kind, device, dtypes, layout, K, N, R, M bucket) → key(): its string made once


def key(kind: str, x2d: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, layout: str) -> str:
    """The decision's key: what changes which path is faster (a string, for the JSON file). ``kind``: the variant and
    base ("lora", "lora-bnb-4bit", "dora"). Made once per shape and kept (this runs on every Triton-path call)."""
    parts = (kind, x2d.device, x2d.dtype, lora_A.dtype, layout, x2d.shape[1], lora_B.shape[0], lora_A.shape[0],
             m_bucket(x2d.shape[0]))
    k = _keys.get(parts)
    if k is None:
        kind, device, dtype, adapter_dtype, layout, K, N, R, M = parts
        k = _keys[parts] = (f"{kind}|{device_name(device)}|{str(dtype).removeprefix('torch.')}"
                            f"|{str(adapter_dtype).removeprefix('torch.')}|{layout}|K{K}|N{N}|R{R}|M{M}")
    return k


def set_timer(timer: Callable[[str, Callable[[], object], torch.device], float] | None) -> None:
    """Replace the timer (``timer(path_name, fn, device) -> seconds`` for one call of fn); None restores CUDA
    events."""
    global _timer
    _timer = timer


def clear() -> None:
    """Forget every choice made in this process (the file, if any, is read again on next use)."""
    global _loaded_from
    _choices.clear()
    _times.clear()
    _loaded_from = None


def choices() -> dict[str, str]:
    """key → the path ``auto`` keeps for it (timed here, or read from the cache file)."""
    _load()
    return dict(_choices)


def times() -> dict[str, dict[str, float]]:
    """key → candidate → median seconds, for the keys timed in this process."""
    return {k: dict(v) for k, v in _times.items()}


def _cuda_time(name: str, fn: Callable[[], object], device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(torch.cuda.current_stream(device))
    fn()
    end.record(torch.cuda.current_stream(device))
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _file() -> Path | None:
    path = os.environ.get(CACHE_ENV)
    return Path(path) if path else None


def _load() -> None:
    global _loaded_from
    path = _file()
    if path is None or _loaded_from == str(path):
        return
    _loaded_from = str(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no file yet, or not ours: decide again, and write a good one
    if isinstance(saved, dict):
        _choices.update({k: v for k, v in saved.items() if isinstance(v, str) and k not in _choices})


def _save() -> None:
    path = _file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            json.dump(_choices, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # all or nothing: a reader never sees half a file
    except OSError:
        pass  # a cache that cannot be written is only a cache


def cached(k: str) -> str | None:
    """The choice kept for key ``k``, if any (the backward looks its forward's choice up)."""
    _load()
    return _choices.get(k)


def choose(k: str, device: torch.device, candidates: dict[str, Callable[[], object]]) -> str:
    """The kept choice for ``k`` (when it is still a candidate), or, on first use, the fastest candidate (each run
    once to warm up, then ``REPEATS`` times; the median counts), kept and written to the cache file. Without CUDA events
    and without an injected timer (the interpreter on CPU) nothing is timed: the first candidate."""
    choice = cached(k)
    if choice in candidates:
        return choice
    if _timer is None and device.type != "cuda":
        return next(iter(candidates))
    timer = _timer or _cuda_time
    times = {}
    for name, run in candidates.items():
        run()  # warm-up: compiles and autotunes the kernels of this path
        samples = sorted(timer(name, run, device) for _ in range(REPEATS))
        times[name] = samples[len(samples) // 2]
    choice = min(times, key=times.get)
    _choices[k] = choice
    _times[k] = times
    _save()
    return choice


def resolve(gemm: str, k: str, device: torch.device, run: Callable[[str], object], names: tuple[str, ...]) -> str:
    """``gemm`` itself, or for ``"auto"`` the kept or timed choice among ``names`` for the key ``k``; ``run(name)``
    runs that path once on the call's inputs (no autograd: the timing runs are not part of the graph)."""
    if gemm != "auto":
        return gemm
    with torch.no_grad():
        return choose(k, device, {name: (lambda n=name: run(n)) for name in names})


def resolved(gemm: str, k: str) -> str:
    """The backward's view of ``gemm``: for ``"auto"``, the choice its forward made for this key (``"fused"`` when
    none is kept: the interpreter)."""
    if gemm != "auto":
        return gemm
    return cached(k) or "fused"
