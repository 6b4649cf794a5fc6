#!/usr/bin/env bash
# The launch fast path's tests (tests/test_fast_launch.py) with triton 3.6.0, the GPU machines' triton: triton's real
# Autotuner/JITFunction launch path, kernels compiled for sm_90 on this CPU, launches recorded by a stand-in driver
# (tests/fake_cuda.py). The suite's own run (.ci/run, `pytest`) covers the newest triton the same way.
# The venv is kept while it holds torch 2.13.0 and triton 3.6.0 (making it: ~1 min); numpy < 2.3: triton 3.6's
# interpreter fails with numpy 2.4 (the tests' other modules import it).
# Time, 2 cores (measured): making the venv ~2 min; the tests 26 s with an empty triton cache (TRITON_CACHE_DIR; they
# compile ~25 kernels), 8 s with it warm (~/.triton/cache).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-ci-triton36-torch
if ! "$venv/bin/python" -c "import torch, triton; assert triton.__version__ == '3.6.0' and torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0 triton==3.6.0 "numpy<2.3"
    "$venv/bin/pip" install -q --no-deps -e .
    "$venv/bin/pip" install -q pytest "transformers>=4.45" safetensors peft
fi
echo "== the launch fast path against triton 3.6.0's launch path ($("$venv/bin/python" -c 'import triton; print(triton.__version__)'))"
TRITON_INTERPRET=0 "$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts= tests/test_fast_launch.py "$@"
