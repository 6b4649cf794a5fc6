"""The first-call self-check (``FUSED_LORA_VERIFY=first|always|off``): a Triton path's first forward and first backward
of each key are computed again on the PyTorch path and compared, so that a GPU nobody here has tested cannot train a
model silently wrong.

For a key (variant and base, device, dtypes, layout, K, N, r, token bucket, path) the check runs the same call on the
PyTorch path with the same inputs and the kernels' own dropout mask, in the same dtypes and in fp64, and applies the
tests' rule to the output (forward) and to every gradient (backward: dX, dA, dB, dbias, DoRA's magnitude):

    |path − fp64| ≤ 2 · |PyTorch same-dtype − fp64| + atol        (max norms; atol = eps(dtype) · max|fp64|)

and a NaN or Inf where fp64 has none is a mismatch. On a mismatch the call returns the PyTorch path's result, one
``FallbackWarning`` names the GPU, its compute capability, the triton and torch versions, the path, shapes, dtypes, the
worst tensor and its error against the bound, the key moves to the next path (fused → composed → PyTorch) for the rest
of the process, and with ``FUSED_LORA_VERIFY_REPORT=<file>`` one JSON line with all of that is appended. A key that
passed is not checked again (``first``, the default on CUDA): the steady state costs a set lookup. ``always`` checks
every call (debugging); ``off`` nothing (the default off CUDA, where the interpreter's tests do the checking). The
environment variable is read at the first call; ``set_verify()`` changes the mode at run time.

``report()`` says, per key, what was timed (``gemm_choice``), chosen and verified.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable

import torch
import triton

from ..fallback import warn_fallback
from ..hardware import device_capability, device_name
from . import gemm_choice

VERIFY_ENV = "FUSED_LORA_VERIFY"
REPORT_ENV = "FUSED_LORA_VERIFY_REPORT"
MODES = ("first", "always", "off")
PATH_ORDER = ("fused", "composed", "torch")
FACTOR = 2.0  # the tests' rule: at most twice the PyTorch same-dtype error against fp64 …
ATOL_EPS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # … plus eps(dtype) · max|fp64|

_mode: str | None = None  # set_verify's, else FUSED_LORA_VERIFY's (read once: this is asked on every call)
_mode_from_env = False
_passed: set[tuple[str, str, str]] = set()  # (key, path, direction) checked and found right
_demoted: dict[str, str] = {}  # key → the path a failed check moved it to
_ran: dict[str, str] = {}  # key → the path its last forward ran
_verdicts: dict[str, dict[str, dict[str, dict]]] = {}  # key → path → direction → {ok, worst, error, bound}


def set_verify(mode: str | None) -> None:
    """``"first"``, ``"always"`` or ``"off"`` for this process (over ``FUSED_LORA_VERIFY``); None: back to the
    environment variable (read again now), or the default (``first`` on CUDA, ``off`` elsewhere)."""
    global _mode, _mode_from_env
    if mode is not None and mode not in MODES:
        raise ValueError(f"fused_lora.set_verify: mode={mode!r}; choose one of {MODES}")
    _mode, _mode_from_env = mode, False


def verify_mode(device: torch.device) -> str:
    """The mode for a call on ``device``: ``set_verify``'s, else ``FUSED_LORA_VERIFY`` (read at the first call and
    after ``set_verify(None)``), else ``first`` on CUDA and ``off`` elsewhere."""
    global _mode, _mode_from_env
    if _mode is None and not _mode_from_env:
        env = os.environ.get(VERIFY_ENV)
        if env is not None and env not in MODES:
            raise ValueError(f"fused_lora: {VERIFY_ENV}={env!r}; choose one of {MODES}")
        _mode, _mode_from_env = env, True
    if _mode is None:
        return "first" if device.type == "cuda" else "off"
    return _mode


def wanted(key: str, path: str, direction: str, device: torch.device) -> bool:
    """Whether this call of ``path`` must be checked (the PyTorch path itself is the reference: never)."""
    if path == "torch":
        return False
    mode = _mode if _mode is not None and _mode_from_env is False else verify_mode(device)  # set_verify's: no call
    return mode == "always" or (mode == "first" and (key, path, direction) not in _passed)


def current(key: str, path: str) -> str:
    """``path``, or the later path ``key`` was moved to by a failed check."""
    moved = _demoted.get(key)
    if moved is None or PATH_ORDER.index(moved) <= PATH_ORDER.index(path):
        return path
    return moved


def note_run(key: str, path: str) -> None:
    _ran[key] = path


def clear() -> None:
    """Forget every check and demotion of this process (tests)."""
    _passed.clear()
    _demoted.clear()
    _verdicts.clear()
    _ran.clear()


def report() -> dict[str, dict]:
    """Per key: the candidates ``auto`` timed (seconds, median) and its choice, the path the key runs now, and each
    checked path's verdict per direction (``ok``, the worst tensor, its error against fp64 and its bound)."""
    times, choices = gemm_choice.times(), gemm_choice.choices()
    keys = set(times) | set(_verdicts) | set(_ran)
    return {k: {"timed": times.get(k, {}), "chosen": choices.get(k), "runs": _ran.get(k),
                "verified": _verdicts.get(k, {})} for k in sorted(keys)}


