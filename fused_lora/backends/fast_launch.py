"""The launch fast path: after a kernel's first launch for a launch signature, later launches call the compiled
kernel's launcher directly, skipping ``Autotuner.run``'s key building and ``JITFunction.run``'s binding and
specialization: 22-33 µs of Python per launch of our 25-35-argument kernels, triton 3.6 and 3.9 alike (measured on
CPU with triton's real path and a stand-in launcher, tests/fake_cuda.py), against ~2 µs for the fast path's guard and
~6 µs for the C launcher and ``cuLaunchKernel`` themselves (bench/host_gpu.py).

A launcher makes one :class:`LaunchSite` per launch signature (its plan: shapes, strides, dtypes, device, flags, the
TF32 switch; everything that fixes the kernel's int and constexpr arguments) and calls ``site.launch(kernel, args)``
with the per-call positional arguments (tensors, the ints the signature fixes, floats). The first call, and every call
a guard turns away, is triton's normal launch, ``kernel[grid](*args, **kwargs)``, made on the tensors' device (it
tunes, compiles and launches). After it, the site keeps what triton chose: the CompiledKernel (of the config the
autotuner picked), its launcher, the grid, the argument tail (constexprs, the config's meta-parameters, defaults).

The guard, per launch (a few hundred ns), falls back to the normal path whenever anything triton specializes on or
keys on could differ from the launch it copies:

- the signature (the launcher's contract): every int argument (so ``== 1``, divisibility by 16 and 32/64-bit width),
  every constexpr, the autotuner's key (shapes, ``ARCH``), the tensors' dtypes and the device;
- per launch, here: each tensor argument's dtype and whether its address is 16-byte aligned (the entry is per
  alignment pattern: a view at an odd element offset gets its own, compiled by the normal path); the kernel object
  itself (a module global a test may replace), the autotuner's ``fn``, ``cache`` and ``configs`` (another object
  there: normal path), no ``pre_run_hooks`` on the JITFunction, no ``pre_hook`` on the chosen config, the same
  active triton driver, and the knobs that enter ``JITFunction.run``'s cache key (``knobs.runtime.debug``,
  ``knobs.compilation.instrumentation_mode``; on 3.9 also ``fpsan_homomorphic_casts`` and
  ``knobs.runtime.add_stages_inspection_hook``).

Floats are not specialized by triton (fp32 arguments): they pass through. Hooks: the autotuner's ``pre_hook`` /
``post_hook`` (``reset_to_zero``, ``restore_value``) run only while it benchmarks, which is a normal-path call; launch
hooks (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``) are read at every launch and given to the
launcher with ``CompiledKernel.launch_metadata``'s result, as ``JITFunction.run`` does, except that while both are
empty ``HookChain`` objects (their default) the metadata, which only hooks read, is not built (None is passed: 1.3 µs
a launch). Not repeated: the JIT's check that the kernel's global variables kept their compile-time values (a
debugging aid; the package's kernels read only constants). The launch goes to ``driver.get_current_stream(index)`` of
the device the first launch ran on (the tensors' device): the current stream, the capturing one under CUDA graph
capture; the fast path allocates nothing, synchronizes nothing and reads nothing from the device, so a captured launch
is legal (tests/test_fast_launch.py).

Triton entry points relied on, the same names and call conventions in triton 3.6.0 and 3.9.0 (read in both versions'
``runtime/jit.py``, ``runtime/autotuner.py``, ``compiler/compiler.py``, ``runtime/driver.py``, ``knobs.py``):

- the classes ``triton.runtime.autotuner.Autotuner``, ``triton.runtime.jit.JITFunction``,
  ``triton.compiler.CompiledKernel`` (isinstance checks only);
- ``kernel[grid](*args, **kwargs)`` returns the ``CompiledKernel`` it launched (``JITFunction.run`` returns it,
  ``Autotuner.run`` returns ``self.fn.run(...)``; anything else, e.g. an async compile's future, is not kept);
- ``Autotuner``: ``fn``, ``cache``, ``configs``, ``best_config`` (set by ``run`` before it launches); ``Config``:
  ``kwargs``, ``pre_hook``;
- ``JITFunction``: ``arg_names``, ``params[i].name`` / ``.has_default`` / ``.default``, ``pre_run_hooks``;
- ``CompiledKernel``: ``run`` (the launcher: ``driver.active.launcher_cls(src, metadata)``), ``function``,
  ``packed_metadata``, ``launch_metadata(grid, stream, *args)``; the launcher's call
  ``run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, launch_enter_hook,
  launch_exit_hook, *all_arguments)`` with all arguments in parameter order, constexprs included
  (``JITFunction.run``'s ``*bound_args.values()``);
- ``triton.runtime.driver.driver.active``: ``get_current_device()``, ``get_current_stream(index)``;
- ``triton.knobs``: ``runtime.launch_enter_hook``, ``runtime.launch_exit_hook`` (``HookChain`` objects with a
  ``calls`` list), ``runtime.debug``, ``compilation.instrumentation_mode``; 3.9 only (read when present):
  ``compilation.fpsan_homomorphic_casts``, ``runtime.add_stages_inspection_hook``.

Off under ``TRITON_INTERPRET=1`` (no compiled kernel: every launch is the interpreter's) and with
``FUSED_LORA_FAST_LAUNCH=0``; :func:`set_enabled` and :func:`clear` switch it and drop what was kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.knobs import HookChain
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from ..kernels.configs import INTERPRET

ENV_VAR = "FUSED_LORA_FAST_LAUNCH"
_enabled = not INTERPRET and os.environ.get(ENV_VAR, "1") != "0"
# Bumped by clear(): a site's entries from an older generation are dropped at its next launch.
_generation = 0

_runtime_knobs = knobs.runtime
_compilation_knobs = knobs.compilation
# The 3.9-only knobs JITFunction.run reads into its cache key (absent on 3.6: JITFunction.run there does not read them).
_HAS_FPSAN = hasattr(type(_compilation_knobs), "fpsan_homomorphic_casts")
_HAS_STAGES_HOOK = hasattr(type(_runtime_knobs), "add_stages_inspection_hook")


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    """Switch the fast path on or off (it stays off under the interpreter). Off: every launch is triton's own."""
    global _enabled
    _enabled = bool(flag) and not INTERPRET
    clear()


