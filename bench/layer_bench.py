"""Layer benchmark: one LoRA linear layer, five providers side by side, speed and memory.

    python bench/layer_bench.py                      # CPU default (fp32, ~4 min on 2 cores)
    python bench/layer_bench.py --quick              # the target case only
    python bench/layer_bench.py --device cuda        # GPU default plan (bf16 + the fp16 target case)
    python bench/layer_bench.py --device cuda --plan full --time-budget 540
    python bench/layer_bench.py --device cuda --plan lorafusion   # LoRAFusion's 9 kernel shapes, bf16 (run_gpu.sh)
    python bench/layer_bench.py --M 4096 --shapes 7b_qo --ranks 16 64 --ps 0.1 --dtypes bfloat16

Prints a table, and writes layer.json (rewritten after every case, so a run cut off by a time limit keeps
what it measured), layer.md (the table and the targets) and layer.png into --out (default
bench/results/<device>-<date>/). Providers and columns: see providers.py, measure.py and bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however this file is started

import measure  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402
from providers import PROVIDERS, LayerShape, build, make_case  # noqa: E402

# (in, out, bias) of the projections of the model families the project targets (GPT-2, Gemma, 7B-70B Llama-class
# models, LoRAFusion's kernel shapes). GPT-2's projections carry a bias, Gemma's and Llama-class ones do not.
SHAPES = {
    "gpt2_attn": (768, 2304, True),  # c_attn (q, k, v in one projection)
    "gpt2_fc": (768, 3072, True),  # mlp.c_fc
    "gpt2_proj": (3072, 768, True),  # mlp.c_proj
    "gemma_qo": (2048, 2048, False),  # q_proj / o_proj
    "gemma_up": (2048, 16384, False),  # gate_proj / up_proj
    "gemma_down": (16384, 2048, False),  # down_proj
    "7b_qo": (4096, 4096, False),  # q/k/v/o of 7B-class models (the GPU target case)
    "7b_up": (4096, 14336, False),  # gate/up of Mistral-7B / Llama-3-8B
    "13b_qo": (5120, 5120, False),  # q/k/v/o of 13B-class models (LoRAFusion's in = out = 5120)
    "70b_qo": (8192, 8192, False),  # q/k/v/o of 70B-class models (LoRAFusion's in = out = 8192)
    "cpu_target": (1024, 1024, True),  # the CPU target case (bench/targets.py; README's CPU layer table)
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def case(M: int, shape: str, r: int, p: float) -> LayerShape:
    K, N, bias = SHAPES[shape]
    return LayerShape(M, K, N, r, p, bias, shape)


# LoRAFusion's kernel benchmark (arXiv 2510.00206; bench/traffic_model.py's "LoRAFusion" rows): bf16, r = 16, p = 0.1,
# in = out ∈ {4096, 5120, 8192}, M ∈ {2048, 4096, 8192} tokens. Most important first: the GPU target case
# (M = 8192, 4096; bench/targets.py), M = 8192 at the other widths, then the smaller M.
LORAFUSION_PLAN = [(8192, "7b_qo"), (8192, "13b_qo"), (8192, "70b_qo"), (4096, "7b_qo"), (4096, "13b_qo"),
                   (4096, "70b_qo"), (2048, "7b_qo"), (2048, "13b_qo"), (2048, "70b_qo")]
PLANS = ["quick", "default", "full", "lorafusion"]
SWEEP_SHAPES = [k for k in SHAPES if k not in ("cpu_target", "13b_qo", "70b_qo")]  # default/full plans' projections


def plan_cases(plan: str, device: str) -> list[tuple[str, LayerShape]]:
    """(dtype, shape) pairs, most important first: a time budget cuts the tail."""
    if plan == "lorafusion":  # the same on any device (a GPU plan: on CPU, bf16 at these sizes takes minutes a case)
        return [("bfloat16", case(M, s, 16, 0.1)) for M, s in LORAFUSION_PLAN]
    if device == "cpu":
        target = [("float32", case(2048, "cpu_target", 16, p)) for p in (0.1, 0.0)]
        if plan == "quick":
            return target[:1]
        ranks = [("float32", case(2048, "cpu_target", r, 0.1)) for r in (8, 64)]
        # Smaller M than on GPU: one fwd+bwd of a 768→3072 layer at M=512 is ~60 ms on 2 cores.
        shapes = [("float32", case(512, s, 16, 0.1)) for s in ("gpt2_attn", "gpt2_fc", "gpt2_proj", "gemma_qo")]
        if plan == "full":
            shapes = [("float32", case(M, s, r, p)) for M, s, r, p in itertools.product(
                (512, 2048), SWEEP_SHAPES, (8, 16, 64), (0.0, 0.1))]
        return target + ranks + shapes
    target = [("bfloat16", case(8192, "7b_qo", 16, p)) for p in (0.1, 0.0)]
    if plan == "quick":
        return target[:1]
    gpu_shapes = SWEEP_SHAPES
    if plan == "full":
        full = [(dt, case(M, s, r, p)) for dt, M, s, r, p in itertools.product(
            ("bfloat16", "float16"), (2048, 8192), gpu_shapes, (8, 16, 64), (0.0, 0.1))]
        return target + [c for c in full if c not in target]
    ranks = [("bfloat16", case(8192, "7b_qo", r, 0.1)) for r in (8, 64)]
    fp16 = [("float16", case(8192, "7b_qo", 16, 0.1))]
    shapes = [("bfloat16", case(M, s, 16, 0.1)) for M in (8192, 2048) for s in gpu_shapes]
    return target + ranks + fp16 + [c for c in shapes if c not in target]


def custom_cases(args, device: str) -> list[tuple[str, LayerShape]]:
    dtypes = args.dtypes or (["float32"] if device == "cpu" else ["bfloat16"])
    Ms = args.M or ([2048] if device == "cpu" else [8192])
    shapes = args.shapes or (["cpu_target"] if device == "cpu" else ["7b_qo"])
    ranks = args.ranks or [16]
    ps = args.ps if args.ps is not None else [0.1]
    return [(dt, case(M, s, r, p)) for dt, M, s, r, p in itertools.product(dtypes, Ms, shapes, ranks, ps)]


# ----------------------------------------------------------------------------------------- one case


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _timing_fns(prov, case_, mode: str):
    """A zero-argument callable doing one ``mode`` ('fwd', 'bwd', 'fwdbwd') step on rotated inputs."""
    xs, dy = case_.xs, case_.dy
    if mode == "fwd":
        nxt = measure.rotating(xs)
        return lambda: prov.forward(nxt())
    if mode == "fwdbwd":
        nxt = measure.rotating(xs)

        def step():
            x = nxt()
            return torch.autograd.grad(prov.forward(x), prov.grad_inputs(x), dy)

        return step
    # bwd: one forward graph per input set, kept alive, each backward retains it for the next call.
    graphs = [(prov.forward(x), x) for x in xs]
    nxt = measure.rotating(graphs)

    def backward():
        y, x = nxt()
        return torch.autograd.grad(y, prov.grad_inputs(x), dy, retain_graph=True)

    return backward


def _time_mode(provs: dict, case_, mode: str, device: torch.device, opts) -> dict[str, dict]:
    out: dict[str, dict] = {}
    fns = {}
    for name, prov in provs.items():
        try:
            fns[name] = _timing_fns(prov, case_, mode)
            for _ in range(2):  # warm-up: compile, autotune, allocator
                fns[name]()
            measure.sync(device)
        except Exception as exc:  # one provider failing (e.g. torch.compile) must not stop the others
            out[name] = {"error": f"{mode}: {type(exc).__name__}: {exc}"}
    fns = {n: f for n, f in fns.items() if n not in out}
    if device.type == "cuda":
        for name, fn in fns.items():
            out[name] = measure.time_gpu(fn, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
    else:
        out.update(measure.time_cpu_interleaved(fns, rounds=opts.rounds, min_run_time=opts.min_time))
    return out


def run_case(dtype_name: str, shape: LayerShape, device: torch.device, opts) -> dict:
    dtype = DTYPES[dtype_name]
    adapter_dtype = torch.float32 if opts.adapter_dtype == "float32" else dtype
    elem = torch.empty((), dtype=dtype).element_size()
    set_bytes = (shape.M * shape.K + 2 * shape.M * shape.N) * elem  # x, y, dY of one call
    n_inputs = measure.inputs_to_rotate(set_bytes, measure.cache_bytes(device)) if opts.rotate else 1
    case_ = make_case(shape, device, dtype, adapter_dtype, n_inputs=n_inputs)
    rec = {"device_type": device.type, "device": report.device_name(device), "dtype": dtype_name,
           "adapter_dtype": str(adapter_dtype).replace("torch.", ""), "shape": shape.as_dict(),
           "input_sets": n_inputs, "providers": {}}
    provs = {}
    for name in opts.providers:
        try:
            provs[name] = build(name, case_, backend=opts.fused_backend)
        except Exception as exc:
            rec["providers"][name] = {"error": f"build: {type(exc).__name__}: {exc}"}

    rec["providers"] = {n: rec["providers"].get(n, {}) for n in opts.providers}  # table order = --providers
    x0 = case_.xs[0]
    # Cross-check (p = 0 only: with dropout each provider draws its own mask): every LoRA provider
    # must agree with the naive one, so a mis-built provider cannot produce a fast, wrong number.
    if shape.p == 0 and "naive" in provs:
        with torch.no_grad():
            ref = provs["naive"].forward(x0)
            for name, prov in provs.items():
                if name != "base":
                    rec["providers"].setdefault(name, {})["rel_err_vs_naive"] = _rel_err(prov.forward(x0), ref)

    times = {mode: _time_mode(provs, case_, mode, device, opts) for mode in ("fwd", "bwd", "fwdbwd")}
    gc.collect()

    flops_lora = measure.lora_flops(shape.M, shape.K, shape.N, shape.r)
    flops_base = measure.lora_flops(shape.M, shape.K, shape.N, shape.r, lora=False)
    a_elem = torch.empty((), dtype=adapter_dtype).element_size()
    bytes_lora = measure.lora_min_bytes(shape.M, shape.K, shape.N, shape.r, elem, a_elem)
    bytes_base = measure.lora_min_bytes(shape.M, shape.K, shape.N, shape.r, elem, a_elem, lora=False)

    for name, prov in provs.items():
        r = rec["providers"].setdefault(name, {})
        errors = [t[name]["error"] for t in times.values() if "error" in t.get(name, {})]
        if errors:
            r["error"] = "; ".join(errors)
            continue
        r["time"] = {mode: times[mode][name] for mode in times}
        r["note"] = prov.note
        ms = r["time"]["fwdbwd"]["ms"]
        flops, nbytes = (flops_base, bytes_base) if name == "base" else (flops_lora, bytes_lora)
        r["tflops"] = flops["fwdbwd"] / (ms * 1e-3) / 1e12
        r["gbps"] = nbytes["fwdbwd"] / (ms * 1e-3) / 1e9
        r["tflops_by_mode"] = {m: flops[m] / (r["time"][m]["ms"] * 1e-3) / 1e12 for m in r["time"]}
        try:
            r.update(_memory_and_launches(prov, case_, device))
        except Exception as exc:
            r["memory_error"] = f"{type(exc).__name__}: {exc}"

    base_ms = _fwdbwd_ms(rec, "base")
    peft_ms = _fwdbwd_ms(rec, "peft")
    for r in rec["providers"].values():
        ms = r.get("time", {}).get("fwdbwd", {}).get("ms")
        r["x_base"] = ms / base_ms if ms and base_ms else None
        r["x_peft"] = ms / peft_ms if ms and peft_ms else None
    if opts.qkv:
        rec["qkv_saved_bytes"] = _qkv_saved(shape, device, dtype, adapter_dtype, opts)
    return rec


def _fwdbwd_ms(rec: dict, name: str) -> float | None:
    return rec["providers"].get(name, {}).get("time", {}).get("fwdbwd", {}).get("ms")


def _memory_and_launches(prov, case_, device: torch.device) -> dict:
    x0, dy = case_.xs[0], case_.dy
    saved, y = measure.saved_activation_bytes(lambda: prov.forward(x0), exclude=prov.frozen + prov.params)
    out = {"saved_bytes": saved, "x_bytes": x0.untyped_storage().nbytes()}
    del y
    out["peak_bytes"] = measure.peak_extra_bytes(
        lambda: torch.autograd.grad(prov.forward(x0), prov.grad_inputs(x0), dy), device)
    if prov.name == "compile" and device.type != "cuda":
        out["launches_fwd"] = out["launches_bwd"] = None  # inductor's C++ kernels are not aten ops
        return out
    fwd_ops, y = measure.count_launches(lambda: prov.forward(x0), device)
    bwd_ops, _ = measure.count_launches(lambda: torch.autograd.grad(y, prov.grad_inputs(x0), dy), device)
    out.update(launches_fwd=len(fwd_ops), launches_bwd=len(bwd_ops),
               launch_names_fwd=[n[:90] for n in fwd_ops], launch_names_bwd=[n[:90] for n in bwd_ops])
    return out


def _qkv_saved(shape: LayerShape, device, dtype, adapter_dtype, opts) -> dict[str, int]:
    """Saved bytes of three adapted projections (q, k, v) that read the same x, per provider."""
    cases = [make_case(shape, device, dtype, adapter_dtype, seed=s) for s in range(3)]
    for c in cases[1:]:
        c.xs = cases[0].xs
    x0 = cases[0].xs[0]
    out = {}
    for name in opts.providers:
        if name == "base":
            continue
        try:
            # fresh_compile=False: the timed case just compiled this shape; three more compiles would cost
            # more than the whole case on GPU.
            provs = [build(name, c, backend=opts.fused_backend, fresh_compile=False) for c in cases]
            exclude = [t for p in provs for t in p.frozen + p.params]
            out[name], _ = measure.saved_activation_bytes(lambda provs=provs: [p.forward(x0) for p in provs], exclude)
        except Exception as exc:
            out[name + "_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------------------------------- driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--plan", default="default", choices=PLANS,
                    help="lorafusion: LoRAFusion's 9 kernel shapes, bf16, r=16, p=0.1 (bench/run_gpu.sh bench)")
    ap.add_argument("--quick", action="store_true", help="same as --plan quick")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    ap.add_argument("--M", nargs="+", type=int, help="token counts")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--ranks", nargs="+", type=int)
    ap.add_argument("--ps", nargs="+", type=float, help="dropout probabilities")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--fused-backend", choices=["torch", "triton"],
                    help="fused-lora backend (default: triton on CUDA, torch on CPU)")
    ap.add_argument("--adapter-dtype", default="same", choices=["same", "float32"],
                    help="adapters in the base dtype (default; every provider alike) or float32 (PEFT's default "
                         "on half-precision bases)")
    ap.add_argument("--no-rotate", dest="rotate", action="store_false", help="reuse one input set")
    ap.add_argument("--no-qkv", dest="qkv", action="store_false", help="skip the shared-input q/k/v saved bytes")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=0.9, help="CPU: seconds per provider and mode")
    ap.add_argument("--warmup-ms", type=float, default=25, help="GPU: do_bench warm-up")
    ap.add_argument("--rep-ms", type=float, default=100, help="GPU: do_bench repetition time")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; start no new case after this (0: none)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's, one per core)")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="CPU: before each case, wait for the load average to drop under cores/2 (at most this "
                         "many seconds over the whole run)")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/<device>-<date>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.plan = "quick"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    if device.type == "cpu" and args.fused_backend is None:
        args.fused_backend = "torch"  # even under TRITON_INTERPRET=1: interpreted kernels are not a benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    wait_until = time.time() + args.wait_quiet  # one waiting allowance for the whole run
    custom = any(v is not None for v in (args.dtypes, args.M, args.shapes, args.ranks, args.ps))
    cases = custom_cases(args, device.type) if custom else plan_cases(args.plan, device.type)
    out_dir = args.out or report.default_out_dir(device)
    payload = {"kind": "layer", "environment": report.environment(device), "argv": sys.argv[1:],
               "load_before": report.load_average(), "ceilings": {}, "cases": []}
    print(f"# layer benchmark on {payload['environment']['device']}: {len(cases)} cases → {out_dir}", flush=True)
    if device.type == "cuda":
        payload["ceilings"] = measure.measure_ceilings(device)
        print(f"# ceilings: {payload['ceilings']}", flush=True)
    start = time.time()
    for i, (dtype_name, shape) in enumerate(cases):
        if args.time_budget and time.time() - start > args.time_budget:
            payload["skipped_for_budget"] = [f"{dt} {s}" for dt, s in cases[i:]]
            print(f"# time budget {args.time_budget:.0f}s reached: {len(cases) - i} cases skipped", flush=True)
            break
        if device.type == "cpu" and wait_until > time.time():  # before every case: load comes and goes
            report.wait_for_quiet(wait_until - time.time())
        t0 = time.time()
        try:
            rec = run_case(dtype_name, shape, device, args)
        except Exception as exc:  # e.g. out of memory: record and go on
            rec = {"device_type": device.type, "dtype": dtype_name, "shape": shape.as_dict(), "providers": {},
                   "error": f"{type(exc).__name__}: {exc}"}
        rec["seconds"] = round(time.time() - t0, 1)
        rec["load_after"] = report.load_average()
        payload["cases"].append(rec)
        _print_case(rec)
        payload["load_after"] = report.load_average()
        write_outputs(payload, out_dir)  # after every case: a run cut off keeps what it measured
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = write_outputs(payload, out_dir)
    print("\n" + table, flush=True)
    print(report.plot_layer(payload["cases"], out_dir / "layer.png"), flush=True)
    return 0


def write_outputs(payload: dict, out_dir: Path) -> str:
    """layer.json and layer.md (table and targets); returns the markdown body."""
    payload["targets"] = targets.evaluate(payload["cases"], payload["environment"]["device_type"])
    report.write_json(out_dir / "layer.json", payload)
    env = payload["environment"]
    head = (f"# Layer benchmark: {env['device']}\n\n{env['date']}; torch {env['torch']}, triton {env['triton']}, "
            f"peft {env['peft']}, transformers {env['transformers']}, {env['torch_threads']} threads; "
            f"load average before/after {payload['load_before']} / {payload.get('load_after')}; "
            f"commit {env['git_commit']}.\n")
    body = f"{report.layer_table(payload['cases'])}\n\n## Targets\n\n{targets.targets_table(payload['targets'])}\n"
    skipped = payload.get("skipped_for_budget")
    if skipped:
        body += f"\nSkipped for the time budget: {len(skipped)} cases ({', '.join(skipped[:5])}, ...)\n"
    (out_dir / "layer.md").write_text(f"{head}\n{body}")
    return body


def _print_case(rec: dict) -> None:
    parts = []
    for name, r in rec["providers"].items():
        ms = r.get("time", {}).get("fwdbwd", {}).get("ms")
        parts.append(f"{name} {ms:.2f}ms" if ms else f"{name} ERR")
    err = f"  ERROR {rec['error']}" if "error" in rec else ""
    print(f"{report.case_label(rec)} [{rec['seconds']}s]: " + ", ".join(parts) + err, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