def _finite_where_reference_is(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.isfinite(got[torch.isfinite(ref)]).all())


def compare(got: dict[str, torch.Tensor | None], same: dict[str, torch.Tensor | None],
            ref: dict[str, torch.Tensor | None]) -> tuple[bool, str, float, float]:
    """(all within the rule, worst tensor, its error, its bound); the worst is the largest error/bound ratio."""
    worst = ("", 0.0, 0.0, -1.0)
    for name, g in got.items():
        if g is None:
            continue
        s, r = same[name].double(), ref[name].double()
        g64 = g.double()
        finite = torch.isfinite(r)
        if not _finite_where_reference_is(g64, r):
            return False, name, float("inf"), 0.0
        if not finite.any():
            continue
        err = (g64 - r)[finite].abs().max().item()
        base = (s - r)[finite].abs().max().item()
        scale = r[finite].abs().max().item()
        bound = FACTOR * base + ATOL_EPS.get(g.dtype, 1e-6) * scale
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        if ratio > worst[3]:
            worst = (name, err, bound, ratio)
    return worst[3] <= 1.0, worst[0], worst[1], worst[2]


def check(key: str, path: str, direction: str, device: torch.device, got: dict[str, torch.Tensor | None],
          same: Callable[[], dict[str, torch.Tensor | None]], ref64: Callable[[], dict[str, torch.Tensor | None]],
          describe: dict[str, object]) -> dict[str, torch.Tensor | None] | None:
    """Checks ``got`` (the path's results of this call) against ``same()`` (the PyTorch path, same dtypes, the kernels'
    mask) and ``ref64()`` (the same in fp64). Returns None when they agree, else ``same()``'s results, to be returned
    instead, after the warning, the demotion of ``key`` and the report line."""
    with torch.no_grad():
        same_results, ref_results = same(), ref64()
        ok, worst, err, bound = compare(got, same_results, ref_results)
    _verdicts.setdefault(key, {}).setdefault(path, {})[direction] = {"ok": ok, "worst": worst, "error": err,
                                                                       "bound": bound}
    if ok:
        _passed.add((key, path, direction))
        return None
    nxt = PATH_ORDER[PATH_ORDER.index(path) + 1:]
    candidates = describe.get("candidates", PATH_ORDER)
    moved = next((p for p in nxt if p in candidates), "torch")
    _demoted[key] = moved
    capability = device_capability(device)
    record = {
        "gpu": device_name(device), "capability": None if capability is None else f"{capability[0]}.{capability[1]}",
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "key": key, "path": path, "direction": direction, "moved_to": moved, "worst": worst, "error": err,
        "bound": bound, **{k: v for k, v in describe.items() if k != "candidates"},
    }
    warn_fallback(f"the {path} path's {direction} on {record['gpu']} (compute capability {record['capability']}, "
                  f"triton {record['triton']}, torch {record['torch']}) disagrees with the PyTorch path for {key} "
                  f"(shapes {describe.get('shapes')}, dtypes {describe.get('dtypes')}): {worst} error {err:.3g} > "
                  f"bound {bound:.3g}; this call returns the PyTorch path's result and this key runs the {moved} path "
                  "from now on. Please report it with this message")
    path_file = os.environ.get(REPORT_ENV)
    if path_file:
        try:
            with open(path_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError:
            pass  # a report that cannot be written must not stop training; the warning has said it all
    return same_results
