"""The path table: per key, one record of everything decided about the calls of that key at run time.

A key is what changes which path is fastest or whether a path is right: the variant and base kind, the device, the
dtypes, the weight's layout, K, N, r, the token bucket, and whether the call has dropout and a bias
(``driver.key_of``). Its record (:class:`KeyState`) holds what ``auto`` timed and chose (``path_choice``), the path the
key runs now and the last it ran, the self-check's verdicts per path and check (``self_check``), the checks still owed
(a check made while B was zero), and the kernels that could not be built or launched on this device. ``report()``
(``fused_lora.path_report``) reads it; ``set_verify`` and ``clear`` act on it.

First calls of a key (timing, autotuning, the checks) run under one process-wide lock: two threads meeting a new key at
once (``nn.DataParallel`` runs one per GPU) must not race in triton's autotuner, whose benchmark state lives on the
shared kernel object, nor time or check each other's launches. The steady state takes no lock.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

VERIFY_ENV = "FUSED_LORA_VERIFY"
MODES = ("first", "always", "off")

LOCK = threading.RLock()


@dataclass
class KeyState:
    """What is known about one key (see the module docstring). ``passed``: (path, check) pairs checked and found
    right, so not checked again; ``owed``: check → what B (and DoRA's magnitude) was when it passed while they could
    not show the rank-r terms (B = 0, g = 1): checked again once they change; ``warm``: (path, check) that ran once,
    so that its kernels are tuned and compiled (a first call runs under the lock)."""

    timed: dict[str, float] = field(default_factory=dict)
    chosen: str | None = None
    demoted: str | None = None
    runs: str | None = None
    verified: dict[str, dict[str, dict]] = field(default_factory=dict)
    passed: set[tuple[str, str]] = field(default_factory=set)
    owed: dict[tuple[str, str], tuple] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    warm: set[tuple[str, str]] = field(default_factory=set)  # (path, check) that ran once: tuned, compiled
    # (the path the call asked for, check) → the path it runs, for calls that need nothing but their pass (warm, no
    # check due): the steady state's one lookup. Emptied by anything that changes a key's path or checks.
    steady: dict[tuple[str, str], str] = field(default_factory=dict)

    def as_report(self) -> dict:
        return {"timed": dict(self.timed), "chosen": self.chosen, "runs": self.runs, "demoted_to": self.demoted,
                "verified": {p: dict(v) for p, v in self.verified.items()},
                "owed": sorted(f"{p} {c}" for p, c in self.owed),
                "skipped": {f"{p} {c}": why for (p, c), why in self.skipped.items()},
                "kernel_failures": list(self.failures)}


_table: dict[str, KeyState] = {}


def entry(key: str) -> KeyState:
    """The record of ``key`` (made on first use)."""
    st = _table.get(key)
    if st is None:
        with LOCK:
            st = _table.setdefault(key, KeyState())
    return st


def get(key: str) -> KeyState | None:
    return _table.get(key)


def keys() -> list[str]:
    return sorted(_table)


def report() -> dict[str, dict]:
    """Per key: what ``auto`` timed (seconds per forward+backward, median) and chose, the path the key runs now
    (``runs``: its last call's; ``demoted_to``: where a failed check or a kernel failure moved it), each checked
    path's verdict per check (``ok``, the worst tensor, its error against fp64 and its bound), the checks still owed
    and those skipped (with why), and the kernels that failed to build or launch."""
    return {k: _table[k].as_report() for k in sorted(_table)}


_on_clear: list = []  # caches kept beside the table (the driver's keys), emptied with it


def clear() -> None:
    """Forget every timing, choice, check, demotion and failure of this process (the choices file, if any, is read
    again on next use)."""
    with LOCK:
        _table.clear()
        for forget in _on_clear:
            forget()


def unsettle() -> None:
    """Every key's steady state taken back (the verify mode changed: checks may be due again)."""
    with LOCK:
        for st in _table.values():
            st.steady.clear()


# ------------------------------------------------------------------------------------------------- verify mode

_mode: str | None = None  # set_verify's, else FUSED_LORA_VERIFY's (read once: this is asked on every call)
_mode_read = False


def set_verify(mode: str | None) -> None:
    """``"first"``, ``"always"`` or ``"off"`` for this process (over ``FUSED_LORA_VERIFY``); None: back to the
    environment variable (read again now), or the default (``first`` on CUDA, ``off`` elsewhere). Checks passed so far
    stay passed."""
    global _mode, _mode_read
    if mode is not None and mode not in MODES:
        raise ValueError(f"fused_lora.set_verify: mode={mode!r}; choose one of {MODES}")
    _mode, _mode_read = mode, mode is not None
    unsettle()


def verify_mode(device: torch.device) -> str:
    """The mode for a call on ``device``: ``set_verify``'s, else ``FUSED_LORA_VERIFY`` (read at the first call and after
    ``set_verify(None)``), else ``first`` on CUDA and ``off`` elsewhere (the interpreter's tests do the checking
    there)."""
    global _mode, _mode_read
    if not _mode_read:
        env = os.environ.get(VERIFY_ENV)
        if env is not None and env not in MODES:
            raise ValueError(f"fused_lora: {VERIFY_ENV}={env!r}; choose one of {MODES}")
        _mode, _mode_read = env, True
    if _mode is None:
        return "first" if device.type == "cuda" else "off"
    return _mode
