#!/usr/bin/env bash
# The first GPU minutes, in budgeted stages, for a lent GPU machine (H100/H200 image: python3 3.12,
# torch 2.11, triton 3.6, transformers, peft, pytest; nothing installable, no virtualenv, the repo not pip-installed):
#
#     bash bench/run_gpu.sh check   # ≤ 240 s from a cold Triton cache: the GPU tests most likely to fail first
#     bash bench/run_gpu.sh bench   # ≤ 560 s: host cost per layer vs PEFT (16→16, GPT-2 c_attn); layer table on
#                                   #   LoRAFusion's shapes, beside the traffic model; several adapters on one base,
#                                   #   concurrent vs sequential (bench/multi_bench.py, ≤ 60 s)
#     bash bench/run_gpu.sh model   # ≤ 560 s: one training step of GPT-2 / Gemma-2B shapes, fused vs PEFT
#     bash bench/run_gpu.sh all     # ≤ 560 s: check, then bench, then model, each with a smaller cap
#     bash bench/run_gpu.sh tests   # ≤ 560 s: the whole tests/ suite on CUDA
#     bash bench/run_gpu.sh full    # ≤ 560 s: layer_bench.py's full sweep (budgeted; cut cases are listed)
#     bash bench/run_gpu.sh dora    # ≤ 560 s: fused DoRA vs PEFT DoRA and fused LoRA (target: ≤ 1.2× LoRA at p = 0)
#
# Every step after the start runs under `timeout`, with min(its cap, what the budget has left less a kill grace
# and a reserve for the summary): the whole command ends within RUN_GPU_BUDGET seconds (defaults above) by
# construction. pytest runs with -v and the benchmarks rewrite their JSON after every case, so a stage killed at
# its cap keeps what it had done. `check` runs with FUSED_LORA_AUTOTUNE=0 (one config per kernel, no
# benchmarking), in two pytest processes at once (tests/test_gpu.py -m check, split by -k real_size) so that
# both compile at the same time; bench and model print the autotuner's choices (TRITON_PRINT_AUTOTUNING=1).
#
# Triton's cache (and inductor's) go in .triton-cache/ of the repo (git-ignored; RUN_GPU_CACHE elsewhere): a second
# call on the same warm machine reuses the compiles. Output: at most 8 files (what the device tool returns) into
# $OUT when set, else bench/results/<gpu>-<date>/: env.txt, run.log, verify.md (check: the first-call self-check
# over a case matrix, bench/verify_matrix.py), layer.{json,md,png}, model.{json,md,png} (the plots are dropped when
# they would make more than 8 files).
# Exit status 0 when every stage passed, 1 when one failed, timed out or was skipped for the budget, 2 on usage.
#
# RUN_GPU_DEVICE=cpu: the dry run (CI, tests/test_run_gpu_script.py): the same stages on CPU at tiny sizes (the
# check tests skip without CUDA, `tests` only collects), so that this script cannot rot.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-all}"
PY="${PYTHON:-python3}"
DEVICE="${RUN_GPU_DEVICE:-cuda}"
START=$(date +%s)
export PYTHONUNBUFFERED=1

case "$MODE" in
    check) DEFAULT_BUDGET=240 ;;
    bench|model|all|tests|full|dora) DEFAULT_BUDGET=560 ;;
    *) echo "usage: $0 [check|bench|model|all|tests|full|dora]" >&2; exit 2 ;;
esac
case "$DEVICE" in cuda|cpu) ;; *) echo "RUN_GPU_DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
BUDGET="${RUN_GPU_BUDGET:-$DEFAULT_BUDGET}"
KILL_GRACE=5  # timeout -k: a step that ignores SIGTERM is killed this much later
RESERVE=10    # kept back for the summary after the last step
DRY=0
[ "$DEVICE" = cpu ] && DRY=1

# --- make `import fused_lora` and `import fused_lora.kernels` work without pip ---------------------------
# The repo root on PYTHONPATH is enough: fused_lora/__init__.py registers the top-level kernels/ folder as
# fused_lora.kernels when it is not installed, and that folder has no __init__.py, so it cannot shadow HF's
# `kernels` package (which transformers imports).
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/fused_lora_run.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
WORK="$SHIM/work"  # per-run scratch (check logs, helper scripts); removed on exit
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$SHIM" || exit 1