def clear() -> None:
    """Forget every kept launch: the next launch of each site is triton's normal one (it re-tunes only where the
    autotuner's own cache was emptied too)."""
    global _generation
    _generation += 1


def _options_state() -> tuple:
    """The knobs ``JITFunction.run`` puts into its kernel cache key besides the arguments (``LaunchSite.launch``
    reads the same inline)."""
    return (_runtime_knobs.debug, _compilation_knobs.instrumentation_mode,
            _compilation_knobs.fpsan_homomorphic_casts if _HAS_FPSAN else None,
            _runtime_knobs.add_stages_inspection_hook if _HAS_STAGES_HOOK else None)


class _Entry(NamedTuple):
    """One compiled launch: what ``JITFunction.run`` would pass to the launcher, less the per-call arguments."""

    run: Callable  # the launcher (CompiledKernel.run: a property that loads the module on first use, done by then)
    function: object
    metadata: object  # CompiledKernel.packed_metadata
    grid_x: int
    grid_y: int
    grid_z: int
    tail: tuple  # the arguments after the positional ones, in parameter order
    compiled: CompiledKernel
    grid: tuple  # as the grid function returned it (for launch_metadata)


def _entry(compiled: CompiledKernel, grid: tuple, tail: tuple) -> _Entry:
    return _Entry(compiled.run, compiled.function, compiled.packed_metadata, grid[0],
                  grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, tail, compiled, grid)


class _Kept(NamedTuple):
    """What a site's kept launches were made with (one object, replaced whole: a launch on another thread reads either
    the old one or the new one, never a mix)."""

    kernel: object  # the kernel object launched (an Autotuner or a JITFunction)
    generation: int  # of clear()
    tensors: tuple[tuple[int, torch.dtype], ...]  # (position, dtype) of each tensor argument
    entries: dict[int, _Entry]  # by the tensor arguments' 16-byte alignment pattern
    jit: JITFunction
    driver: object  # the active triton driver
    index: int  # its device index (the tensors' device)
    options: tuple  # _options_state()
    tuner: bool  # kernel is an Autotuner; then its fn, cache and configs:
    fn: object
    tune_cache: object
    configs: object


