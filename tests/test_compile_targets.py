"""The kernels compile for real GPUs (sm_80, sm_90) on this CPU-only machine, without spilling, and use
tensor cores. Runs bench/compile_report.py in a subprocess: the compiler needs the jit functions that
TRITON_INTERPRET=1 (set for this test session on CPU) replaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "bench" / "compile_report.py"


@pytest.mark.parametrize(("arch", "dtype", "tensor_op"), [(90, "bf16", "hgmma"), (80, "fp16", "hmma")])
def test_kernels_compile_for_gpu(tmp_path, arch, dtype, tensor_op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(REPORT), "--arch", str(arch), "--dtype", dtype, "--json", str(out)],
                   env=env, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert set(report) == {"lora_down_kernel", "lora_fwd_kernel", "lora_dy_kernel", "lora_dx_kernel",
                           "lora_da_kernel"}
    for name, r in report.items():
        assert r["stack_bytes"] <= 16, f"{name} spills {r['stack_bytes']} B/thread on sm_{arch}: {r}"
        assert r["hgmma"] + r["hmma"] > 0, f"{name} uses no tensor-core instruction on sm_{arch}: {r}"
    if arch == 90:  # the big GEMMs must use Hopper's warpgroup MMA, not the Ampere path
        assert report["lora_fwd_kernel"][tensor_op] > 0 and report["lora_dx_kernel"][tensor_op] > 0
