"""Triton's real launch path on a CPU: a stand-in CUDA driver, so that ``kernel[grid](...)`` runs triton's own
``Autotuner.run`` and ``JITFunction.run`` (binding, specialization, the kernel cache), really compiles the kernel to
PTX and a cubin for ``GPUTarget("cuda", 90, 32)`` (triton compiles without a GPU: ptxas ships with it), and hands the
launch to a stand-in launcher that records it instead of running anything.

The process must not use the interpreter: ``TRITON_INTERPRET`` unset or 0 before triton and fused_lora are imported
(``triton.jit`` decides at decoration). Tensors are CPU tensors: nothing reads them (the launcher records the
arguments), so results are garbage and a test compares launches, never outputs. The stand-in driver gives:

- ``get_current_target()``: ``GPUTarget("cuda", arch, 32)``; ``get_current_device()``: 0;
  ``get_current_stream(index)``: ``stream`` (a number a test may change, as a capture stream would be);
- ``launcher_cls``: :class:`RecordingLauncher`, built per compiled kernel as triton builds its C launcher, called with
  the launcher's convention ``(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
  enter_hook, exit_hook, *arguments)``: it calls the launch hooks as the C launcher does and appends a :class:`Launch`;
- ``utils.load_binary``: a distinct function handle per loaded cubin (what a launch names), ``get_device_properties``:
  an H100's shared memory (227 KiB per block) and SM count;
- ``get_benchmarker()``: a stand-in ``do_bench`` that runs the autotuner's ``kernel_call`` ``bench_runs`` times (its
  pre/post hooks included) and returns ``bench_times(config_index)``: by default increasing, so the first config
  benchmarked wins; ``winner="last"`` makes the last one win.

    with fake_cuda() as gpu:
        lora_triton.lora_down(x, A, seed, p)
        gpu.launches[-1].function, gpu.launches[-1].grid, gpu.launches[-1].args

``package_on_fake_gpu()`` also makes fused_lora route CPU tensors to the Triton backend as on an sm_90 GPU (the router's
interpreter switch, ``hardware.device_capability``): bench/host_gpu.py times the package's Triton path this way.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

H100_SHARED_PER_BLOCK = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90: 227 KiB
H100_SMS = 132


@dataclass
class Launch:
    """One launch as the launcher received it."""

    kernel: str
    function: int
    grid: tuple[int, int, int]
    stream: int
    packed_metadata: object
    launch_metadata: object
    enter_hook: object
    exit_hook: object
    args: tuple

    def same_as(self, other: Launch) -> list[str]:
        """What differs between two launches (empty: the same compiled function, grid, stream, hooks and every
        argument; tensors compared by address, dtype, shape and strides, other values by ==)."""
        diffs = []
        for name in ("kernel", "function", "grid", "stream", "packed_metadata", "enter_hook", "exit_hook"):
            if getattr(self, name) != getattr(other, name):
                diffs.append(f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}")
        if _hooked(self.enter_hook) or _hooked(self.exit_hook):  # else nothing reads it (the fast path makes none)
            mine, theirs = (None if m is None else m.get() for m in (self.launch_metadata, other.launch_metadata))
            if mine != theirs:
                diffs.append(f"launch_metadata: {mine} != {theirs}")
        if len(self.args) != len(other.args):
            return [*diffs, f"{len(self.args)} arguments != {len(other.args)}"]
        for i, (a, b) in enumerate(zip(self.args, other.args, strict=True)):
            if describe(a) != describe(b):
                diffs.append(f"argument {i}: {describe(a)} != {describe(b)}")
        return diffs


def _hooked(hook) -> bool:
    """A launch hook that does something (not None, not an empty ``knobs.HookChain``)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def describe(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
    return (type(value).__name__, value)


class RecordingLauncher:
    """Stands in for triton's C launcher of one compiled kernel (``driver.launcher_cls(src, metadata)``)."""

    def __init__(self, src, metadata) -> None:
        self.name = metadata.name

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args) -> None:
        if enter_hook is not None:  # as triton's launcher: the hooks get the launch metadata
            enter_hook(launch_metadata)
        gpu = _current  # the GPU of the block the launch runs in (triton keeps compiled kernels across blocks)
        if gpu is not None:
            gpu.count += 1
        if gpu is not None and gpu.record:
            gpu.launches.append(Launch(self.name, function, (grid_x, grid_y, grid_z), stream, packed_metadata,
                                       launch_metadata, enter_hook, exit_hook, args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


_handles = itertools.count(1)  # one numbering for the process: triton keeps loaded kernels across fake_cuda blocks
FUNCTIONS: dict[int, str] = {}  # function handle → kernel name


class _Utils:
    def load_binary(self, name, binary, shared, device):
        handle = next(_handles)
        FUNCTIONS[handle] = name
        return handle, handle, 32, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": H100_SHARED_PER_BLOCK, "multiprocessor_count": H100_SMS, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1_980_000, "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}


class FakeCudaDriver(DriverBase):
    """Triton's driver interface as the JIT, the autotuner and ``CompiledKernel`` use it (see the module docstring)."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.utils = _Utils()
        self.launcher_cls = RecordingLauncher

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.gpu.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_capability(self, device=0) -> tuple[int, int]:
        return divmod(self.gpu.arch, 10)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        self.gpu.stream_reads += 1
        return self.gpu.stream

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return _do_bench  # the autotuner keeps what it gets (a cached property): the current GPU's, at each call

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(16, dtype=torch.int32)

    def clear_cache(self, cache) -> None:
        pass


@dataclass
class FakeGpu:
    """The stand-in GPU's state and what it saw."""

    arch: int = 90
    stream: int = 7  # the current stream's handle, as torch would report it
    record: bool = True
    winner: str = "first"  # which benchmarked config wins ("first" or "last")
    bench_runs: int = 2
    launches: list[Launch] = field(default_factory=list)
    bench_calls: int = 0
    count: int = 0  # launches, recorded or not
    stream_reads: int = 0
    driver: FakeCudaDriver | None = None
    _clock: float = 0.0

    def do_bench(self, kernel_call, quantiles=None, **_):
        self.bench_calls += 1
        for _ in range(self.bench_runs):
            kernel_call()
        self._clock += 1.0 if self.winner == "first" else -1.0
        return [self._clock] * (len(quantiles) if quantiles is not None else 1)

    def function_name(self, handle: int) -> str:
        return FUNCTIONS[handle]


_current: FakeGpu | None = None


def _do_bench(kernel_call, quantiles=None, **options):
    return _current.do_bench(kernel_call, quantiles=quantiles, **options)


@contextlib.contextmanager
def fake_cuda(**options) -> Iterator[FakeGpu]:
    """Triton drives the stand-in GPU inside the block (see the module docstring); the driver before it is put back
    after."""
    global _current
    gpu = FakeGpu(**options)
    gpu.driver = FakeCudaDriver(gpu)
    before, previous = driver._active, _current  # DriverConfig keeps the active driver there (triton 3.6 and 3.9)
    driver.set_active(gpu.driver)
    _current = gpu
    try:
        yield gpu
    finally:
        driver._active, _current = before, previous


@contextlib.contextmanager
def package_on_fake_gpu(arch: int = 90) -> Iterator[None]:
    """fused_lora routes CPU tensors to the Triton backend as it would CUDA tensors on an sm_``arch`` GPU: the router's
    interpreter switch (which lets CPU tensors take the Triton backend) and ``hardware.device_capability`` patched;
    the kernels' configs are the GPU lists (``kernels.configs.INTERPRET`` is False in this process). The self-check
    stays off (its default off CUDA: the stand-in launcher computes nothing to compare)."""
    from fused_lora import dispatch, hardware
    from fused_lora.backends import triton_launch

    saved = (dispatch.INTERPRET, hardware.device_capability, dict(triton_launch._arches))
    capability = divmod(arch, 10)
    real = hardware.device_capability
    dispatch.INTERPRET = True
    hardware.device_capability = lambda device: capability if device.type == "cpu" else real(device)
    triton_launch._arches.clear()
    try:
        yield
    finally:
        dispatch.INTERPRET, hardware.device_capability = saved[0], saved[1]
        triton_launch._arches.clear()
        triton_launch._arches.update(saved[2])
