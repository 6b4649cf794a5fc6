"""A correctness table per GPU: the first-call self-check (``FUSED_LORA_VERIFY``) run over a matrix of
dtype pairs × weight layouts × dropout × shapes (odd ones included) × paths, 4-bit bases when bitsandbytes is
installed, and DoRA; each case's verdict for y and every gradient, against fp64 by the tests' rule.

    python bench/verify_matrix.py --out DIR              # on the GPU (bench/run_gpu.sh check runs it): verify.md/json
    python bench/verify_matrix.py --quick --out DIR      # CPU dry run (Triton's interpreter), seconds

Writes ``verify.md`` (one row per case and direction: key, path, worst tensor, its error and bound, pass/FAIL; then
the first-call cost of the check), and with ``--json`` ``verify.json``. Cases run most telling first and stop at
``--time-budget`` (the cut ones are listed): a GPU's first compiles take most of the time. Exit status 0 when every
checked case passed, 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _setup(device: str) -> None:
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_lora (and triton.jit) is imported


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (base dtype, adapter dtype): PEFT's default on a half base is fp32 adapters; most telling first.
PAIRS = [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")]


def cases(quick: bool, device: torch.device) -> list[dict]:
    """Every case as a dict: variant, base, dtypes, layout, p, shape (M, K, N, r), path."""
    shapes = [(17, 33, 24, 3)] if quick else [(1000, 1024, 3072, 16), (257, 768, 2304, 8), (129, 1000, 999, 12)]
    pairs = PAIRS[:1] if quick else PAIRS
    ps = [0.0, 0.1]
    out = []
    for shape in shapes:
        for base_dt, ad_dt in pairs:
            for layout in ("linear", "conv1d"):
                for p in ps:
                    for path in ("fused", "composed"):
                        out.append(dict(variant="lora", base="dense", dtype=base_dt, adapter=ad_dt, layout=layout,
                                        p=p, shape=shape, path=path))
    for shape in shapes[:1]:  # DoRA: its fused kernels (its row has no composed path)
        for base_dt, ad_dt in pairs[:2]:
            for p in ps:
                out.append(dict(variant="dora", base="dense", dtype=base_dt, adapter=ad_dt, layout="linear", p=p,
                                shape=shape, path="fused"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return out
    for shape in shapes[:1]:  # QLoRA: 4-bit NF4 (fused and composed) and 8-bit (composed)
        for path in ("fused", "composed"):
            for p in ps:
                out.append(dict(variant="lora", base="bnb-4bit", dtype="bf16" if device.type == "cuda" else "fp32",
                                adapter="fp32", layout="linear", p=p, shape=shape, path=path))
        if device.type == "cuda":  # Linear8bitLt's int8 matmul needs a GPU
            out.append(dict(variant="lora", base="bnb-8bit", dtype="fp16", adapter="fp32", layout="linear", p=0.1,
                            shape=shape, path="composed"))
    return out


def run_case(case: dict, device: torch.device) -> None:
    """One forward + backward of the case through the public entry points (the self-check runs inside)."""
    import fused_lora

    M, K, N, r = case["shape"]
    dtype, adapter = DTYPES[case["dtype"]], DTYPES[case["adapter"]]
    gen = torch.Generator().manual_seed(hash((M, K, N, r)) % 2**31)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    x = rnd(M, K).to(device, dtype).requires_grad_()
    os.environ["FUSED_LORA_GEMM"] = case["path"]
    if case["base"] == "dense":
        w = rnd(N, K, scale=K**-0.5) if case["layout"] == "linear" else rnd(K, N, scale=K**-0.5)
        w = w.to(device, dtype)
        b = rnd(N).to(device, dtype).requires_grad_()
        A = rnd(r, K, scale=K**-0.5).to(device, adapter).requires_grad_()
        B = rnd(N, r, scale=r**-0.5).to(device, adapter).requires_grad_()
        mag = None
        if case["variant"] == "dora":
            mag = (torch.linalg.norm(w.float() if case["layout"] == "linear" else w.float().t(), dim=1) *
                   (1 + 0.1 * rnd(N).to(device))).to(adapter).requires_grad_()
        y = fused_lora.fused_lora_linear(x, w, b, A, B, 1.5, case["p"], weight_layout=case["layout"],
                                         dropout_seed=17, backend="triton", magnitude=mag)
    else:
        import bitsandbytes as bnb

        from fused_lora.quantized import quantized_lora

        dense = torch.nn.Linear(K, N, bias=True)
        if case["base"] == "bnb-4bit":
            layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
        layer = layer.to(device)
        A = rnd(r, K, scale=K**-0.5).to(device, adapter).requires_grad_()
        B = rnd(N, r, scale=r**-0.5).to(device, adapter).requires_grad_()
        y = quantized_lora(x, layer, A, B, 1.5, case["p"], True, dropout_seed=17, backend="triton")
    y.backward(torch.randn(y.shape, generator=gen).to(device, y.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_cost(device: torch.device, quick: bool) -> dict:
    """The check's cost on a key's first forward + backward (kernels already compiled): the same call with the check
    off and on, fresh keys each time; and a steady-state call with the check on (a set lookup)."""
    from fused_lora import diagnostics

    case = dict(variant="lora", base="dense", dtype="bf16" if device.type == "cuda" else "fp32", adapter="fp32",
                layout="linear", p=0.1, shape=(24, 40, 28, 4) if quick else (4096, 4096, 4096, 16), path="fused")
    run_case(case, device)  # compile and tune

    def timed(mode: str) -> float:
        diagnostics.clear()
        diagnostics.set_verify(mode)
        start = time.perf_counter()
        run_case(case, device)
        return time.perf_counter() - start

    off, first = timed("off"), timed("first")
    start = time.perf_counter()
    run_case(case, device)  # the key is checked: a lookup
    steady = time.perf_counter() - start
    diagnostics.set_verify("always")
    return {"case": case, "first_call_off_ms": 1e3 * off, "first_call_checked_ms": 1e3 * first,
            "steady_checked_ms": 1e3 * steady, "extra_ms": 1e3 * (first - off)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="one tiny shape, one dtype pair (the CPU dry run)")
    ap.add_argument("--time-budget", type=float, default=200.0, help="no new case after this many seconds")
    ap.add_argument("--json", action="store_true",
                    help="also verify.json (run_gpu.sh leaves it out: 8 files come back)")
    args = ap.parse_args(argv)
    _setup(args.device)
    import triton

    import fused_lora
    from fused_lora import diagnostics

    device = torch.device(args.device)
    os.environ["FUSED_LORA_BACKEND"] = "triton"
    fused_lora.set_verify("always")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows, cut = [], []
    for case in cases(args.quick, device):
        if time.monotonic() - start > args.time_budget:
            cut.append(case)
            continue
        diagnostics.clear()
        error = None
        try:
            run_case(case, device)
        except Exception as err:  # a crash is a result too: recorded, the next case runs
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        report = diagnostics.path_report()
        checked = {(path, d.split(":")[0]): v for entry in report.values() for path, ds in entry["verified"].items()
                   for d, v in ds.items()}
        for direction in ("forward", "backward"):
            v = checked.get((case["path"], direction))
            rows.append({**case, "key": next(iter(report), ""), "direction": direction, "error_msg": error,
                         "verdict": v})
        print(f"{case['variant']} {case['base']} {case['dtype']}/{case['adapter']} {case['layout']} p={case['p']} "
              f"{case['shape']} {case['path']}: " + ", ".join(
                  f"{r['direction']} {'pass' if r['verdict'] and r['verdict']['ok'] else 'FAIL'}" for r in rows[-2:])
              + (f" ({error})" if error else ""), flush=True)
    cost = None
    if time.monotonic() - start < args.time_budget:
        try:
            cost = first_call_cost(device, args.quick)
        except Exception as err:
            cost = {"error": f"{type(err).__name__}: {err}"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    env = {"device": name, "capability": capability, "torch": torch.__version__, "triton": triton.__version__,
           "seconds": round(time.monotonic() - start, 1)}
    if args.json:
        (args.out / "verify.json").write_text(json.dumps({"environment": env, "rows": rows, "cut": cut,
                                                          "first_call_cost": cost}, indent=1, default=str))
    lines = [f"# Self-check over the case matrix on {name}", "",
             f"torch {env['torch']}, triton {env['triton']}, compute capability {capability}; "
             f"{len(rows) // 2} cases in {env['seconds']} s ({len(cut)} cut by the time budget). Rule: error against "
             "fp64 ≤ 2 × PyTorch's same-dtype error + eps(dtype)·max|fp64| (bench/verify_matrix.py).", "",
             "| case | path | direction | worst | error | bound | result |", "|---|---|---|---|---:|---:|---|"]
    failed = False
    for r in rows:
        v = r["verdict"]
        label = (f"{r['variant']} {r['base']} {r['dtype']}/{r['adapter']} {r['layout']} p={r['p']} "
                 f"M×K×N r={'×'.join(map(str, r['shape'][:3]))} {r['shape'][3]}")
        if v is None:
            failed = failed or r["error_msg"] is not None
            lines.append(f"| {label} | {r['path']} | {r['direction']} | – | – | – | "
                         f"{'ERROR ' + r['error_msg'] if r['error_msg'] else 'not checked'} |")
            continue
        failed = failed or not v["ok"]
        lines.append(f"| {label} | {r['path']} | {r['direction']} | {v['worst']} | {v['error']:.3g} | "
                     f"{v['bound']:.3g} | {'pass' if v['ok'] else '**FAIL**'} |")
    if cut:
        lines += ["", f"Cut by the time budget ({args.time_budget:g} s): " + "; ".join(
            f"{c['variant']} {c['base']} {c['dtype']}/{c['adapter']} {c['layout']} p={c['p']} {c['shape']} "
            f"{c['path']}" for c in cut)]
    if cost and "extra_ms" in cost:
        lines += ["", f"First-call cost of the check ({cost['case']['dtype']}, M×K×N = "
                      f"{'×'.join(map(str, cost['case']['shape'][:3]))}, r = {cost['case']['shape'][3]}, p = 0.1, "
                      f"fused, kernels compiled): first forward+backward {cost['first_call_off_ms']:.2f} ms unchecked, "
                      f"{cost['first_call_checked_ms']:.2f} ms checked (+{cost['extra_ms']:.2f} ms, once per key); "
                      f"later calls {cost['steady_checked_ms']:.2f} ms (a lookup)."]
    (args.out / "verify.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-3:] if cost else lines[-1:]))
    print(f"wrote {args.out / 'verify.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
