#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200 image: python3 3.12, torch 2.11, triton 3.6, transformers,
# peft, pytest-benchmark; nothing installable, no virtualenv, the repo not pip-installed):
#
#     bench/run_gpu.sh            # all: GPU tests, layer + model benchmarks, CUDA test suite (< 10 min)
#     bench/run_gpu.sh tests      # only the tests (pytest tests -m gpu, then the whole tests/ on CUDA)
#     bench/run_gpu.sh bench      # only the benchmarks, with more time for the layer sweep
#     bench/run_gpu.sh full       # the full layer sweep of the issue (M × shapes × r × p × dtypes), budgeted
#
# Writes at most 8 files (the device tool returns 8) into $OUT when it is set (the device tool's output
# folder), else into bench/results/<gpu>-<date>/:
#     env.txt                   nvidia-smi, versions, where fused_lora was imported from
#     run.log                   every stage's output (tests, benchmarks, pytest-benchmark table)
#     layer.json/.md/.png       layer_bench.py    model.json/.md/.png    model_bench.py
# Each stage runs under a time cap carved from RUN_GPU_BUDGET seconds (default 560, inside the device
# tool's 600 s per command); a stage that hits its cap is killed and the next one starts.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-all}"
PY="${PYTHON:-python3}"
BUDGET="${RUN_GPU_BUDGET:-560}"
DEVICE="${RUN_GPU_DEVICE:-cuda}"  # cpu only to try this script on a machine without a GPU
START=$(date +%s)
export PYTHONUNBUFFERED=1

case "$MODE" in all|tests|bench|full) ;; *) echo "usage: $0 [all|tests|bench|full]" >&2; exit 2 ;; esac

# --- make `import fused_lora` and `import fused_lora.kernels` work without pip ---------------------------
# pyproject.toml maps the top-level kernels/ folder to fused_lora.kernels; a plain PYTHONPATH=$REPO would
# give fused_lora without its kernels (and a top-level `kernels` that shadows HF's package). So build a
# symlink farm: $SHIM/fused_lora/<each file of fused_lora/> plus $SHIM/fused_lora/kernels -> $REPO/kernels.
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/fused_lora_shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/fused_lora"
for entry in "$REPO"/fused_lora/*; do
    name="$(basename "$entry")"
    [ "$name" = "__pycache__" ] && continue
    ln -s "$entry" "$SHIM/fused_lora/$name"
done
[ -e "$SHIM/fused_lora/kernels" ] || ln -s "$REPO/kernels" "$SHIM/fused_lora/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
# The repo root must not shadow the shim: `python -m` would put the cwd (holding fused_lora/ without
# kernels/) first on sys.path. PYTHONSAFEPATH (3.11+) stops that; running from $SHIM covers older Pythons.
export PYTHONSAFEPATH=1
cd "$SHIM"

# --- output folder -----------------------------------------------------------------------------------
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
SLUG="$(echo "${GPU_NAME:-gpu}" | tr 'A-Z' 'a-z' | grep -oE 'h200|h100|a100|l40s|l4|a10' | head -1)"
SLUG="${SLUG:-$(echo "${GPU_NAME:-gpu}" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')}"
RES="${OUT:-$REPO/bench/results/$SLUG-$(date +%Y-%m-%d)}"
mkdir -p "$RES"
LOG="$RES/run.log"
: >"$LOG"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage NAME CAP_SECONDS CMD...: runs CMD under min(CAP, time left - 15 s), output appended to run.log.
stage() {
    local name="$1" cap="$2"; shift 2
    local left; left=$(( $(remaining) - 15 ))
    local t=$(( cap < left ? cap : left ))
    if [ "$t" -lt 20 ]; then
        echo "== $name: SKIPPED (budget spent: $(remaining)s left)" | tee -a "$LOG"
        return 0
    fi
    echo "== $name (cap ${t}s, $(remaining)s left): $*" | tee -a "$LOG"
    local t0; t0=$(date +%s)
    timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    local verdict="rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${t}s"
    echo "== $name: $verdict in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
    tail -n 25 "$LOG" | grep -E "passed|failed|error|skipped|TIMED OUT|Targets|MISSED|met" | tail -n 6
    return 0
}

# --- environment -------------------------------------------------------------------------------------
{
    echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "mode: $MODE"; echo "repo: $REPO"
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'no git metadata in this copy')"
    echo; nvidia-smi 2>&1
    echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv 2>&1
    echo; "$PY" - <<'PY' 2>&1
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "transformers", "peft", "pytest", "pytest_benchmark", "matplotlib", "numpy"):
    try:
        print(f"{name:18s}", importlib.import_module(name).__version__)
    except Exception as exc:
        print(f"{name:18s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
import fused_lora, fused_lora.kernels
print("fused_lora from", fused_lora.__file__, "kernels from", fused_lora.kernels.__file__)
import importlib.util
print("top-level 'kernels' module:", importlib.util.find_spec("kernels"))
PY
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt"
if ! "$PY" -c "import fused_lora.kernels, torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA'" \
        >>"$LOG" 2>&1; then
    echo "cannot import fused_lora.kernels or no CUDA device: see $LOG" >&2
    tail -n 20 "$LOG" >&2
    exit 1
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -rfEs --durations=15)
LAYER=("$PY" "$REPO/bench/layer_bench.py" --device "$DEVICE" --out "$RES")
MODEL=("$PY" "$REPO/bench/model_bench.py" --device "$DEVICE" --out "$RES")
BENCHTEST=("${PYTEST[@]}" "$REPO/bench/test_bench_layer.py" --benchmark-only --benchmark-group-by=group
           --benchmark-columns=min,median,max,iqr,rounds)

case "$MODE" in
    all)
        stage "GPU tests (-m gpu)" 100 "${PYTEST[@]}" "$REPO/tests" -m gpu
        stage "layer benchmark" 230 "${LAYER[@]}" --time-budget 170
        stage "model benchmark" 100 "${MODEL[@]}" --rounds 2
        stage "whole test suite on CUDA" 150 "${PYTEST[@]}" "$REPO/tests" -q
        stage "pytest-benchmark" 60 "${BENCHTEST[@]}"
        ;;
    tests)
        stage "GPU tests (-m gpu)" 200 "${PYTEST[@]}" "$REPO/tests" -m gpu
        stage "whole test suite on CUDA" 330 "${PYTEST[@]}" "$REPO/tests" -q
        ;;
    bench)
        stage "layer benchmark" 330 "${LAYER[@]}" --time-budget 260
        stage "model benchmark" 150 "${MODEL[@]}"
        stage "pytest-benchmark" 60 "${BENCHTEST[@]}"
        ;;
    full)
        stage "layer benchmark (full sweep)" 540 "${LAYER[@]}" --plan full --time-budget 450
        ;;
esac

# A layer run killed by its cap leaves layer.json (written after every case) but no plot: draw it.
if [ -f "$RES/layer.json" ] && [ ! -f "$RES/layer.png" ]; then
    "$PY" "$REPO/bench/report.py" "$RES/layer.json" >>"$LOG" 2>&1
fi
echo
echo "== results in $RES ($(ls "$RES" | wc -l) files, $(( $(date +%s) - START ))s):"
ls -la "$RES"
for f in layer.md model.md; do
    [ -f "$RES/$f" ] && { echo; echo "---- $f"; tail -n 45 "$RES/$f"; }
done
exit 0
