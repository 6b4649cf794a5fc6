"""pytest plugin for bench/peft_suite.py: runs PEFT's own tests with every returned model put through
``fused_lora.peft.accelerate``, and records what happened.

Loaded with ``-p peft_suite_plugin`` (bench/ on PYTHONPATH). Options:

    --fused-accelerate        patch PEFT so that get_peft_model, inject_adapter_in_model, PeftModel.from_pretrained
                              and PeftMixedModel.from_pretrained return accelerated models (without it, or
                              --fused-enable, the plugin only records outcomes: the plain pass)
    --fused-enable            instead: call fused_lora.peft.enable() (PEFT's LoRA tuner serves every model it builds)
    --peft-suite-json PATH    write per-test outcomes, swapped layers and fused calls as JSON at session end

Counts: "swapped" is the number of LoRA layers that ``accelerate`` turned into ``fused_lora.peft.FusedLinear`` (a
layer swapped once counts once), "fused calls" the calls of ``fused_lora.peft.fused_lora_linear`` (the fused Function's
entry point; ``FusedLinear.forward`` looks it up as a module global on every call, so wrapping it there sees every
fused forward). Under torch.compile a call is counted when dynamo traces it, not per compiled run. "Fallback reasons"
are the reasons ``fused_lora.peft`` gave for keeping PEFT's forward (``layer_reason`` / ``_call_reason`` returning
one, when a model is accelerated or a layer is called), per test.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import types
from collections import defaultdict

import pytest

# Imported by PEFT's test modules at module level but used only by tests outside this runner's selection: diffusers
# (Stable Diffusion pipelines; test_tuners_utils.py also reads diffusers.__version__), datasets (Hub datasets) and
# parameterized (test_tuners_utils.py's regex tests). PEFT's test extras pull them in (datasets alone brings pyarrow
# and pandas, ~100 MB); when they are not installed, a placeholder module keeps the test modules importable: its
# functions raise ImportError when called, and a test made by the placeholder ``parameterized.expand`` skips.
# They are installed after peft and transformers are imported, so those libraries' availability flags still see
# the real environment.
_STUB_VERSION = "0.0.0"  # diffusers' version for test_tuners_utils.py's module-level `>= 0.40.0.dev0` check


def _unavailable(name: str):
    def unavailable(*args, **kwargs):
        raise ImportError(f"{name} is a placeholder installed by bench/peft_suite_plugin.py (not installed)")

    return unavailable


class _ParameterizedStub:
    @staticmethod
    def expand(*args, **kwargs):
        def decorator(func):
            def skipped(self):
                pytest.skip("parameterized is not installed (placeholder from bench/peft_suite_plugin.py)")

            skipped.__name__ = skipped.__qualname__ = func.__name__
            return skipped

        return decorator


def _stub_modules() -> dict[str, dict]:
    return {
        "diffusers": {"StableDiffusionPipeline": _unavailable("diffusers"), "__version__": _STUB_VERSION},
        "datasets": {"load_dataset": _unavailable("datasets")},
        "parameterized": {"parameterized": _ParameterizedStub},
        # test_initialization.py: `from scipy import stats` (kstest in 6 initialization-distribution tests, which
        # bench/peft_suite.py leaves out of its selection when scipy is missing)
        "scipy": {"stats": types.SimpleNamespace(kstest=_unavailable("scipy"))},
        # peft.tuners.lora.corda (imported by test_initialization.py) does `from attr import dataclass` (attrs, not in
        # peft's dependencies); attrs' `dataclass` is `attr.s(auto_attribs=True)`, which dataclasses.dataclass matches
        # for corda's plain tensor containers
        "attr": {"dataclass": dataclasses.dataclass},
    }


def _install_stubs() -> list[str]:
    stubbed = []
    for name, attrs in _stub_modules().items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() raises on a None __spec__
        for attr, value in attrs.items():
            setattr(module, attr, value)
        sys.modules[name] = module
        stubbed.append(name)
    return stubbed


class _Recorder:
    def __init__(self, accelerate: bool, via: str = "accelerate"):
        self.accelerate = accelerate
        self.via = via  # "accelerate" (entry points patched) or "enable" (fused_lora.peft.enable())
        self.current: str | None = None  # nodeid of the running test (setup, call and teardown)
        self.reports: dict[str, dict[str, pytest.TestReport]] = defaultdict(dict)
        self.fused_calls: dict[str, int] = defaultdict(int)
        self.swapped: dict[str, int] = defaultdict(int)
        self.accelerated_models: dict[str, int] = defaultdict(int)
        self.reasons: dict[str, set[str]] = defaultdict(set)
        self.patched: list[str] = []
        self.stubbed: list[str] = []
        self.start = time.perf_counter()

    # -- patches -------------------------------------------------------------------------------------------------
    def _accelerate(self, model):
        import torch
        from peft.tuners.lora import LoraLayer

        import fused_lora.peft as flp

        if not isinstance(model, torch.nn.Module) or not any(isinstance(m, LoraLayer) for m in model.modules()):
            return model  # another PEFT method's model: accelerate would raise its ValueError; left as it is
        before = sum(type(m) is flp.FusedLinear for m in model.modules())
        try:
            flp.accelerate(model)
        except ValueError as err:
            if "LoRA layer" not in str(err):
                raise  # any other refusal of a model with LoRA layers is a finding: the test fails with it
            return model  # accelerate's own "holds no PEFT LoRA layer"
        after = sum(type(m) is flp.FusedLinear for m in model.modules())
        key = self.current or "<outside tests>"
        self.swapped[key] += after - before
        self.accelerated_models[key] += 1
        return model

    def install(self) -> None:
        import fused_lora.peft as flp

        self._record_reasons(flp)
        if self.via == "enable":
            self._install_enable(flp)
        else:
            self._install_accelerate(flp)
        # Count the fused Function's calls where FusedLinear.forward looks it up.
        real = flp.fused_lora_linear

        @functools.wraps(real)
        def counting(*args, **kwargs):
            self.fused_calls[self.current or "<outside tests>"] += 1
            return real(*args, **kwargs)

        flp.fused_lora_linear = counting

    def _record_reasons(self, flp) -> None:
        for name in ("layer_reason", "_call_reason"):  # module globals, looked up at each call
            real = getattr(flp, name)

            @functools.wraps(real)
            def recording(*args, _real=real, **kwargs):
                reason = _real(*args, **kwargs)
                if reason is not None:
                    self.reasons[self.current or "<outside tests>"].add(reason)
                return reason

            setattr(flp, name, recording)

    def _install_enable(self, flp) -> None:
        real = flp._serve

        @functools.wraps(real)
        def counting_serve(model, stacklevel):
            before = sum(type(m) is flp.FusedLinear for m in model.modules())
            found = real(model, stacklevel + 1)
            key = self.current or "<outside tests>"
            self.swapped[key] += sum(type(m) is flp.FusedLinear for m in model.modules()) - before
            self.accelerated_models[key] += bool(found)
            return found

        flp._serve = counting_serve
        flp.enable()
        self.patched.append("fused_lora.peft.enable()")

    def _install_accelerate(self, flp) -> None:
        import peft
        import peft.mapping
        import peft.mapping_func
        import peft.mixed_model
        import peft.peft_model

        # Plain functions: replace every module-level binding of the original in peft.* (peft re-exports them from
        # peft/__init__.py, peft.mapping and peft.mapping_func). Test modules bind them with `from peft import ...`
        # when they are imported, after this runs (pytest_configure precedes collection); _sweep() runs again after
        # collection and catches any module that imported them earlier.
        self._functions = {}
        for orig in (peft.mapping_func.get_peft_model, peft.mapping.inject_adapter_in_model):

            @functools.wraps(orig)
            def wrapper(*args, _orig=orig, **kwargs):
                return self._accelerate(_orig(*args, **kwargs))

            self._functions[orig] = wrapper
        self._sweep(prefixes=("peft",))

        # Class methods: patched on the defining class; subclasses (PeftModelForCausalLM, ...) and
        # AutoPeftModel*.from_pretrained go through it with their own cls.
        for cls in (peft.peft_model.PeftModel, peft.mixed_model.PeftMixedModel):
            orig = cls.__dict__["from_pretrained"].__func__

            @functools.wraps(orig)
            def from_pretrained(klass, *args, _orig=orig, **kwargs):
                return self._accelerate(_orig(klass, *args, **kwargs))

            cls.from_pretrained = classmethod(from_pretrained)
            self.patched.append(f"{cls.__module__}.{cls.__name__}.from_pretrained")

    def _sweep(self, prefixes: tuple[str, ...] | None = None) -> None:
        for mod_name, module in list(sys.modules.items()):
            if module is None or (prefixes and not mod_name.startswith(prefixes)):
                continue
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                try:
                    wrapper = self._functions.get(value)
                except Exception:  # unhashable (or oddly hashing) module attribute: not one of ours
                    continue
                if wrapper is not None:
                    setattr(module, attr, wrapper)
                    self.patched.append(f"{mod_name}.{attr}")

    # -- outcomes ------------------------------------------------------------------------------------------------
    def detail(self, nodeid: str) -> str:
        """The first lines of a failure's message (an assertion's first line alone is often `assert False`)."""
        for rep in self.reports[nodeid].values():
            if rep.failed:
                return "\n".join(_message(rep).splitlines()[:6])[:1000]
        return ""

    def outcome(self, nodeid: str) -> tuple[str, str]:
        """(outcome, first line of the error or skip reason) from the setup/call/teardown reports."""
        phases = self.reports[nodeid]
        for when in ("setup", "call", "teardown"):
            rep = phases.get(when)
            if rep is not None and rep.failed:
                kind = "failed" if when == "call" else "error"
                return kind, _first_line(rep)
        for when in ("setup", "call"):
            rep = phases.get(when)
            if rep is not None and rep.skipped:
                if hasattr(rep, "wasxfail"):
                    return "xfailed", str(rep.wasxfail).splitlines()[0] if rep.wasxfail else ""
                return "skipped", _first_line(rep)
        rep = phases.get("call")
        if rep is not None and hasattr(rep, "wasxfail"):
            return "xpassed", ""
        return ("passed", "") if rep is not None else ("unknown", "")

    def result(self, exitstatus: int) -> dict:
        tests = {}
        for nodeid in self.reports:
            outcome, message = self.outcome(nodeid)
            tests[nodeid] = {
                "outcome": outcome,
                "message": message,
                "detail": self.detail(nodeid),
                "fused_calls": self.fused_calls.get(nodeid, 0),
                "swapped": self.swapped.get(nodeid, 0),
                "lora_models": self.accelerated_models.get(nodeid, 0),
                "fallback_reasons": sorted(self.reasons.get(nodeid, ())),
                "seconds": round(sum(r.duration for r in self.reports[nodeid].values()), 3),
            }
        totals, reasons = defaultdict(int), defaultdict(int)
        for t in tests.values():
            totals[t["outcome"]] += 1
            for reason in t["fallback_reasons"]:
                reasons[reason] += 1
        return {
            "mode": "accelerated" if self.accelerate else "plain",
            "via": self.via if self.accelerate else None,
            "backend": os.environ.get("FUSED_LORA_BACKEND", "auto"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
            "exitstatus": int(exitstatus),
            "seconds": round(time.perf_counter() - self.start, 1),
            "totals": dict(totals),
            "swapped_layers": sum(self.swapped.values()),
            "accelerated_models": sum(self.accelerated_models.values()),
            "fused_calls": sum(self.fused_calls.values()),
            "tests_with_fused_calls": sum(1 for t in tests.values() if t["fused_calls"]),
            "tests_with_lora_models": sum(1 for t in tests.values() if t["lora_models"]),
            "fallback_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),  # reason -> number of tests
            "patched": self.patched,
            "stubbed_modules": self.stubbed,
            "tests": tests,
        }


def _message(rep: pytest.TestReport) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple):  # skips: (path, lineno, reason)
        return str(longrepr[2]).strip()
    crash = getattr(longrepr, "reprcrash", None)
    return (crash.message if crash is not None else str(longrepr)).strip()


def _first_line(rep: pytest.TestReport) -> str:
    text = _message(rep)
    return text.splitlines()[0] if text else ""


_KEY = pytest.StashKey[_Recorder]()
_RECORDER: list[_Recorder] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("peft_suite", "fused_lora PEFT-suite runner (bench/peft_suite.py)")
    group.addoption("--fused-accelerate", action="store_true", default=False,
                    help="pass every model PEFT's entry points return through fused_lora.peft.accelerate")
    group.addoption("--fused-enable", action="store_true", default=False,
                    help="serve every PEFT LoRA model through fused_lora.peft.enable() instead")
    group.addoption("--peft-suite-json", default=None, help="write per-test outcomes and counts to this JSON file")


def pytest_configure(config: pytest.Config) -> None:
    import peft  # noqa: F401  (before the placeholders: see _install_stubs)

    via = "enable" if config.getoption("--fused-enable") else "accelerate"
    recorder = _Recorder(accelerate=config.getoption("--fused-accelerate") or via == "enable", via=via)
    recorder.stubbed = _install_stubs()
    if recorder.accelerate:
        recorder.install()
    config.stash[_KEY] = recorder
    _RECORDER[:] = [recorder]


def pytest_collection_finish(session: pytest.Session) -> None:
    recorder = session.config.stash[_KEY]
    if recorder.accelerate and recorder.via == "accelerate":
        recorder._sweep()  # test modules and helpers that bound the originals before install()


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _recorder().current = nodeid


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    _recorder().current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _recorder().reports[report.nodeid][report.when] = report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    recorder = config.stash[_KEY]
    result = recorder.result(exitstatus)
    path = config.getoption("--peft-suite-json")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    tr = terminalreporter
    tr.section("fused_lora peft suite")
    tr.write_line(f"mode: {result['mode']}  backend: {result['backend']}  totals: {result['totals']}")
    if recorder.accelerate:
        tr.write_line(f"swapped layers: {result['swapped_layers']} in {result['accelerated_models']} accelerated "
                      f"models; fused calls: {result['fused_calls']} in {result['tests_with_fused_calls']} tests")
        tr.write_line(f"patched: {', '.join(result['patched'])}")
    if recorder.stubbed:
        tr.write_line(f"placeholder modules (not installed): {', '.join(recorder.stubbed)}")


def _recorder() -> _Recorder:
    return _RECORDER[0]  # the report hooks get no config; one recorder per pytest process