# --- caches: kept between calls on a warm machine (the device tool keeps ignored folders of the repo) --------
if [ "$DRY" = 1 ]; then
    CACHE="${RUN_GPU_CACHE:-$WORK/cache}"  # a dry run leaves nothing in the repo
    export TRITON_INTERPRET=1
else
    CACHE="${RUN_GPU_CACHE:-$REPO/.triton-cache}"
fi
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$CACHE/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}"
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
cache_entries() { find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l; }
CACHE_BEFORE=$(cache_entries)

# --- output folder -----------------------------------------------------------------------------------
GPU_NAME="$(timeout 15 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
SLUG="$(echo "${GPU_NAME:-$DEVICE}" | tr '[:upper:]' '[:lower:]' | grep -oE 'h200|h100|a100|l40s|l4|a10' | head -1)"
SLUG="${SLUG:-$(echo "${GPU_NAME:-$DEVICE}" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')}"
RES="${OUT:-$REPO/bench/results/$SLUG-$(date +%Y-%m-%d)}"
mkdir -p "$RES"
LOG="$RES/run.log"
: >"$LOG"

# --- budget ------------------------------------------------------------------------------------------
now() { date +%s; }
left() { echo $(( START + BUDGET - $(now) )); }
# cap_for CAP [MIN]: the seconds a step may take: min(CAP, budget left less the kill grace and the reserve).
# Fails (prints nothing) when that is under MIN seconds (default 20).
cap_for() {
    local cap="$1" min="${2:-20}" room
    room=$(( $(left) - KILL_GRACE - RESERVE ))
    [ "$room" -lt "$cap" ] && cap=$room
    [ "$cap" -lt "$min" ] && return 1
    echo "$cap"
}
SUMMARY=()
FAILED=0
skipped() {
    echo "== [$1] SKIPPED: budget spent ($(left)s of ${BUDGET}s left)" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-20s %-26s %4ss' "$1" "skipped (budget)" 0)")
    FAILED=1
}
finish() {  # NAME RC CAP T0
    local verdict="rc=$2" took=$(( $(now) - $4 ))
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then verdict="TIMED OUT at ${3}s"; fi
    [ "$2" -eq 0 ] || FAILED=1
    echo "== [$1] done: $verdict in ${took}s ($(left)s left)" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-20s %-26s %4ss' "$1" "$verdict" "$took")")
}
# stage NAME CAP [--min S] CMD...: CMD under timeout, its output appended to run.log between the markers
# "== [NAME] start" and "== [NAME] done: rc=N".
stage() {
    local name="$1" cap="$2" min=20 t t0 rc
    shift 2
    if [ "$1" = "--min" ]; then min="$2"; shift 2; fi
    if ! t=$(cap_for "$cap" "$min"); then skipped "$name"; return 0; fi
    echo "== [$name] start: cap ${t}s, $(left)s of ${BUDGET}s left: $*" | tee -a "$LOG"
    t0=$(now)
    timeout -k "$KILL_GRACE" "$t" "$@" >>"$LOG" 2>&1
    rc=$?
    finish "$name" "$rc" "$t" "$t0"
}

