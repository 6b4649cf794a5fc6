"""The self-check (``FUSED_LORA_VERIFY=first|always|off``): a Triton path's first calls of each key are computed again
by the PyTorch path and compared, so that a GPU nobody here has tested cannot train a model silently wrong.

What is compared, for a call that ran ``path`` (``autograd/driver.py`` runs it; this module holds the pieces):

- forward: the rows in :func:`row_blocks` of y (and of DoRA's P), S on those rows, DoRA's row norms; backward: dX on
  those rows, and dA, dB, dbias, DoRA's d magnitude in full. Each against the PyTorch path in the same dtypes and in
  fp64, with the kernels' own dropout mask, by the tests' rule:

      |path − fp64| ≤ 2 · |PyTorch same-dtype − fp64| + atol        (max norms; atol = eps(dtype) · max|fp64|)

  A NaN or Inf where fp64 is finite is a fault only where the same-dtype PyTorch result is finite too: fp16 overflows
  (GradScaler's first steps overflow on purpose) are PyTorch's as much as the kernels'.
- The references recompute S (and everything else but DoRA's P, which the forward's check checked) from x, never take
  the path's own saved tensors.
- A composed path computes the base layer's output with the layer itself (cuBLAS, bitsandbytes) and adds the rank-r
  term: the references replay the base output the call produced (``Recording``/``replayed``), so what is checked is the
  rank-r term alone, and a quantized base's own error (LLM.int8 rounds the activations) cannot hide a wrong one.
  A fused path computes the base GEMM itself: its reference is the dense fp64 GEMM on the (dequantized) weight
  (:class:`Dense64`, read in slices of rows).
- Bounded: y, P and dX on at most ``3 · ROW_BLOCK`` rows (rows are independent: the first rows, some in the middle,
  the last, ragged tile included); the reductions over M (dA, dB, dbias, d magnitude) in chunks of rows, so the
  extra memory is O(ROW_BLOCK · (N + K) + CHUNK_ELEMENTS) elements whatever M is, and the fp64 work is the sampled rows'
  GEMMs plus O(M · r · (N + K)) for the reductions (bench/results/cpu-2026-12-06/self_check/ has the measurements).
  An out-of-memory error in a check skips that check with one warning: a check never fails a step.
- What B = 0 hides: PEFT's default init sets B = 0, which zeroes the rank-r term of y, dS, dA and dX's masked term on
  the first steps, and DoRA starts at g = 1, which zeroes its (g − 1) terms. A check made then owes another: the key is
  checked again once B (or the magnitude) has changed (``owed``), so every kernel term is seen before it can change a
  result.

On a mismatch the call returns the PyTorch path's result, one ``FallbackWarning`` names the GPU, its compute
capability, the triton and torch versions, the path, shapes, dtypes, the worst tensor and its error against the bound,
the key moves to the next path (fused → composed → PyTorch) for the rest of the process, and with
``FUSED_LORA_VERIFY_REPORT=<file>`` one JSON line with all of that is appended.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

import torch
import triton

from ..fallback import warn_fallback
from ..hardware import device_capability, device_name
from . import path_state

REPORT_ENV = "FUSED_LORA_VERIFY_REPORT"
FACTOR = 2.0  # the tests' rule: at most twice the PyTorch same-dtype error against fp64 …
ATOL_EPS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # … plus eps(dtype) · max|fp64|
ROW_BLOCK = 64  # rows per sampled block (three blocks: first, middle, last)
CHUNK_ELEMENTS = 1 << 20  # a reduction chunk's rows × max(K, N), a weight slice: 8 MiB per fp64 tensor


def row_blocks(m: int) -> list[slice]:
    """The rows whose y, P and dX are checked: all of them up to three blocks' worth, else the first ``ROW_BLOCK``
    rows, ``ROW_BLOCK`` in the middle and the last ``ROW_BLOCK`` (the ragged last tile of any tile height)."""
    if m <= 3 * ROW_BLOCK:
        return [slice(0, m)]
    mid = (m // 2) - ROW_BLOCK // 2
    return [slice(0, ROW_BLOCK), slice(mid, mid + ROW_BLOCK), slice(m - ROW_BLOCK, m)]


def row_chunks(m: int, width: int) -> list[slice]:
    """Slices of ``m`` rows, each of about ``CHUNK_ELEMENTS / width`` rows, for the reductions over M."""
    step = max(ROW_BLOCK, CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)] or [slice(0, 0)]


def take_rows(t: torch.Tensor | None, blocks: list[slice]) -> torch.Tensor | None:
    """The rows ``blocks`` of a 2-D tensor, as one tensor (a view for one block)."""
    if t is None:
        return None
    return t[blocks[0]] if len(blocks) == 1 else torch.cat([t[b] for b in blocks])


@dataclass(frozen=True, eq=False)
class Recording:
    """A base object that records the rows ``blocks`` of what the wrapped base computes (its output in forward, its
    input gradient in backward), for the check to replay them (:class:`Replay`)."""

    inner: object
    blocks: list
    seen: dict

    @property
    def compute_dtype(self):
        return getattr(self.inner, "compute_dtype", None)

    @property
    def layer(self):
        return getattr(self.inner, "layer", None)

    def __getattr__(self, name):  # canonical_weight(), kind names, …: the wrapped base's
        return getattr(self.inner, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner.forward(x)
        self.seen["forward"] = take_rows(y, self.blocks).clone()
        return y

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        dx = self.inner.input_grad(dy, x_dtype)
        self.seen["input_grad"] = take_rows(dx, self.blocks).clone()
        return dx


@dataclass(frozen=True, eq=False)
class Replay:
    """A base object that returns recorded rows (in a dtype of the caller's choosing, fp64 for the reference): the
    composed path's base output, given, so that only the rank-r term is computed again."""

    forward_rows: torch.Tensor | None
    input_grad_rows: torch.Tensor | None
    dtype: torch.dtype | None = None

    compute_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_rows
        return y.to(self.dtype or y.dtype, copy=True)

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        dx = self.input_grad_rows
        return dx.to(self.dtype or x_dtype, copy=True)


@dataclass(frozen=True, eq=False)
class Dense64:
    """A dense base in fp64 read from a weight of any float dtype (``layout`` as the dense layers': "linear" N×K,
    "conv1d" K×N) a slice of output rows at a time, so that no fp64 copy of the whole weight exists (a 4-bit weight is
    dequantized by ``dequantized`` once, in its own dtype)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str = "linear"

    compute_dtype = None

    def _w_nk(self) -> torch.Tensor:
        return self.weight if self.layout == "linear" else self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._w_nk()  # N×K
        n, k = w.shape
        step = max(1, CHUNK_ELEMENTS // max(k, 1))
        y = torch.empty(x.shape[0], n, dtype=torch.float64, device=x.device)
        for i in range(0, n, step):
            y[:, i:i + step] = x @ w[i:i + step].double().t()
        if self.bias is not None:
            y += self.bias.double()
        return y

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        w = self._w_nk()
        n, k = w.shape
        step = max(1, CHUNK_ELEMENTS // max(k, 1))
        dx = torch.zeros(dy.shape[0], k, dtype=torch.float64, device=dy.device)
        for i in range(0, n, step):
            dx += dy[:, i:i + step] @ w[i:i + step].double()
        return dx


def compare(got: dict[str, torch.Tensor | None], same: dict[str, torch.Tensor | None],
            ref: dict[str, torch.Tensor | None]) -> tuple[bool, str, float, float]:
    """(all within the rule, worst tensor, its error, its bound); the worst is the largest error/bound ratio. Compared
    where fp64 is finite; a non-finite value there is a fault only where the same-dtype PyTorch result is finite.
    Read in slices of ``CHUNK_ELEMENTS`` (a few fp64 temporaries of that size, whatever the tensors' size)."""
    worst = ("", 0.0, 0.0, -1.0)
    for name, g in got.items():
        if g is None:
            continue
        err, base, scale, fault = _errors(g.reshape(-1), same[name].reshape(-1), ref[name].reshape(-1))
        if fault:
            return False, name, float("inf"), 0.0
        if scale < 0:  # nothing finite to compare
            continue
        bound = FACTOR * base + ATOL_EPS.get(g.dtype, 1e-6) * scale
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        if ratio > worst[3]:
            worst = (name, err, bound, ratio)
    return worst[3] <= 1.0, worst[0], worst[1], worst[2]


def _errors(g: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> tuple[float, float, float, bool]:
    """(max |g − r|, max |s − r|, max |r|, a non-finite g where r and s are finite) over the elements where all three
    are finite; the scale is −1 when there is none."""
    err = base = 0.0
    scale = -1.0
    for i in range(0, g.numel(), CHUNK_ELEMENTS):
        gc, sc, rc = (t[i:i + CHUNK_ELEMENTS].double() for t in (g, s, r))
        ref_ok = torch.isfinite(rc) & torch.isfinite(sc)
        g_ok = torch.isfinite(gc)
        if bool((ref_ok & ~g_ok).any()):
            return 0.0, 0.0, 0.0, True
        usable = ref_ok & g_ok
        if not bool(usable.any()):
            continue
        gc.sub_(rc).abs_().masked_fill_(~usable, 0)
        sc.sub_(rc).abs_().masked_fill_(~usable, 0)
        rc.abs_().masked_fill_(~usable, 0)
        err, base, scale = max(err, gc.max().item()), max(base, sc.max().item()), max(scale, rc.max().item())
    return err, base, scale, False


def record(st: path_state.KeyState, key: str, path: str, check: str, device: torch.device,
           verdict: tuple[bool, str, float, float], describe: dict, candidates: tuple[str, ...]) -> str | None:
    """Keeps the verdict of ``check`` of ``path`` for ``key``; on a mismatch also the demotion, the warning and the
    report line. Returns the path the key moves to, or None when the check passed."""
    ok, worst, err, bound = verdict
    st.verified.setdefault(path, {})[check] = {"ok": ok, "worst": worst, "error": err, "bound": bound}
    if ok:
        return None
    moved = next_path(path, candidates)
    st.demoted = moved
    st.steady.clear()
    capability = device_capability(device)
    line = {
        "gpu": device_name(device), "capability": None if capability is None else f"{capability[0]}.{capability[1]}",
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "key": key, "path": path, "direction": check.split(":")[0], "check": check, "moved_to": moved,
        "worst": worst, "error": err, "bound": bound, **describe,
    }
    warn_fallback(f"the {path} path's {check.split(':')[0]} on {line['gpu']} (compute capability "
                  f"{line['capability']}, triton {line['triton']}, torch {line['torch']}) disagrees with the PyTorch "
                  f"path for {key} (shapes {describe.get('shapes')}, dtypes {describe.get('dtypes')}): {worst} error "
                  f"{err:.3g} > bound {bound:.3g}; this call returns the PyTorch path's result and this key runs the "
                  f"{moved} path from now on. Please report it with this message")
    target = os.environ.get(REPORT_ENV)
    if target:
        try:
            with open(target, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError:
            pass  # a report that cannot be written must not stop training; the warning has said it all
    return moved


def next_path(path: str, candidates: tuple[str, ...]) -> str:
    """The path after ``path`` among ``candidates`` (fused → composed → torch); the PyTorch path last."""
    order = ("fused", "composed", "torch")
    later = order[order.index(path) + 1:]
    return next((p for p in later if p in candidates), "torch")


def skipped(st: path_state.KeyState, path: str, check: str, why: str) -> None:
    """A check that could not run (out of memory): said once, kept in the table, not tried again."""
    st.skipped[(path, check)] = why
    st.passed.add((path, check))
    warn_fallback(f"the self-check of the {path} path's {check.split(':')[0]} was skipped ({why}); the path runs "
                  "unchecked for these shapes")
