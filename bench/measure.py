"""Measurement utilities shared by the layer and model benchmarks: timing, saved-for-backward bytes,
peak memory, kernel launches (GPU) or aten ops (CPU), FLOP and byte models.

What each number means (the README's column list repeats this):

- time: median of many calls. GPU: ``triton.testing.do_bench`` (CUDA events, caches flushed, median and
  20/80 % quantiles). CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` run in several interleaved
  rounds (every provider measured once per round), so a burst of load from another process hits all
  providers alike instead of one; the median is over all blocks of all rounds.
- saved bytes: the unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during one
  forward, *excluding* the layer's parameters (W, b, A, B: they exist anyway). The input x counts when it
  is saved: it is LoRA's unavoidable activation cost (a frozen base layer saves nothing but W). A storage
  counts once with its full size (views of one buffer, e.g. x saved by three q/k/v layers, count once).
- peak memory (GPU only): ``torch.cuda.max_memory_allocated`` during one forward+backward minus what was
  allocated before it (inputs, parameters), so it is the extra memory the step needs. CPU has no
  allocator statistics: read saved bytes instead.
- launches (GPU): CUDA kernels (and memset/memcpy) seen by ``torch.profiler`` in one forward, resp. one
  backward. On CPU there are no launches; the same column counts aten operators dispatched (views and
  metadata-only ops excluded) via a ``TorchDispatchMode``: a proxy for the number of passes over memory.
  torch.compile's fused C++ kernels are invisible to it, so CPU op counts are not reported for ``compile``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence

import torch

# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median and 20/80 % quantiles in milliseconds (CUDA events via ``triton.testing.do_bench``)."""
    import triton.testing

    q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q50, "ms_q20": q20, "ms_q80": q80}


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 3,
                         min_run_time: float = 0.6) -> dict[str, dict]:
    """Median ms per call for each callable, measured in ``rounds`` interleaved rounds.

    ``min_run_time`` is the total seconds per callable, split across the rounds. Each callable is called
    once before its first round (warm-up: allocator, lazy init, compile).
    """
    from torch.utils.benchmark import Timer

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time / rounds)
            samples[name].extend(m.times)
    out = {}
    for name, times in samples.items():
        ms = sorted(t * 1e3 for t in times)
        out[name] = {"ms": statistics.median(ms), "ms_q20": _quantile(ms, 0.2), "ms_q80": _quantile(ms, 0.8),
                     "samples": len(ms)}
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


def rotating(items: Sequence) -> Callable[[], object]:
    """A zero-argument callable returning the next of ``items`` (inputs rotated to defeat the cache)."""
    it = itertools.cycle(items)
    return lambda: next(it)


def inputs_to_rotate(bytes_per_set: int, cache_bytes: int, max_sets: int = 8) -> int:
    """How many input sets to rotate so that consecutive calls do not find their inputs in the cache
    (twice the cache size in total, as in triton's do_bench cache flush), at most ``max_sets``."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * cache_bytes / bytes_per_set)))


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size: L2 on CUDA, L3 (or the largest level found) on CPU; 32 MiB when unknown."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best or 32 * 2**20


# --------------------------------------------------------------------------------------- saved bytes


def saved_storages(fn: Callable[[], object]) -> tuple[dict[int, int], object]:
    """Runs ``fn`` under saved-tensor hooks; returns ({storage data_ptr: nbytes}, fn's result)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return storages, out


def saved_activation_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor]) -> tuple[int, object]:
    """Bytes of unique storages saved for backward by ``fn``, minus the storages of ``exclude``
    (the parameters). Returns (bytes, fn's result)."""
    storages, out = saved_storages(fn)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in storages.items() if ptr not in skip), out


# ------------------------------------------------------------------------------------------ memory


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before. None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


# ------------------------------------------------------------------------------- launches / op counts


# Ops that move no data: counting them would reward implementations that reshape less, not ones that
# make fewer passes over memory.
_METADATA_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "reshape",
                 "alias", "detach", "squeeze", "unsqueeze", "slice", "select", "split", "unbind",
                 "resolve_conj", "resolve_neg", "lift_fresh", "_to_copy_noop", "empty", "empty_like",
                 "empty_strided", "set_", "_reshape_alias", "new_empty", "_local_scalar_dense", "item",
                 "is_nonzero", "record_stream"}


# Composite ops whose overloads the check below cannot name (no default overload): they decompose.
_COMPOSITE_OPS = {"to", "contiguous", "type_as", "reshape", "flatten", "dropout", "linear", "matmul"}