# --- environment (and: does fused_lora.kernels import, is there a GPU) -------------------------------------
cat >"$WORK/env.py" <<'PY'
import importlib.metadata, importlib.util, os, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "transformers", "peft", "pytest", "pytest-benchmark", "matplotlib", "numpy"):
    try:  # installed versions without importing them (seconds saved on every call)
        print(f"{name:18s}", importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(f"{name:18s} MISSING")
for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_INTERPRET", "FUSED_LORA_BACKEND", "FUSED_LORA_GEMM",
            "FUSED_LORA_AUTOTUNE", "CUDA_VISIBLE_DEVICES"):
    print(f"{key:24s} {os.environ.get(key, '(unset)')}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}", p.name, f"sm_{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
import fused_lora, fused_lora.kernels, triton
print("imported: torch", torch.__version__, "triton", triton.__version__)
print("fused_lora from", fused_lora.__file__, "kernels from", fused_lora.kernels.__file__)
print("top-level 'kernels' module:", importlib.util.find_spec("kernels"))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
PY
{
    echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "mode: $MODE (budget ${BUDGET}s, device $DEVICE)"
    echo "repo: $REPO"; echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'no git metadata in this copy')"
    echo "triton cache: $TRITON_CACHE_DIR ($CACHE_BEFORE entries at start)"
    echo; timeout 15 nvidia-smi 2>&1
    echo; timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv 2>&1
    echo
} >"$RES/env.txt"
if ! T_ENV=$(cap_for 60 10); then T_ENV=10; fi
echo "== [env] start: cap ${T_ENV}s" >>"$LOG"
timeout -k "$KILL_GRACE" "$T_ENV" "$PY" "$WORK/env.py" "$DEVICE" >>"$RES/env.txt" 2>&1
ENV_RC=$?
echo "== [env] done: rc=$ENV_RC" >>"$LOG"
cat "$RES/env.txt"
if [ "$ENV_RC" -ne 0 ]; then
    echo "cannot import fused_lora.kernels, no CUDA device, or the environment check timed out: see env.txt" >&2
    tail -n 20 "$RES/env.txt" >&2
    exit 1
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -rfEs --durations=10 --color=no)
CPU_ONLY_TESTS=(--ignore="$REPO/tests/test_compile_targets.py" --ignore="$REPO/tests/test_traffic_model.py"
                --ignore="$REPO/tests/test_run_gpu_script.py")
if [ "$DRY" = 1 ]; then  # tiny, seconds each: the same scripts and flags as on the GPU
    LAYER_ARGS=(--M 64 --shapes cpu_target --ranks 4 --ps 0.1 --dtypes float32 --providers base naive fused
                --rounds 1 --min-time 0.05 --no-qkv)
    CALIBRATION_ARGS=(--quick --dtypes float32 --ps 0.1)
    MODEL_ARGS=(--models gpt2 --ps 0.1 --layers 1 --batch 1 --seq 32 --vocab 256 --warmup 1 --rounds 1 --steps 1)
    MULTI_ARGS=(--preset tiny --ns 1 2 --tokens 8 --blocks 1 --rounds 1 --min-time 0.05 --no-rss --no-stub)
else
    LAYER_ARGS=(--plan lorafusion)
    MODEL_ARGS=()
    MULTI_ARGS=(--preset opt350m-mlp llama7b-mlp --blocks 1 --tokens 512)
    CALIBRATION_ARGS=()
fi

