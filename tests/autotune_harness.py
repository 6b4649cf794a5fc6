"""GPU-like autotuning under Triton's interpreter: a CPU test can see what benchmarking does to a result.

On a GPU, ``triton.autotune`` benchmarks the pruned configs of a new key on the call's own arguments (``do_bench``: many
runs of each config) before the real launch, so a kernel that adds into its output in place or accumulates with atomics
changes its result unless ``restore_value`` / ``reset_to_zero`` undo each run. Under the interpreter none of this runs:
``kernels/configs.pick`` leaves one config per list, and an autotuner with one config never benchmarks. This module
patches every ``triton.autotune`` object in ``fused_lora.kernels`` for the length of a test:

- ``configs``: the kernel's own (interpreter) config first, then two variants of it (``variants``),
  so that ``Autotuner.run`` takes its benchmarking branch (it skips it for a one-config list);
- ``early_config_prune`` (``prune_configs_by``): the real pruners return the kernel's one interpreter config and would
  bring the list back to one; replaced by one that runs the real pruner (on the launch's own arguments, its ``ARCH``
  included, which it records per kernel in ``pruned``: the GPU kind a key was tuned for), then keeps every config
  (``mode="all"``: what triton 3.9 does with a list that prunes to several) or, ``mode="one"``, the first config but
  twice: triton 3.9 skips
  benchmarking when one config is left, **triton 3.6 (the GPU image's) benchmarks it anyway**, which is what the
  duplicate makes 3.9's ``run`` do (the same config benchmarked, then launched). ``FUSED_LORA_AUTOTUNE=0`` prunes to one
  config: on 3.6 that still benchmarks, and ``mode="one"`` is that case;
- ``do_bench`` (what ``Autotuner._bench`` calls with its ``kernel_call`` closure): a stand-in that runs ``kernel_call``
  ``runs`` times, as ``triton.testing.do_bench`` does (warm-up and repetitions), so the autotuner's own pre/post hooks
  (``reset_to_zero`` zeroing, ``restore_value`` clone-and-restore) run around every run exactly as on a GPU; it returns
  increasing times, so the first config benchmarked wins and the real launch runs the kernel's own config: a result is
  then bit for bit the normal call's unless benchmarking changed it (``winner="last"``: a variant wins instead);
- ``cache``: a fresh dict (the first call of each key benchmarks; ``reset()`` empties it again);
- ``fn``: a proxy counting the real launches beside the benchmark runs.

Everything (the instance attributes above; ``do_bench`` is a cached property, absent until first read) is put back when
the context exits. The harness counts ``do_bench`` calls and benchmark runs per kernel, and ``assert_benchmarked`` fails
unless exactly the expected kernels were benchmarked (and launched): a test can never pass by benchmarking nothing.

    with gpu_like_autotuning(mode="one") as tuner:
        y = fused_lora_linear(...)
        tuner.assert_benchmarked({"lora_down_kernel", "lora_fwd_kernel"})

or the ``autotune_harness`` fixture (``from autotune_harness import autotune_harness_fixture`` in a test module makes
it available): ``tuner = autotune_harness(mode="one")``.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
import triton
from triton.runtime.autotuner import Autotuner

from fused_lora.kernels.configs import launch_arch

MODES = ("all", "one")
WINNERS = ("first", "last")
# Every autotuned kernel of the package (tests/test_autotune_first_call.py checks the discovery finds exactly these,
# so a kernel added later must be named here, and given a path in that test).
AUTOTUNED = frozenset({
    "lora_down_kernel", "lora_fwd_kernel",  # lora_forward.py
    "lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel",  # lora_backward.py
    "lora_up_add_kernel", "lora_dx_add_kernel",  # lora_compose.py
    "lora_fwd_4bit_kernel", "lora_dx_4bit_kernel", "dequantize_4bit_kernel",  # lora_4bit.py
    "dora_norm_kernel", "dora_down_kernel", "dora_fwd_kernel", "dora_dy_kernel", "dora_dx_kernel",  # dora.py
    "multi_lora_down_kernel", "multi_lora_fwd_kernel", "multi_lora_up_add_kernel",  # multi_lora.py
    "multi_lora_dy_kernel", "multi_lora_dx_kernel", "multi_lora_dx_add_kernel", "multi_lora_da_kernel",
    "multi_lora_fwd_4bit_kernel", "multi_lora_dx_4bit_kernel",  # multi_lora_4bit.py
})


def kernel_name(tuner: Autotuner) -> str:
    return tuner.base_fn.__name__


def autotuned_kernels() -> dict[str, Autotuner]:
    """name → ``Autotuner`` of every ``@triton.autotune`` kernel in the submodules of ``fused_lora.kernels``."""
    package = importlib.import_module("fused_lora.kernels")
    found: dict[str, Autotuner] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fused_lora.kernels.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                name = kernel_name(value)
                assert found.get(name, value) is value, f"two autotuned kernels named {name}"
                found[name] = value
    return found


def variants(config: triton.Config) -> list[triton.Config]:
    """``config`` and two others of the same kernel: its tiles with other warps and stages (which the interpreter
    ignores: as cheap to run as the kernel's own), then its tiles doubled (fewer interpreted programs; the one
    ``winner="last"`` launches). Their meta-parameters are the kernel's own names, so each is a config the kernel
    accepts."""
    doubled = {k: (2 * v if k.startswith("BLOCK_") else v) for k, v in config.kwargs.items()}
    return [config, triton.Config(dict(config.kwargs), num_warps=2 if config.num_warps != 2 else 4, num_stages=2),
            triton.Config(doubled, num_warps=8, num_stages=3)]


class _CountingFn:
    """Stands in for ``Autotuner.fn``: counts ``run`` calls (benchmark runs and real launches), delegates the rest."""

    def __init__(self, fn, harness: AutotuneHarness, name: str) -> None:
        self._fn, self._harness, self._name = fn, harness, name

    def run(self, *args, **kwargs):
        self._harness.launches[self._name] += 1
        return self._fn.run(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._fn, attr)


class AutotuneHarness:
    """The patched state of a ``gpu_like_autotuning`` block and its counters (see the module's docstring)."""

    def __init__(self, tuners: dict[str, Autotuner], mode: str, runs: int, winner: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {winner!r}")
        if runs < 1:
            raise ValueError("runs: at least one benchmark run per config")
        self.tuners, self.mode, self.runs, self.winner = tuners, mode, runs, winner
        self.bench_calls: Counter[str] = Counter()  # do_bench calls (one per config benchmarked)
        self.bench_runs: Counter[str] = Counter()  # kernel runs inside them
        self.launches: Counter[str] = Counter()  # every run of the kernel: benchmark runs and real launches
        self.pruned: defaultdict[str, list[int]] = defaultdict(list)  # the ARCH of each pruning (one per new key)
        self._clock = 0.0

    # ----------------------------------------------------------------------------------------------------- patching
    def _prune_for(self, name: str, real):
        def prune(configs, named_args, **kwargs):
            if real is not None:
                assert real(configs, named_args, **kwargs), f"{name}: the real pruning left no config"
            self.pruned[name].append(launch_arch(named_args, kwargs))
            if self.mode == "one":
                return [configs[0], configs[0]]  # one config left, benchmarked all the same (triton 3.6)
            return list(configs)

        return prune

    def _do_bench_for(self, name: str):
        def do_bench(kernel_call, quantiles=None, **_):
            self.bench_calls[name] += 1
            for _ in range(self.runs):
                kernel_call()  # the autotuner's closure: its pre_hook, the kernel, its post_hook
                self.bench_runs[name] += 1
            self._clock += 1.0 if self.winner == "first" else -1.0  # the first (last) config benchmarked wins
            return [self._clock] * (len(quantiles) if quantiles is not None else 1)

        return do_bench

    def patch(self) -> None:
        for name, tuner in self.tuners.items():
            assert len(tuner.configs) >= 1
            tuner.configs = variants(tuner.configs[0])
            tuner.early_config_prune = self._prune_for(name, tuner.early_config_prune)
            tuner.perf_model = None
            tuner.configs_top_k = 1.0
            tuner.do_bench = self._do_bench_for(name)  # shadows the cached property on the instance
            tuner.cache = {}
            tuner.fn = _CountingFn(tuner.fn, self, name)

    def reset(self) -> None:
        """Empty the autotune caches and the counters: the next call of every key benchmarks again."""
        for tuner in self.tuners.values():
            tuner.cache = {}
        self.bench_calls.clear()
        self.bench_runs.clear()
        self.launches.clear()
        self.pruned.clear()

    # --------------------------------------------------------------------------------------------------- checking
    @property
    def benchmarked(self) -> set[str]:
        return {name for name, n in self.bench_calls.items() if n}

    def assert_benchmarked(self, expected: set[str] | frozenset[str]) -> None:
        """Exactly ``expected`` were benchmarked since the last ``reset``, each key with every config of its mode
        (``runs`` kernel runs each), and each launched for real besides: the harness did run, on this path."""
        unknown = set(expected) - set(self.tuners)
        assert not unknown, f"not autotuned kernels: {sorted(unknown)}"
        assert self.benchmarked == set(expected), (
            f"benchmarked {sorted(self.benchmarked)}, expected {sorted(expected)}")
        for name in expected:
            per_key = 2 if self.mode == "one" else len(self.tuners[name].configs)
            calls = self.bench_calls[name]
            assert calls % per_key == 0, f"{name}: {calls} benchmarks, not a multiple of the {per_key} configs"
            assert self.bench_runs[name] == calls * self.runs, f"{name}: {self.bench_runs[name]} benchmark runs"
            assert self.launches[name] > self.bench_runs[name], f"{name}: benchmarked but never launched"


@contextlib.contextmanager
def gpu_like_autotuning(mode: str = "all", runs: int = 2, winner: str = "first") -> Iterator[AutotuneHarness]:
    """Every autotuned kernel of the package benchmarks its configs on the real arguments (``runs`` runs each) on the
    first call of each key, as on a GPU; ``mode="one"``: one config left after pruning and benchmarked (triton 3.6);
    ``winner="last"``: the last config benchmarked is launched (a variant, not the kernel's own config)."""
    tuners = autotuned_kernels()
    saved = {name: dict(vars(tuner)) for name, tuner in tuners.items()}
    harness = AutotuneHarness(tuners, mode, runs, winner)
    try:
        harness.patch()
        yield harness
    finally:
        for name, tuner in tuners.items():
            vars(tuner).clear()
            vars(tuner).update(saved[name])


@pytest.fixture(name="autotune_harness")
def autotune_harness_fixture() -> Iterator:
    """``autotune_harness(mode="all", runs=2, winner="first")``: enters ``gpu_like_autotuning`` and returns its
    harness; everything it patched is put back when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(gpu_like_autotuning(**options))
