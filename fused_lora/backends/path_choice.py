"""``FUSED_LORA_GEMM=auto``: which path a key runs, chosen by timing the candidates on its first call.

The fused path folds the rank-r term into a Triton GEMM (one write of y, one of dX); the composed path runs the base
layer's own GEMM (cuBLAS, bitsandbytes) and adds the rank-r term in place (one more read and write of y and of dX); the
PyTorch path is a candidate too (fewer Python layers above fewer launches: at small shapes a GPU waits on the host, and
it can win). Which is fastest depends on the GPU and the shape, so the first call of a key times each candidate, a
forward and a backward as a training step runs them (the PyTorch path regenerating its dropout mask in both, as it
does), and keeps the fastest; every later call of the key, forward and backward, runs the kept choice.

What is timed is what a user waits for: wall time per forward+backward, back to back with the device synchronised only
at the ends of a sample, so that a host-bound path (its Python slower than its kernels) is timed by its host time and a
device-bound one by its kernels (``REPEATS`` samples of enough calls to span ``SAMPLE_S``; the median counts). Choices
can be kept across processes in a JSON file (``FUSED_LORA_GEMM_CACHE=path``, written atomically); triton keeps its own
autotuning results on disk beside its compiled kernels (``kernels/configs.py``), so a restart re-tunes nothing either.
Timings and choices are kept in the path table (``path_state``; ``fused_lora.path_report()`` shows them).

Timing uses the wall clock and the device's synchronisation; tests inject a timer (``set_timer``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..fallback import warn_fallback
from . import path_state
from .kernel_errors import KERNEL_FAILURES, first_line

CACHE_ENV = "FUSED_LORA_GEMM_CACHE"
WARMUP = 2  # untimed runs of each candidate (the first compiles and autotunes its kernels)
REPEATS = 7  # timed samples per candidate; the median counts
SAMPLE_S = 2e-3  # each sample runs the candidate enough times to span this (a single call is noise on a GPU)
MAX_CALLS_PER_SAMPLE = 64

Timer = Callable[[str, Callable[[], object], torch.device], float]
_timer: Timer | None = None
_loaded: dict[str, str] = {}  # the choices file's content, read once per path
_loaded_from: str | None = None


def set_timer(timer: Timer | None) -> None:
    """Replace the timer (``timer(path_name, fn, device) -> seconds for one call of fn``); None restores the wall
    clock."""
    global _timer
    _timer = timer


def clear() -> None:
    """Forget the choices file's content (read again on next use); the path table's choices go with
    ``path_state.clear``."""
    global _loaded_from
    _loaded.clear()
    _loaded_from = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(name: str, fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call of ``fn``: back-to-back calls, the device synchronised at the sample's ends only."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, int(SAMPLE_S / max(once, 1e-7))))
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _file() -> Path | None:
    path = os.environ.get(CACHE_ENV)
    return Path(path) if path else None


def _load() -> None:
    global _loaded_from
    path = _file()
    if path is None or _loaded_from == str(path):
        return
    _loaded_from = str(path)
    _loaded.clear()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no file yet, or not ours: decide again, and write a good one
    if isinstance(saved, dict):
        _loaded.update({k: v for k, v in saved.items() if isinstance(v, str)})


def _save() -> None:
    path = _file()
    if path is None:
        return
    choices = dict(_loaded)
    choices.update({k: st.chosen for k in path_state.keys() if (st := path_state.get(k)) and st.chosen})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            json.dump(choices, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # all or nothing: a reader never sees half a file
    except OSError:
        pass  # a cache that cannot be written is only a cache


def choices() -> dict[str, str]:
    """key → the path ``auto`` keeps for it (timed here, or read from the choices file)."""
    _load()
    out = dict(_loaded)
    out.update({k: st.chosen for k in path_state.keys() if (st := path_state.get(k)) and st.chosen})
    return out


def kept(key: str, st: path_state.KeyState) -> str | None:
    """The choice kept for ``key``: timed in this process, or read from the choices file."""
    if st.chosen is None:
        _load()
        st.chosen = _loaded.get(key)
    return st.chosen


def choose(key: str, st: path_state.KeyState, device: torch.device,
           candidates: dict[str, Callable[[], object]]) -> str:
    """The kept choice for ``key`` when it is still a candidate, or the fastest candidate (each run ``WARMUP`` times,
    then timed ``REPEATS`` times; a candidate whose kernels cannot be built or launched is recorded and left out),
    kept and written to the choices file. Without a device clock and without an injected timer (the interpreter on
    CPU) nothing is timed: the first candidate. Call under ``path_state.LOCK``."""
    choice = kept(key, st)
    if choice in candidates:
        return choice
    if _timer is None and device.type != "cuda":
        st.chosen = next(iter(candidates))
        return st.chosen
    timer = _timer or wall_time
    times = {}
    for name, run in candidates.items():
        try:
            with torch.no_grad():
                for _ in range(WARMUP):
                    run()
                samples = sorted(timer(name, run, device) for _ in range(REPEATS))
        except KERNEL_FAILURES as err:
            st.failures.append({"path": name, "direction": "timing", "error": first_line(err)})
            warn_fallback(f"a Triton kernel of the {name} path failed on {device} ({first_line(err)}); auto leaves "
                          "that path out for these shapes")
            continue
        times[name] = samples[len(samples) // 2]
    choice = min(times, key=times.get) if times else "torch"
    st.timed.update(times)
    st.chosen = choice
    _save()
    return choice