# --- stages ------------------------------------------------------------------------------------------
# check CAP: tests/test_gpu.py -m check in two pytest processes (-k "not real_size", -k real_size), and the self-check
# over the case matrix (bench/verify_matrix.py → verify.md) in a third, one cap.
check_stage() {
    local t t0 rc=0 r g pids=() rcs=() sel=("not real_size" "real_size") quick=()
    if ! t=$(cap_for "$1"); then skipped check; return 0; fi
    [ "$DRY" = 1 ] && quick=(--quick)
    echo "== [check] start: cap ${t}s, $(left)s of ${BUDGET}s left: tests/test_gpu.py -m check," \
         "FUSED_LORA_AUTOTUNE=0, two processes: -k '${sel[0]}' | -k '${sel[1]}'; bench/verify_matrix.py" | tee -a "$LOG"
    t0=$(now)
    for g in 0 1; do
        FUSED_LORA_AUTOTUNE=0 timeout -k "$KILL_GRACE" "$t" "${PYTEST[@]}" -v "$REPO/tests/test_gpu.py" -m check \
            -k "${sel[$g]}" >"$WORK/check-$g.log" 2>&1 &
        pids+=($!)
    done
    # no new case after 3/4 of the cap: the table is written after the last case that started
    FUSED_LORA_AUTOTUNE=0 timeout -k "$KILL_GRACE" "$t" "$PY" "$REPO/bench/verify_matrix.py" --device "$DEVICE" \
        --out "$RES" --time-budget $(( t * 3 / 4 )) ${quick[@]+"${quick[@]}"} >"$WORK/check-2.log" 2>&1 &
    pids+=($!)
    for g in 0 1 2; do
        wait "${pids[$g]}"
        r=$?
        rcs+=("$r")
        if [ "$r" -eq 124 ] || [ "$r" -eq 137 ] || { [ "$r" -ne 0 ] && [ "$rc" -eq 0 ]; }; then rc=$r; fi
    done
    for g in 0 1; do
        { echo "---- [check] process $((g + 1)) (rc=${rcs[$g]}): -k '${sel[$g]}'"; cat "$WORK/check-$g.log"; } >>"$LOG"
        grep -hE '::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)' "$WORK/check-$g.log" | sed 's/^.*test_gpu.py:://'
        grep -hE '^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped|deselected).* =+$' "$WORK/check-$g.log"
        if [ "${rcs[$g]}" -eq 124 ] || [ "${rcs[$g]}" -eq 137 ]; then
            echo "process $((g + 1)) killed at ${t}s while running: $(grep -E '::' "$WORK/check-$g.log" | tail -n 1)"
        fi
    done
    { echo "---- [check] process 3 (rc=${rcs[2]}): bench/verify_matrix.py"; cat "$WORK/check-2.log"; } >>"$LOG"
    echo "self-check over the case matrix (rc=${rcs[2]}): $(grep -c ': forward pass, backward pass' \
        "$WORK/check-2.log") cases passed both ways; not passed:"
    grep -vE ': forward pass, backward pass$' "$WORK/check-2.log" | tail -n 20
    finish check "$rc" "$t" "$t0"
}

# bench CAP: the traffic model's LoRAFusion rows, the layer benchmark, then each measurement beside the model.
cat >"$WORK/vs_model.py" <<'PY'
"""Each measured fwd+bwd time of layer.json beside bench/traffic_model.py's roofline time for the same case."""
import json, sys
from pathlib import Path

layer_json, bench_dir, gpu = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, bench_dir)
import traffic_model as tm  # noqa: E402

if not layer_json.exists():
    sys.exit(f"{layer_json}: the layer benchmark wrote nothing")
payload = json.loads(layer_json.read_text())
devices = [d for d in tm.DEVICES if d.name == tm.HEAD]
if "H200" in gpu.upper():  # NVIDIA H200 datasheet: 4.8 TB/s HBM3e; the H100 SXM's tensor cores, SMs and L2
    h = devices[0]
    devices.append(tm.Device("H200", 4.8e12, h.peak, h.l2, h.l2_share, h.sms))
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
PATH = {"base": "base", "naive": "peft", "peft": "peft", "compile": "compile", "fused": "fused"}  # naive: eager ops
print(tm.BANNER)
print(f"Measured on {gpu or payload['environment'].get('device')} (fwd+bwd median ms) beside the model's roofline ms "
      f"and DRAM GiB ({tm.HEAD}); naive is modelled as PEFT's eager ops; the model assumes the 16-bit tensor-core "
      "peak for every matmul." + (" CPU dry run: the GPU model does not apply." if "cuda" not in
                                   payload["environment"].get("device_type", "") else ""))
cols = ["case", "provider", "measured ms", *(f"model ms {d.name}" for d in devices),
        *(f"measured/model {d.name}" for d in devices), f"model GiB {tm.HEAD}"]
rows = []
for rec in payload["cases"]:
    sh = rec["shape"]
    s = tm.Shape("bench", sh["label"], sh["M"], sh["K"], sh["N"], r=sh["r"], p=sh["p"], bias=sh["bias"],
                 e=ELEM[rec["dtype"]], ea=ELEM[rec.get("adapter_dtype", rec["dtype"])])
    label = f"{rec['dtype']} M={sh['M']} {sh['K']}→{sh['N']} r={sh['r']} p={sh['p']}"
    for prov, r in rec["providers"].items():
        ms = r.get("time", {}).get("fwdbwd", {}).get("ms")
        kernels = {d.name: tm.PATHS[PATH[prov]](s, d) for d in devices} if prov in PATH else {}
        model = [1e3 * sum(max(k.bytes / d.bw, k.flops / d.peak) for k in kernels[d.name]) if kernels else None
                 for d in devices]
        gib = sum(k.bytes for k in kernels[tm.HEAD]) / tm.GIB if kernels else None
        fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
        rows.append([label, prov, fmt(ms, ".3f"), *(fmt(m, ".3f") for m in model),
                     *(fmt(ms / m if ms and m else None, ".2f") for m in model), fmt(gib, ".3f")])
widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
for row in [cols, *rows]:
    print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
PY
bench_stage() {
    local t
    # The host cost per layer, ours (fused, composed, fused without the launch fast path) vs PEFT, wall clock and host
    # CPU time at 16→16 and GPT-2's c_attn: checks bench/host_gpu.py's CPU estimate (one config per kernel: ~20
    # compiles from a cold cache, seconds of measuring).
    stage bench/host-calibration 90 --min 10 "$PY" "$REPO/bench/host_calibration.py" --device "$DEVICE" \
        "${CALIBRATION_ARGS[@]}"
    stage bench/traffic-model 30 --min 5 "$PY" "$REPO/bench/traffic_model.py" --only LoRAFusion
    if ! t=$(cap_for "$1"); then skipped bench/layer; else
        # No new case after 3/4 of the cap: one bf16 8192×8192 case with torch.compile takes ~1 min.
        stage bench/layer "$t" env TRITON_PRINT_AUTOTUNING=1 "$PY" "$REPO/bench/layer_bench.py" --device "$DEVICE" \
            --out "$RES" --time-budget $(( t * 3 / 4 )) "${LAYER_ARGS[@]}"
    fi
    stage bench/vs-model 30 --min 5 "$PY" "$WORK/vs_model.py" "$RES/layer.json" "$REPO/bench" "$GPU_NAME"
    # A layer run killed at its cap leaves layer.json (written after every case) but no plot: draw it.
    if [ -f "$RES/layer.json" ] && [ ! -f "$RES/layer.png" ]; then
        stage bench/plot 30 --min 5 "$PY" "$REPO/bench/report.py" "$RES/layer.json"
    fi
    # Several adapters on one base (bench/multi_bench.py): n = 1, 2, 4, 8 adapters × 512 tokens, one training step
    # concurrent (one segmented call per layer) vs n sequential single-adapter runs, OPT-350m's then Llama-7B's MLP
    # block, bf16; each case checks both ways agree before it is timed. One config per kernel (no autotuning: the cap).
    # Its table (and its JSON, one line) go to run.log and the summary, its files to scratch: 8 files come back.
    stage bench/multi 60 --min 20 env FUSED_LORA_AUTOTUNE=0 "$PY" "$REPO/bench/multi_bench.py" --device "$DEVICE" \
        --out "$WORK/multi" --print-json "${MULTI_ARGS[@]}"
}

# model CAP [ARGS...]: bench/model_bench.py (p = 0.1 for both models first, then p = 0).
model_stage() {
    local cap="$1"
    shift
    stage model "$cap" env TRITON_PRINT_AUTOTUNING=1 "$PY" "$REPO/bench/model_bench.py" --device "$DEVICE" \
        --out "$RES" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} "$@"
    if [ -f "$RES/model.json" ] && [ ! -f "$RES/model.png" ]; then
        stage model/plot 30 --min 5 "$PY" "$REPO/bench/report.py" "$RES/model.json"
    fi
}

tests_stage() {
    if [ "$DRY" = 1 ]; then
        stage tests "$1" "${PYTEST[@]}" "$REPO/tests" "${CPU_ONLY_TESTS[@]}" --collect-only -q
    else  # one config per kernel: every new shape would otherwise benchmark all of them (hypothesis: many shapes)
        stage tests "$1" env FUSED_LORA_AUTOTUNE="${FUSED_LORA_AUTOTUNE:-0}" "${PYTEST[@]}" -v "$REPO/tests" \
            "${CPU_ONLY_TESTS[@]}"
    fi
    grep -hE '^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped|selected|collected).* =+$|tests? collected' \
        "$LOG" | tail -n 40
}

