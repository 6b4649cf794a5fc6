"""The launch toolbox every Triton launcher uses: which device and stream, operand precision, rank chunks, split
factors, 64-bit offsets, the dropout arguments, and the per-signature launch plans.

Launchers take 2-D views (x: M×K, dY: M×N) whose strides the kernels follow, and the weight in either layout
("linear": N×K, "conv1d": K×N) read through strides, never transposed or copied. Every launch runs on the tensors'
device and that device's current stream, never on whatever device happens to be current: a model spread over two GPUs
runs each layer where it lives. The autograd driver enters the device once per call (:func:`on_device`); each launch
goes through a ``fast_launch.LaunchSite``, whose first (normal) launch enters the device itself and whose later ones
name the device's stream.

Per launch signature a launcher works out once what does not change from call to call (:func:`remember`): strides,
the 64-bit-offsets switch, dot precisions, split factors, rank chunks, grids, each kernel's int and constexpr
arguments, its ``LaunchSite``. The key holds the tensors' shapes, strides and dtypes, the device, the flags, the
device's ``ARCH``, the TF32 switch when an fp32 operand is dotted (:func:`tf32_state`, read once per call) and, where a
launcher splits a reduction, the ``split_factor`` it asks (tests replace it to force a split). Per call only the
outputs are allocated and the tensors, the seed and the floats passed.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import torch
import triton.language as tl

from .. import hardware
from ..hardware import device_arch, fma_dots, num_sms
from ..kernels.configs import INTERPRET

T = TypeVar("T")
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class _DeviceGuard(torch.cuda.device):
    """``torch.cuda.device`` for a device whose index is known, without its constructor's argument parsing (1 µs of
    the 1.5 µs it took per layer pass): entering and leaving are torch's own."""

    def __init__(self, index: int) -> None:
        self.idx = index
        self.prev_idx = -1


_NO_GUARD = contextlib.nullcontext()  # stateless: one for every call off CUDA


def on_device(device: torch.device):
    """Launches inside go to ``device`` and its current stream (Triton launches on the *current* device)."""
    if device.type == "cuda":
        index = device.index
        return _DeviceGuard(index) if index is not None else torch.cuda.device(device)
    return _NO_GUARD


_unused: dict[torch.device, torch.Tensor] = {}


def unused(device: torch.device) -> torch.Tensor:
    """One fp32 element per device passed for outputs a launch does not need (never read or written by the
    kernel, whose flag switches that code off): nothing allocated or zero-filled per call."""
    t = _unused.get(device)
    if t is None:
        t = _unused[device] = torch.zeros(1, device=device, dtype=torch.float32)
    return t


_arches: dict[torch.device, int] = {}


