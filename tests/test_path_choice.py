"""FUSED_LORA_GEMM=auto: the path (fused Triton GEMM, cuBLAS + in-place rank-r kernels, or the whole PyTorch path)
chosen per key (device, dtypes, layout, shape, token bucket, dropout, bias) by timing each candidate's forward and
backward on first use, kept in memory and in a file, and used by the backward of the same shape. Tested on CPU with an
injected timer (the kernels run through the interpreter)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CUDA
from test_fallbacks import counting
from test_functional import make_problem, run_and_check

from fused_lora import diagnostics, dispatch, hardware
from fused_lora.backends import lora_triton, path_choice

pytestmark = pytest.mark.skipif(CUDA, reason="injects a GPU capability and a timer into the CPU path")


@pytest.fixture(autouse=True)
def auto_on_a_gpu_like_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.delenv("FUSED_LORA_GEMM", raising=False)
    monkeypatch.setenv("FUSED_LORA_GEMM_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setattr(hardware, "device_capability", lambda device: (9, 0))  # resolve_gemm says "auto"
    diagnostics.clear()
    yield
    path_choice.set_timer(None)
    diagnostics.clear()


def fake_timer(times: dict[str, float], calls: list[str]):
    def timer(name, fn, device):
        calls.append(name)
        fn()
        return times[name]
    return timer


@pytest.mark.parametrize("faster", ["fused", "composed"])
def test_auto_times_once_and_keeps_the_faster(faster, monkeypatch):
    calls: list[str] = []
    path_choice.set_timer(fake_timer({"fused": 1.0 if faster == "fused" else 2.0,
                                      "composed": 1.0 if faster == "composed" else 2.0, "torch": 3.0}, calls))
    up_add = counting(monkeypatch, lora_triton, "lora_up_add")
    dx_add = counting(monkeypatch, lora_triton, "lora_dx_add")
    fused_gemm = counting(monkeypatch, lora_triton, "lora_dx")
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    R = path_choice.REPEATS
    assert calls == ["fused"] * R + ["composed"] * R + ["torch"] * R
    (entry,) = diagnostics.path_report().values()
    assert entry["chosen"] == entry["runs"] == faster
    n_up_add, n_dx_add, n_dx = len(up_add), len(dx_add), len(fused_gemm)
    problem = make_problem((3, 11), 40, 28, 6, torch.float32, "linear", True, seed=1)
    run_and_check(*problem, scaling=1.5, p=0.2, layout="linear", backend="triton")
    assert len(calls) == 3 * path_choice.REPEATS, "a kept choice is not timed again"
    assert len(up_add) == n_up_add + (faster == "composed")
    # the backward of the same shape followed the forward's choice
    assert (len(dx_add) - n_dx_add, len(fused_gemm) - n_dx) == ((1, 0) if faster == "composed" else (0, 1))


def test_choices_are_per_shape_and_kept_in_the_file(tmp_path):
    calls: list[str] = []
    path_choice.set_timer(fake_timer({"fused": 2.0, "composed": 1.0, "torch": 3.0}, calls))
    for K in (40, 48):
        run_and_check(*make_problem((9,), K, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                      layout="linear", backend="triton")
    assert len(calls) == 6 * path_choice.REPEATS  # two shapes, three paths each
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert len(saved) == 2 and set(saved.values()) == {"composed"} and all("|K40|" in k or "|K48|" in k for k in saved)
    diagnostics.clear()  # a new process: read from the file, nothing timed
    run_and_check(*make_problem((9,), 40, 28, 6, torch.float32, "linear", True), scaling=1.0, p=0.0,
                  layout="linear", backend="triton")
    assert len(calls) == 6 * path_choice.REPEATS


def test_a_broken_cache_file_is_decided_again(tmp_path):
    (tmp_path / "choices.json").write_text("{not json")
    calls: list[str] = []
    path_choice.set_timer(fake_timer({"fused": 1.0, "composed": 2.0, "torch": 3.0}, calls))
    run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "conv1d", False), scaling=1.0, p=0.1,
                  layout="conv1d", backend="triton")
    assert len(calls) == 3 * path_choice.REPEATS
    assert set(json.loads((tmp_path / "choices.json").read_text()).values()) == {"fused"}


def test_turing_times_composed_and_torch_never_the_fused_gemm(monkeypatch):
    """Turing: Triton's dots run on FMA units there (no tensor cores), so auto times only the composed path (cuBLAS's
    base GEMM) against the PyTorch path."""
    monkeypatch.setattr(hardware, "device_capability", lambda device: (7, 5))
    assert dispatch.route(dispatch.LORA, "dense", torch.device("cpu"), torch.float16, "triton")[1:] == \
        ("auto", ("composed", "torch"))
    calls: list[str] = []
    path_choice.set_timer(fake_timer({"composed": 1.0, "torch": 2.0}, calls))
    run_and_check(*make_problem((5,), 24, 16, 4, torch.float32, "linear", True), scaling=1.0, p=0.1,
                  layout="linear", backend="triton")
    assert calls == ["composed"] * path_choice.REPEATS + ["torch"] * path_choice.REPEATS


@pytest.mark.parametrize("faster", ["fused", "torch"])
def test_the_pytorch_path_is_a_candidate_and_its_choice_is_reported(faster, monkeypatch):
    """auto keeps the PyTorch path where it is faster than both Triton paths (at worst as fast as our own PyTorch path),
    with the kernels' dropout mask (the backward agrees), and path_report says what was timed."""
    import fused_lora

    calls: list[str] = []
    path_choice.set_timer(fake_timer({"fused": 2.0 if faster == "torch" else 1.0, "composed": 3.0,
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


def test_triton_keeps_its_autotuning_results_across_runs():
    """Every autotuned kernel asks triton to keep its result on disk (cache_results), so a restart re-tunes nothing.
    Checked in a process without the interpreter, which turns the cache off."""
    import os
    import subprocess
    import sys

    code = ("from triton.runtime.autotuner import Autotuner\n"
            "from fused_lora.kernels import catalog\n"
            "tuned = [n for n in catalog.__all__ if isinstance(getattr(catalog, n), Autotuner)]\n"
            "off = [n for n in tuned if not getattr(catalog, n).cache_results]\n"
            "assert len(tuned) >= 14 and not off, (tuned, off)\n"
            "print(len(tuned))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_auto_times_a_forward_and_a_backward_of_each_candidate(monkeypatch):
    """What a training step runs: each candidate's forward and backward (the PyTorch path making its mask in both)."""
    dy_passes = counting(monkeypatch, lora_triton, "lora_dy_pass")
    masks_made = []
    from fused_lora.backends import masks

    real_keep = masks.keep
    monkeypatch.setattr(masks, "keep", lambda *a, **k: masks_made.append(1) or real_keep(*a, **k))
    seen: list[tuple[str, int, int]] = []

    def timer(name, fn, device):
        d, m = len(dy_passes), len(masks_made)
        fn()
        seen.append((name, len(dy_passes) - d, len(masks_made) - m))
        return {"fused": 1.0, "composed": 2.0, "torch": 3.0}[name]

    path_choice.set_timer(timer)
    run_and_check(*make_problem((3, 7), 40, 28, 6, torch.float32, "linear", True), scaling=1.5, p=0.2,
                  layout="linear", backend="triton")
    assert {(n, d, m) for n, d, m in seen} == {("fused", 1, 0), ("composed", 1, 0), ("torch", 0, 2)}


def test_dropout_and_bias_are_in_the_key():
    """A choice made at p = 0 (an evaluation) does not serve training at p > 0: their costs differ."""
    calls: list[str] = []
    path_choice.set_timer(fake_timer({"fused": 1.0, "composed": 2.0, "torch": 3.0}, calls))
    for p in (0.0, 0.1):
        run_and_check(*make_problem((3, 7), 40, 28, 6, torch.float32, "linear", True), scaling=1.5, p=p,
                      layout="linear", backend="triton")
    keys = list(diagnostics.path_report())
    assert len(keys) == 2 and sum(k.endswith("|dropout|bias") for k in keys) == 1
    assert len(calls) == 6 * path_choice.REPEATS
