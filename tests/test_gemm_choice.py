"""FUSED_LORA_GEMM=auto (issues 14, 20): the path (fused Triton GEMM, cuBLAS + in-place rank-r kernels, or the whole
PyTorch path) chosen per (device, dtypes, layout, shape, token bucket) by timing the candidates on first use, kept in
memory and in a file, and used by the backward of the same shape. Tested on CPU with an injected timer (the kernels run
through the interpreter)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CUDA
from test_fallbacks import counting
from test_functional import make_problem, run_and_check

from fused_lora import dispatch, hardware
from fused_lora.backends import gemm_choice, lora_triton, self_check

pytestmark = pytest.mark.skipif(CUDA, reason="injects a GPU capability and a timer into the CPU path")


@pytest.fixture(autouse=True)
def auto_on_a_gpu_like_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    monkeypatch.setenv("FUSED_LORA_GEMM_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setattr(hardware, "device_capability", lambda device: (9, 0))  # resolve_gemm says "auto"
    gemm_choice.clear()
    self_check.clear()
    yield
    gemm_choice.set_timer(None)
    gemm_choice.clear()
    self_check.clear()


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
                                      "composed": 1.0 if faster == "composed" else 2.0, "torch": 3.0}, calls))
    up_add = counting(monkeypatch, lora_triton, "lora_up_add")
    dx_add = counting(monkeypatch, lora_triton, "lora_dx_add")
    fused_gemm = counting(monkeypatch, lora_triton, "lora_dx")
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    R = gemm_choice.REPEATS
    assert calls == ["fused"] * R + ["composed"] * R + ["torch"] * R
    # the backward of the same shape followed the forward's choice
    assert (len(dx_add), len(fused_gemm)) == ((1, 0) if faster == "composed" else (0, 1))
    n_up_add = len(up_add)
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True, seed=1)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    assert len(calls) == 3 * gemm_choice.REPEATS, "a kept choice is not timed again"
    assert len(up_add) == n_up_add + (faster == "composed")


def test_choices_are_per_shape_and_kept_in_the_file(tmp_path):
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 2.0, "composed": 1.0, "torch": 3.0}, calls))
    for K in (40, 48):
        run_and_check(*make_problem((9,), K, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                      layout="linear", backend="triton")
    assert len(calls) == 6 * gemm_choice.REPEATS  # two shapes, three paths each
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert len(saved) == 2 and set(saved.values()) == {"composed"} and all("|K40|" in k or "|K48|" in k for k in saved)
    gemm_choice.clear()  # a new process: read from the file, nothing timed
    run_and_check(*make_problem((9,), 40, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                  layout="linear", backend="triton")
    assert len(calls) == 6 * gemm_choice.REPEATS


def test_a_broken_cache_file_is_decided_again(tmp_path):
    (tmp_path / "choices.json").write_text("{not json")
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 1.0, "composed": 2.0, "torch": 3.0}, calls))
    run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "conv1d", False), scaling=1.0, p=0.1,
                  layout="conv1d", backend="triton")
    assert len(calls) == 3 * gemm_choice.REPEATS
    assert set(json.loads((tmp_path / "choices.json").read_text()).values()) == {"fused"}


def test_turing_times_composed_and_torch_never_the_fused_gemm(monkeypatch):
    """Turing: Triton's dots run on FMA units there (no tensor cores), so auto times only the composed path (cuBLAS's
    base GEMM) against the PyTorch path."""
    monkeypatch.setattr(hardware, "device_capability", lambda device: (7, 5))
    assert dispatch.route(dispatch.LORA, "dense", torch.device("cpu"), torch.float16, "triton")[1:] == \
        ("auto", "composed,torch")
    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"composed": 1.0, "torch": 2.0}, calls))
    run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "linear", True), scaling=1.0, p=0.1,
                  layout="linear", backend="triton")
    assert calls == ["composed"] * gemm_choice.REPEATS + ["torch"] * gemm_choice.REPEATS


@pytest.mark.parametrize("faster", ["fused", "torch"])
def test_the_pytorch_path_is_a_candidate_and_its_choice_is_reported(faster, monkeypatch):
    """auto keeps the PyTorch path where it is faster than both Triton paths (issue 20: at worst as fast as our own
    PyTorch path), with the kernels' dropout mask (the backward agrees), and path_report says what was timed."""
    import fused_lora

    calls: list[str] = []
    gemm_choice.set_timer(fake_timer({"fused": 2.0 if faster == "torch" else 1.0, "composed": 3.0,
                                      "torch": 1.0 if faster == "torch" else 2.0}, calls))
    fused_gemm = counting(monkeypatch, lora_triton, "lora_forward")
    run_and_check(*make_problem((3, 7), 40, 28, 6, torch.float32, "linear", True), scaling=1.5, p=0.2,
                  layout="linear", backend="triton")
    report = fused_lora.path_report()
    (key, entry), = report.items()
    assert key.startswith("lora|") and entry["chosen"] == faster and set(entry["timed"]) == {"fused", "composed",
                                                                                             "torch"}
    n = len(fused_gemm)
    run_and_check(*make_problem((3, 7), 40, 28, 6, torch.float32, "linear", True, seed=1), scaling=1.5, p=0.2,
                  layout="linear", backend="triton")
    assert len(fused_gemm) == n + (faster == "fused")