class LaunchSite:
    """One launch signature of one kernel (see the module docstring): ``grid`` (a tuple, or a function of the launch's
    named arguments as triton takes it) and ``kwargs`` (the constexprs and other keyword arguments) are fixed by the
    signature, ``device`` is the tensors' device. ``launch(kernel, args)`` launches with the per-call positional
    arguments."""

    __slots__ = ("device", "grid", "kept", "kwargs")

    def __init__(self, grid: tuple | Callable[[dict], tuple], kwargs: dict, device: torch.device) -> None:
        self.grid, self.kwargs, self.device = grid, kwargs, device
        self.kept: _Kept | None = None

    @property
    def entries(self) -> dict[int, _Entry]:
        """The kept launches by alignment pattern (empty before the first, or after ``clear()``)."""
        kept = self.kept
        return kept.entries if kept is not None and kept.generation == _generation else {}

    def launch(self, kernel, args: tuple) -> None:
        """``kernel[grid](*args, **kwargs)``, directly through the kept launcher when nothing it specialized on
        changed."""
        kept = self.kept
        if kept is not None and kernel is kept[0] and kept[1] == _generation:
            _, _, tensors, entries, jit, active, index, options, tuner, fn, tune_cache, configs = kept  # locals: faster
            pattern = 0
            for i, dtype in tensors:
                arg = args[i]
                if arg.dtype is not dtype:
                    break
                pattern += pattern + (not arg.data_ptr() & 15)  # one bit per tensor: 16-byte aligned
            else:
                entry = entries.get(pattern)
                runtime = _runtime_knobs
                if (entry is not None and driver.active is active and not jit.pre_run_hooks
                        and (runtime.debug, _compilation_knobs.instrumentation_mode,
                             _compilation_knobs.fpsan_homomorphic_casts if _HAS_FPSAN else None,
                             runtime.add_stages_inspection_hook if _HAS_STAGES_HOOK else None) == options
                        and (not tuner or (kernel.fn is fn and kernel.cache is tune_cache
                                           and kernel.configs is configs))):
                    run, function, metadata, grid_x, grid_y, grid_z, tail, compiled, grid = entry
                    stream = active.get_current_stream(index)
                    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
                    if enter is None or (enter.__class__ is HookChain and not enter.calls
                                         and leave.__class__ is HookChain and not leave.calls):
                        hooked = None  # nothing reads the launch metadata (see the module docstring)
                    else:
                        hooked = compiled.launch_metadata(grid, stream, *args, *tail)
                    run(grid_x, grid_y, grid_z, stream, function, metadata, hooked, enter, leave, *args, *tail)
                    return
        self._normal(kernel, args)

    # ------------------------------------------------------------------------------------------- the normal path
    def _normal(self, kernel, args: tuple) -> None:
        device = self.device
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            compiled = kernel[self.grid](*args, **self.kwargs)
            if _enabled:
                self._keep(kernel, args, compiled)

    def _keep(self, kernel, args: tuple, compiled) -> None:
        """Keep the launch triton just made, when it can be repeated exactly (else the next one is normal too)."""
        if not isinstance(compiled, CompiledKernel):  # a stub, an async compile's future, the interpreter
            return
        tuner = isinstance(kernel, Autotuner)
        if tuner:
            jit, config = kernel.fn, getattr(kernel, "best_config", None)
            if not isinstance(jit, JITFunction) or config is None or config.pre_hook is not None:
                return
            meta = config.kwargs
        elif isinstance(kernel, JITFunction):
            jit, meta = kernel, {}
        else:
            return
        names = jit.arg_names
        if len(args) > len(names) or any(name not in names for name in self.kwargs):  # options (num_warps=...)
            return
        values = {**self.kwargs, **meta}
        tail = []
        for param in jit.params[len(args):]:
            if param.name in values:
                tail.append(values[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                return
        tensors, pattern = [], 0
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                tensors.append((i, arg.dtype))
                pattern += pattern + (not arg.data_ptr() & 15)
            elif type(arg) not in (int, float):  # bools and None specialize differently: not kept
                return
        active = driver.active
        index = active.get_current_device()
        if self.device.type == "cuda" and index != self.device.index:
            return
        grid = self.grid(dict(zip(names, (*args, *tail), strict=True))) if callable(self.grid) else self.grid
        entry = _entry(compiled, tuple(grid), tuple(tail))
        new = _Kept(kernel, _generation, tuple(tensors), {pattern: entry}, jit, active, index, _options_state(),
                    tuner, kernel.fn if tuner else None, kernel.cache if tuner else None,
                    kernel.configs if tuner else None)
        old = self.kept
        if old is not None and _same(old, new):  # one more alignment pattern of the same state
            new = old._replace(entries={**old.entries, pattern: entry})
        self.kept = new


def _same(a: _Kept, b: _Kept) -> bool:
    """Two kept states alike but for their entries: objects by identity (a new autotuner cache with the same contents
    is another cache), values by equality."""
    return (all(getattr(a, f) is getattr(b, f) for f in ("kernel", "jit", "driver", "fn", "tune_cache", "configs"))
            and (a.generation, a.tensors, a.index, a.options, a.tuner) == (b.generation, b.tensors, b.index,
                                                                          b.options, b.tuner))
