"""The kernels compile for real GPUs (sm_80, sm_90) on this CPU-only machine with the newest triton: every
kernel, autotune config and launch variant of bench/compile_matrix.py's CI matrix, checked from the cubin
for spills (STACK and LOCAL 0), registers within the launch's budget, shared memory within the device limit
and tensor-core instructions. Runs bench/compile_report.py in a subprocess: the compiler needs the jit
functions that TRITON_INTERPRET=1 (set for this test session on CPU) replaces. .ci/run runs the same
report with triton 3.6.0, the GPU image's version, in a torch-free venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import compile_matrix as cm  # noqa: E402

from fused_lora import triton_ops  # noqa: E402


def test_matrix_follows_the_launchers():
    """compile_matrix mirrors triton_ops' BLOCK_R and precision choices (it cannot import torch)."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name, dtype in names.items():
        assert all(cm.block_r(r, name) == triton_ops._block_r(r, dtype) for r in range(1, 300))
        assert {cm.block_r(r, name) for r in range(1, 300)} <= {cm.block_r(v.rank, name) for v in cm.full_matrix()}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for name, dtype in names.items():
                assert cm.precision(name, tf32) == triton_ops.dot_precision(dtype), (name, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_kernels_compile_for_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--check", "--quiet", "--jobs", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout + proc.stderr
    records = json.loads(out.read_text())
    failed = [f"sm_{r['arch']} {r['kernel']} {r['variant']} {r['config']}: {r['problems']}"
              for r in records if r["problems"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Coverage: both targets, every kernel, the dtype pairs and both weight layouts, every config.
    seen = {(r["arch"], r["kernel"], r["variant"].split()[0]) for r in records}
    assert seen == {(a, k, f"{b}/{ad}") for a in (80, 90) for k in cm.KERNELS for b, ad in cm.CI_DTYPES}
    for kernel in cm.GEMM_KERNELS:
        assert {r["variant"].split()[1] for r in records if r["kernel"] == kernel} == {"linear", "conv1d"}
    # Every (target, variant) of the CI matrix, at each config the autotuner may pick for it.
    groups = Counter((r["arch"], r["kernel"], r["variant"]) for r in records)
    assert set(groups) == {(a, v.kernel, v.label()) for a in (80, 90) for v in cm.ci_matrix()}
    assert all(n == r["configs_of_variant"] for r in records
               for n in [groups[(r["arch"], r["kernel"], r["variant"])]])
