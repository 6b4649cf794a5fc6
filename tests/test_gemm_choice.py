"""FUSED_LORA_GEMM=auto (issue 14): the base GEMM (fused Triton or cuBLAS + in-place rank-r kernels) chosen per
(device, dtypes, layout, shape, token bucket) by timing both on first use, kept in memory and in a file, and used by
the backward of the same shape. Tested on CPU with an injected timer (the kernels run through the interpreter)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CUDA
from test_fallbacks import counting
from test_functional import make_problem, run_and_check

from fused_lora import dispatch, hardware
from fused_lora.backends import gemm_choice, lora_triton

pytestmark = pytest.mark.skipif(CUDA, reason="injects a GPU capability and a timer into the CPU path")


@pytest.fixture(autouse=True)
def auto_on_a_gpu_like_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    monkeypatch.setenv("FUSED_LORA_GEMM_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setattr(hardware, "device_capability", lambda device: (9, 0))  # resolve_gemm says "auto"
    gemm_choice.clear()
    yield
    gemm_choice.set_timer(None)
    gemm_choice.clear()


def fake_timer(times: dict[str, float], calls: list[str]):
    def timer(name, fn, device):
        calls.append(name)
        fn()
        return times[name]
    return timer


@pytest.mark.parametrize("faster", ["fused", "composed"])
def test_auto_times_once_and_keeps_the_faster(faster, monkeypatch):
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 1.0 if faster == "fused" else 2.0,
                                      "composed": 1.0 if faster == "composed" else 2.0}, calls))
    up_add = counting(monkeypatch, lora_triton, "lora_up_add")
    dx_add = counting(monkeypatch, lora_triton, "lora_dx_add")
    fused_gemm = counting(monkeypatch, lora_triton, "lora_dx")
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    assert calls == ["fused"] * gemm_choice.REPEATS + ["composed"] * gemm_choice.REPEATS
    # the backward of the same shape followed the forward's choice
    assert (len(dx_add), len(fused_gemm)) == ((1, 0) if faster == "composed" else (0, 1))
    n_up_add = len(up_add)
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True, seed=1)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    assert len(calls) == 2 * gemm_choice.REPEATS, "a kept choice is not timed again"
    assert len(up_add) == n_up_add + (faster == "composed")


def test_choices_are_per_shape_and_kept_in_the_file(tmp_path):
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 2.0, "composed": 1.0}, calls))
    for K in (40, 48):
        run_and_check(*make_problem((9,), K, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                      layout="linear", backend="triton")
    assert len(calls) == 4 * gemm_choice.REPEATS  # two shapes, two paths each
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert len(saved) == 2 and set(saved.values()) == {"composed"} and all("|K40|" in k or "|K48|" in k for k in saved)
    gemm_choice.clear()  # a new process: read from the file, nothing timed
    run_and_check(*make_problem((9,), 40, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                  layout="linear", backend="triton")
    assert len(calls) == 4 * gemm_choice.REPEATS


def test_a_broken_cache_file_is_decided_again(tmp_path):
    (tmp_path / "choices.json").write_text("{not json")
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 1.0, "composed": 2.0}, calls))
    run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "conv1d", False), scaling=1.0, p=0.1,
                  layout="conv1d", backend="triton")
    assert len(calls) == 2 * gemm_choice.REPEATS
    assert set(json.loads((tmp_path / "choices.json").read_text()).values()) == {"fused"}


def test_turing_takes_composed_without_timing(monkeypatch):
    monkeypatch.setattr(hardware, "device_capability", lambda device: (7, 5))
    gemm_choice.set_timer(lambda *a: pytest.fail("Turing is not timed: Triton has no tensor-core dot there"))
    assert dispatch.resolve_gemm(torch.device("cpu")) == "composed"
