"""bench/run_gpu.sh cannot rot: its CPU dry run (RUN_GPU_DEVICE=cpu) goes through the check, bench and model stages
with tiny sizes (the check stage's pytest selection skips without CUDA, but must select its tests), writes what a GPU
run writes, and keeps to its time budget. Everything goes to a temporary OUT and cache: nothing is left in the repo.
~40 s on 2 cores. Skipped when CUDA is there (conftest.py): run the script itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "run_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def dry_run(mode: str, out: Path, budget: int | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "RUN_GPU_DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
           "RUN_GPU_CACHE": str(out.parent / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    if budget is not None:
        env["RUN_GPU_BUDGET"] = str(budget)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), mode], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    return proc, time.monotonic() - start


def test_dry_run_of_check_bench_and_model(tmp_path):
    """`all` = check, then bench, then model: every stage starts and ends with rc=0, and the 8 files are there."""
    before = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    had_cache = (REPO / ".triton-cache").exists()
    out = tmp_path / "out"
    proc, _ = dry_run("all", out)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    for stage in ("check", "bench/host-calibration", "bench/traffic-model", "bench/layer", "bench/vs-model", "model"):
        assert f"== [{stage}] start" in log and f"== [{stage}] done: rc=0" in log, stage
    # check: both processes selected tests (skipped without CUDA), none deselected into nothing
    counts = [int(n) for n in re.findall(r"=+ (\d+) skipped, \d+ deselected", log)]
    assert len(counts) == 2 and sum(counts) >= 15, counts
    assert "LoRAFusion 8192 M=8192 8192→8192" in log  # the traffic model's rows
    assert "MODEL, not a measurement" in log and "measured/model" in log  # measurements beside the model
    # the host-cost calibration (ours vs PEFT per layer), its table in the summary
    assert "---- host cost per layer, ours vs PEFT" in proc.stdout
    assert "| 16→16, 4 tokens | 0.1 | float32 |" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    # at most 8 files come back from a lent GPU: the plots (the bench extra's matplotlib) give way to verify.md
    assert files == sorted(["env.txt", "layer.json", "layer.md", "model.json", "model.md", "run.log", "verify.md"])
    verify = (out / "verify.md").read_text()
    assert "| pass |" in verify and "FAIL" not in verify and "First-call cost of the check" in verify
    assert "fused_lora from" in (out / "env.txt").read_text()
    assert sorted(p.name for p in (REPO / "bench" / "results").iterdir()) == before
    assert (REPO / ".triton-cache").exists() == had_cache


def test_dry_run_of_dora(tmp_path):
    """`dora` (DoRA's GPU case): the DoRA benchmark runs and leaves its table and JSON."""
    out = tmp_path / "out"
    proc, _ = dry_run("dora", out)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    assert "== [dora] done: rc=0" in log
    assert {"dora.json", "dora.md"} <= {p.name for p in out.iterdir()}
    assert "---- dora.md" in proc.stdout


def test_budget_is_kept_by_skipping_what_does_not_fit(tmp_path):
    """A stage whose cap does not fit in what is left of RUN_GPU_BUDGET is skipped (exit 1), never started late."""
    out = tmp_path / "out"
    proc, seconds = dry_run("check", out, budget=30)  # the environment check fits (cap 15 s), the check stage not
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "== [check] SKIPPED: budget spent" in proc.stdout
    assert seconds < 30


def test_usage():
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_lorafusion_plan():
    """bench runs LoRAFusion's kernel shapes: bf16, r = 16, p = 0.1, K = N ∈ {4096, 5120, 8192}, M ∈ {2048, 4096,
    8192}, the issue-4 target case first."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import layer_bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    cases = layer_bench.plan_cases("lorafusion", "cuda")
    got = {(dt, s.M, s.K, s.N, s.r, s.p, s.bias) for dt, s in cases}
    want = {("bfloat16", M, K, K, 16, 0.1, False) for K in (4096, 5120, 8192) for M in (2048, 4096, 8192)}
    assert len(cases) == 9 and got == want
    assert (cases[0][1].M, cases[0][1].K) == (8192, 4096)