def arch(device: torch.device) -> int:
    """The ``ARCH`` launch argument: the device's compute capability (sm_90 → 90; 0 under the interpreter). The
    autotuners key on it, so a process with two GPU kinds tunes each apart, and the configs' pruning reads it. Kept
    per device (a dict lookup: every launch asks)."""
    a = _arches.get(device)
    if a is None:
        a = _arches[device] = device_arch(device)
    return a


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype operands of ``dtype`` are cast to before ``tl.dot``.

    Under the interpreter, bf16 (and fp16) dots are computed in fp32: Triton's interpreter stores bf16
    as uint16 and its dot/add/mul act on the bit patterns (triton#11584, closed unfixed; a bf16 dot gives
    ~1e11 here on triton 3.9). Loads, stores and casts are right, and the product of two half values is
    exact in fp32, so upcasting the operands gives what a GPU tensor core computes (half inputs, fp32
    accumulation). ``tests/test_interpreter_bf16.py`` checks both the bug and this workaround.
    """
    if INTERPRET:
        return tl.float32
    return TL_DTYPES[dtype]


_precision = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9


def tf32_state() -> bool:
    """``hardware.tf32_enabled`` read through the C getters its properties wrap (0.2 µs instead of 1.7): a launcher
    asks once per call when it dots an fp32 operand. The new API (``torch.backends.cuda.matmul.fp32_precision``, what
    that property returns) first; the legacy flag only while it says "none" (reading it after the new API was set
    raises: IEEE then, as ``tf32_enabled``)."""
    if _precision is not None:
        precision = _precision("cuda", "matmul")
        if precision == "tf32":
            return True
        if precision == "ieee":
            return False
    try:
        return bool(torch._C._get_cublas_allow_tf32())
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype, device: torch.device | None = None, tf32: bool | None = None) -> str:
    """fp32 dots follow PyTorch's switch: TF32 when it allows TF32 (``hardware.tf32_enabled``; ``tf32``: the switch as
    the caller read it, :func:`tf32_state`), else 3xTF32 (``kernels/precision.py``: about fp32 accuracy on tensor
    cores; IEEE fp32 dots ran on the FMA units and spilled, bench/compile_report.py). GPUs before Ampere have no TF32
    and Triton lowers their dots to FMA: plain IEEE there. The interpreter computes every fp32 dot exactly and accepts
    both names, so the CPU tests run the same split code the GPU does. Half operands ignore the precision."""
    capability = hardware.device_capability(device) if device is not None else None
    if capability is not None and capability < (8, 0):  # hardware.fma_dots
        return "ieee"
    if dtype == torch.float32 and not (tf32_state() if tf32 is None else tf32):
        return "tf32x3"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host. ``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers in
    triton 3.6 and 3.9 (each host call unwraps its arguments in Python): with a dozen calls per forward+backward
    they took 13% of the Triton path's host time under cProfile (bench/triton_host_calls.py, kernels stubbed)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2`` without its wrapper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def weight_strides(weight: torch.Tensor, weight_layout: str) -> tuple[int, int]:
    """(stride along K, stride along N) of the weight in its own layout."""
    if weight_layout == "linear":  # N×K
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)  # conv1d: K×N


def rank_block(r: int, adapter_dtype: torch.dtype, device: torch.device | None = None) -> int:
    """Rank chunk of the kernels that loop over the rank inside one program (the GEMMs' rank-r term, the in-place
    adds). tl.dot needs every dimension >= 16; chunks of up to 64 keep the fp32 accumulators small. fp32 adapters
    take chunks of 16 there: their 3xTF32 dots hold split operands beside a 128×128 accumulator, and 32-rank chunks
    spilled 8-88 B per thread, 64-rank ones 80-8288 B (bench/compile_report.py, sm_80/sm_90); looping costs them
    nothing, the tiles they read are tiny. 16 on Turing (FMA dots): 64-rank chunks spilled 1.8-2.9 KB of stack per
    thread in every fp16 config of the rank-r kernels on sm_75 (compile report, triton 3.6/3.9)."""
    if adapter_dtype == torch.float32 or (device is not None and fma_dots(device)):
        return 16
    return min(64, max(16, next_power_of_2(r)))


def skinny_rank_block(r: int, device: torch.device | None = None) -> int:
    """Rank chunk of the skinny kernels (S = x Aᵀ, the dY pass, dA), whose grid spreads chunks over programs: each
    chunk re-reads x or dY and regenerates the mask. Up to 64 for every adapter dtype: with fp32 adapters 64-rank
    chunks compile without spills in the skinny configs (kernels/configs.py), so r <= 64 reads x or dY
    once (16-rank chunks read them r/16 times: 4× at r = 64, bench/traffic_model.py). 16 on Turing."""
    if device is not None and fma_dots(device):
        return 16
    return min(64, max(16, next_power_of_2(r)))


def split_factor(programs: int, max_split: int, device: torch.device, cap: int = 32) -> int:
    """How many slices to split a reduction into so that ~2 programs run per SM."""
    if device.type != "cuda":
        return 1
    want = cdiv(2 * num_sms(device), max(programs, 1))
    return max(1, min(want, max_split, cap))


# Element offsets a kernel may form, tile overhang included (masked lanes past the last row or column of a
# tile still compute their offsets): the largest tile edge is 256.
INT32_REACH = 2**31 - 1
TILE_OVERHANG = 256


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a launch over these tensors needs 64-bit offsets (``kernels/indexing.py``): some tensor spans 2³¹
    elements or more from its first element, counting the tiles' overhang."""
    for t in tensors:
        reach = 0
        for size, stride in zip(t.shape, t.stride(), strict=True):  # a loop, not sum(genexpr): 5 launches a call
            reach += (size - 1 + TILE_OVERHANG) * abs(stride)
        if reach > INT32_REACH:
            return True
    return False