def _is_composite(op: str) -> bool:
    """True for CompositeImplicitAutograd ops (linear, matmul, dropout, ...): they have no kernel of their
    own, the ops they decompose into do the work."""
    if op in _COMPOSITE_OPS:
        return True
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CompositeImplicitAutograd")
    except Exception:
        return False


def count_cpu_ops(fn: Callable[[], object]) -> tuple[list[str], object]:
    """The aten operators that do work, recorded by ``torch.profiler`` while ``fn`` runs, in order; and
    fn's result.

    Counted: every aten op that is neither metadata-only (views, empty) nor composite (linear, matmul,
    dropout decompose into ops that are counted instead), and is not called from inside another counted
    op (addmm's internal copy_ is part of addmm). Ops inside a custom op (fused-lora registers
    ``fused_lora::*`` ops) or an autograd Function count, so an opaque wrapper cannot hide its passes
    over memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()

    def counted(evt) -> bool:
        if not evt.name.startswith("aten::"):
            return False
        op = evt.name[len("aten::"):]
        return op not in _METADATA_OPS and not _is_composite(op)

    names = []
    for evt in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not counted(evt):
            continue
        parent = evt.cpu_parent
        while parent is not None and not counted(parent):
            parent = parent.cpu_parent
        if parent is None:
            names.append(evt.name[len("aten::"):])
    return names, out


def count_cuda_kernels(fn: Callable[[], object], device: torch.device) -> tuple[list[str], object]:
    """Names of the device activities (kernels, memsets, memcpys) ``torch.profiler`` records while ``fn``
    runs; and fn's result."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        sync(device)
    events = prof.events()
    names = [evt.name for evt in events if evt.device_type == DeviceType.CUDA]
    if not names:  # profilers that attach device work to the launching CPU op instead of listing it
        names = [k.name for evt in events for k in getattr(evt, "kernels", [])]
    return names, out


def count_launches(fn: Callable[[], object], device: torch.device) -> tuple[list[str], object]:
    """CUDA kernels on GPU, aten ops on CPU (see the module docstring)."""
    if device.type == "cuda":
        return count_cuda_kernels(fn, device)
    return count_cpu_ops(fn)


# ------------------------------------------------------------------------------- FLOP and byte models


def lora_flops(M: int, K: int, N: int, r: int, lora: bool = True) -> dict[str, int]:
    """Useful FLOPs of one LoRA linear layer (2 per multiply-add; dropout and bias ignored).

    forward: base 2MKN, S = x_d Aᵀ 2MKr, S Bᵀ 2MNr. backward: dX base 2MNK; dS = dY B 2MNr, dB 2MNr,
    dA 2MKr, dX += dS A 2MKr. The frozen W gets no gradient. ``lora=False`` is the base layer alone."""
    fwd = 2 * M * K * N + (2 * M * K * r + 2 * M * N * r if lora else 0)
    bwd = 2 * M * N * K + (4 * M * N * r + 4 * M * K * r if lora else 0)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def lora_min_bytes(M: int, K: int, N: int, r: int, elem: int, adapter_elem: int, lora: bool = True) -> dict:
    """Fewest bytes one layer must move through memory (each input read once, each output written once).

    forward: read x, W, (A, B), write y (and S, M×r fp32). backward: read dY, W, x, (A, B, S), write dX
    (and dA, dB). The minimum a fused implementation could reach, not what any provider actually moves:
    GB/s columns divide this by the measured time (an *effective* bandwidth)."""
    lora_w = (r * K + N * r) * adapter_elem if lora else 0
    s_bytes = M * r * 4 if lora else 0
    fwd = (M * K + N * K + M * N) * elem + lora_w + s_bytes
    bwd = (M * N + N * K + M * K) * elem + (M * K * elem if lora else 0) + 2 * lora_w + s_bytes
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


# ------------------------------------------------------------------------------------ device ceilings


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The two ceilings METHOD.md asks for, measured here: a large matmul's TFLOP/s and a large
    device-to-device copy's GB/s (bytes read + written). GPU only (CPU: {})."""
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_gpu(lambda: a @ b)["ms"]
    src = torch.randn(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    cp = time_gpu(lambda: dst.copy_(src))["ms"]
    return {"matmul_tflops": 2 * n**3 / mm / 1e9, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": 2 * src.numel() * 4 / cp / 1e6}