case "$MODE" in
    check) check_stage 230 ;;
    bench) bench_stage 440 ;;
    model) model_stage 500 ;;
    tests) tests_stage 540 ;;
    dora)  # the GPU case (bf16, M = 8192, K = N = 4096, r = 16); the dry run: one small shape
        DORA_ARGS=()
        [ "$DRY" = 1 ] && DORA_ARGS=(--quick)
        stage dora 540 env TRITON_PRINT_AUTOTUNING=1 "$PY" "$REPO/bench/dora_bench.py" --device "$DEVICE" \
            --out "$RES" "${DORA_ARGS[@]}"
        ;;
    full)
        LAYER_ARGS=(--plan full)
        [ "$DRY" = 1 ] && LAYER_ARGS=(--M 64 --shapes cpu_target --ranks 4 --ps 0.1 --providers base fused --rounds 1
                                      --min-time 0.05 --no-qkv)
        bench_stage 460
        ;;
    all)  # check ≤ 190 s, the layer table ≤ 170 s, the model step ≤ 130 s; each also bounded by what is left
        check_stage 190
        bench_stage 170
        if [ "$DRY" = 1 ]; then model_stage 130; else model_stage 130 --rounds 2; fi
        ;;
esac

# --- summary (the device tool shows the last 12,000 characters) ---------------------------------------------
echo
if [ "$(find "$RES" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then  # the device tool brings back 8 files at most
    echo "(more than 8 files: the plots are left out; redraw them from the JSON with bench/report.py)"
    rm -f "$RES"/*.png
fi
if [ -f "$RES/verify.md" ]; then
    echo "---- verify.md: the self-check over the case matrix"
    grep -vE '\| pass \|$' "$RES/verify.md" | grep -E '^\||^First-call|^Cut' | head -n 30
fi
if grep -q '^== \[bench/host-calibration\] start' "$LOG"; then
    echo "---- host cost per layer, ours vs PEFT (bench/host-calibration)"
    sed -n '/^== \[bench\/host-calibration\] start/,/^== \[bench\/host-calibration\] done/p' "$LOG" \
        | awk '/^One LoRA layer/ {buf = ""; keep = 1} keep {buf = buf $0 "\n"} END {printf "%s", buf}' \
        | grep -E '^\||^One LoRA|^Command' | head -n 24
fi
if [ -f "$RES/layer.md" ]; then
    echo "---- layer.md: targets"; sed -n '/^## Targets/,$p' "$RES/layer.md" | tail -n +3
fi
if [ -f "$RES/dora.md" ]; then
    echo "---- dora.md"; grep -E '^\|' "$RES/dora.md" | head -n 14
fi
if [ -f "$RES/model.md" ]; then
    echo "---- model.md"; grep -E '^\|' "$RES/model.md" | head -n 14
fi
if grep -q '^== \[bench/multi\] start' "$LOG"; then
    echo "---- several adapters on one base: concurrent vs sequential (bench/multi)"
    sed -n '/^== \[bench\/multi\] start/,/^== \[bench\/multi\] done/p' "$LOG" | grep -E '^\||ERROR' | head -n 14
fi
if grep -q '^== \[bench/vs-model\] start' "$LOG"; then
    echo "---- measured beside the traffic model (bench/vs-model)"
    sed -n '/^== \[bench\/vs-model\] start/,/^== \[bench\/vs-model\] done/p' "$LOG" | sed '1d;$d' | head -n 60
fi
echo
echo "== triton cache: $(cache_entries) entries (${CACHE_BEFORE} at start) in $TRITON_CACHE_DIR"
echo "== results in $RES ($(find "$RES" -maxdepth 1 -type f | wc -l) files):" \
     "$(find "$RES" -maxdepth 1 -type f -printf '%f\n' | sort | tr '\n' ' ')"
echo "== $MODE: $(( $(now) - START ))s of ${BUDGET}s; stages:"
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "   $line"; done
exit "$FAILED"