_no_seed: dict[torch.device, torch.Tensor] = {}


def seed_arg(seed: torch.Tensor | int | None, device: torch.device) -> torch.Tensor:
    """The kernels' ``seed_ptr``: the dropout seed as one int64 in ``device``'s memory, which the kernels read when they
    run. The router draws it there (``dropout.seed_tensor``), so under CUDA graph capture the draw is part of the graph
    and every replay reads a new seed; an int (a seed given by hand, tests) is copied there; None (no dropout): a
    cached int64 the kernels never read."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.device == device and seed.dtype == torch.int64 else seed.to(device, torch.int64)
    if seed is None:
        t = _no_seed.get(device)
        if t is None:
            t = _no_seed[device] = torch.zeros(1, device=device, dtype=torch.int64)
        return t
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def drop_args(seed: torch.Tensor | int | None, p: float,
              device: torch.device) -> tuple[torch.Tensor, float, float]:
    """The kernels' (seed_ptr, p, 1/(1-p)) arguments."""
    return seed_arg(seed if p > 0 else None, device), p, (1.0 / (1.0 - p) if p < 1.0 else 0.0)  # dropout.drop_scale


# ------------------------------------------------------------------------------------------------ launch plans

PLAN_LIMIT = 1024  # plans kept per launcher: a run with ever-new token counts clears and rebuilds them, never grows


def remember(plans: dict, key: tuple, plan: T) -> T:
    """``plans[key] = plan``, emptying ``plans`` first when it holds ``PLAN_LIMIT`` (every key's plan is rebuilt in
    microseconds; the compiled kernels stay in triton's cache)."""
    if len(plans) >= PLAN_LIMIT:
        plans.clear()
    plans[key] = plan
    return plan


F32 = torch.float32


class Plan:
    """What a launcher worked out once for one launch signature: its ``LaunchSite`` (grid and constexprs), the
    kernel's int arguments in order (``ints``), the output's shape and contiguous strides (outputs are allocated with
    ``torch.empty_strided``: 1.1 µs a call here, ``torch.empty`` 1.6), the split factor, the dropout arguments when
    there is no dropout (``drop``: the cached seed, 0, 1; None: the call's seed is passed), the device's unused-output
    element, and what else the launcher needs (``extra``)."""

    __slots__ = ("drop", "extra", "ints", "nothing", "shape", "site", "split", "strides")

    def __init__(self, site, ints: tuple, shape: tuple = (), split: int = 1, drop: tuple | None = None,
                 nothing: torch.Tensor | None = None, extra=None) -> None:
        self.site, self.ints, self.shape, self.split, self.drop = site, ints, shape, split, drop
        self.strides = Fresh(shape).stride()
        self.nothing, self.extra = nothing, extra


def plan_drop(p: float, device: torch.device) -> tuple | None:
    """A plan's ``drop``: the kernels' (seed_ptr, p, 1/(1-p)) without dropout (fixed), None with it (the seed is the
    call's)."""
    return drop_args(None, 0.0, device) if p <= 0 else None


class Fresh:
    """The shape and strides of a contiguous tensor a launcher will allocate, for a plan made before it exists
    (``wide_offsets`` reads these two): no allocation, no aten op."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)

    def stride(self, dim: int | None = None):
        strides, step = [], 1
        for size in reversed(self.shape):
            strides.append(step)
            step *= max(size, 1)
        strides.reverse()
        return tuple(strides) if dim is None else strides[dim]
