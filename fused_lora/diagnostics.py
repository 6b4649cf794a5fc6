"""Diagnostics and switches: what ran, how to choose it, and the references every path is tested against.

    import fused_lora.diagnostics as diag
    diag.path_report()          # per shape key: what auto timed and chose, the path it runs, the self-check's verdicts
    diag.set_verify("always")   # the self-check: "first" (default on CUDA), "always", "off"
    diag.clear()                # forget timings, choices, checks, demotions and kernel failures (tests, benchmarks)

Switches by environment variable (read per call unless said otherwise):

| variable | values | what |
|---|---|---|
| ``FUSED_LORA_BACKEND`` | auto, triton, torch | the backend (``resolve_backend``) |
| ``FUSED_LORA_GEMM`` | auto, fused, composed | the Triton path; auto times them and the PyTorch path once per shape |
| ``FUSED_LORA_GEMM_CACHE`` | a file path | keep auto's choices across processes (JSON, written atomically) |
| ``FUSED_LORA_VERIFY`` | first, always, off | the self-check (read at the first call; ``set_verify`` overrides) |
| ``FUSED_LORA_VERIFY_REPORT`` | a file path | one JSON line per failed check |
| ``FUSED_LORA_NATIVE`` | 0 | never take the PyTorch backend's native-ops shortcut (tests that mean the Function) |
| ``FUSED_LORA_AUTOTUNE`` | 0 | one launch config per kernel, no autotuning (read at import) |

References (plain PyTorch, same signatures as the fused calls): ``lora_linear_ref``, ``dora_ref``; the dropout mask a
backend applies for a seed: ``dropout_mask``; the seed a layer draws: ``draw_dropout_seed``.
"""

from __future__ import annotations

from .backends import path_choice, path_state
from .backends.path_state import set_verify, verify_mode
from .dispatch import BACKENDS, GEMM_MODES, resolve_backend, resolve_gemm, route
from .dropout import draw_dropout_seed
from .functional import dropout_mask
from .reference import dora_ref, lora_linear_ref

__all__ = ["BACKENDS", "GEMM_MODES", "clear", "dora_ref", "draw_dropout_seed", "dropout_mask", "lora_linear_ref",
           "path_report", "resolve_backend", "resolve_gemm", "route", "set_verify", "verify_mode"]


def path_report() -> dict[str, dict]:
    """Per key (variant and base kind, GPU, dtypes, layout, K, N, r, token bucket, dropout, bias): ``timed`` (auto's
    seconds per forward+backward per candidate), ``chosen``, ``runs`` (the path its last call ran), ``demoted_to``,
    ``verified`` (per path and check: ok, the worst tensor, its error and bound), ``owed`` (checks to make again once B
    has changed), ``skipped`` (checks that could not run, with why) and ``kernel_failures``."""
    return path_state.report()


def clear() -> None:
    """Forget every timing, choice, check, demotion and kernel failure of this process (the choices file is read again
    on next use)."""
    path_state.clear()
    path_choice.clear()
