"""Compile every kernel for real GPUs without one; report and check registers, spills, shared memory and
tensor-core instructions per kernel, autotune config and launch variant.

    python bench/compile_report.py                        # sm_80 + sm_90, the CI matrix, table on stdout
    python bench/compile_report.py --arch all             # every arch: 75 80 86 89 90 100 120
    python bench/compile_report.py --check                # exit 1 when a variant breaks a check (CI)
    python bench/compile_report.py --out bench/results/compile    # refresh the committed reports
    python bench/compile_report.py --matrix full --arch 90        # every axis value (slow; for tuning)
    python bench/compile_report.py --kernel lora_fwd_kernel --dtype bf16/fp32 --arch 90

Triton compiles to a cubin for any target on a CPU-only machine (``triton.compile`` with a ``GPUTarget``); cuobjdump
from Triton's bundled CUDA tools reads it. The launch arguments are specialized the way Triton's JIT specializes
real launches (``compile_matrix.py``), so both weight layouts and the rank's alignment compile the variants a GPU
runs. Needs no torch: the kernels are loaded from ``kernels/`` by path, so a bare ``pip install triton`` venv runs
it (CI checks triton 3.6.0, the GPU image's, that way). Must run WITHOUT TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py: unset TRITON_INTERPRET (the interpreter replaces the jit functions)")
# Triton 3.9 warns that its FP-fusion default will change; 1 is the default of both 3.6 and 3.9.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_matrix as cm  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, which Triton's
# launcher checks): kernels/configs.py's table (227 KiB on H100/H200/B200, 163 KiB on A100, 99 KiB on A10/L4/RTX
# 30-50, 64 KiB on T4).
SHARED_LIMIT = cm.SHARED_PER_BLOCK
# Bumped when cubin_stats reads more from a cubin (the cache holds one record per cubin hash).
STATS_VERSION = "2"
# WIDE variants (int64 offsets) serve launches over tensors of >= 2³¹ elements (>= 4 GiB in 16 bits): a few bytes of
# spill per thread there are noise beside the traffic, so they may spill this much and still pass.
WIDE_SPILL_ALLOWANCE = 32
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90): one block of the launch must fit


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def cubin_stats(cubin: bytes) -> dict[str, int]:
    """Registers, spills, static shared memory and tensor-core instruction counts read from the cubin.

    cuobjdump costs ~0.5 s a kernel; results are cached by the cubin's hash (Triton's own cache already
    skips the compile of unchanged kernels), so a re-run with unchanged kernels takes seconds."""
    cache = Path(os.environ.get("FUSED_LORA_COMPILE_CACHE", Path.home() / ".cache" / "fused-lora" / "cubin-stats"))
    entry = cache / f"{hashlib.sha256(cubin).hexdigest()}-v{STATS_VERSION}.json"
    if entry.exists():
        return json.loads(entry.read_text())
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    sass = _cuobjdump(cubin, "--dump-sass")
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    stats = {"registers": field("REG"), "stack": field("STACK"), "local": field("LOCAL"),
             "static_shared": field("SHARED"),
             "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.", sass)),
             "utcmma": len(re.findall(r"\bUTC\w*MMA\b", sass))}  # Blackwell's tcgen05.mma (UTCHMMA, ...)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(entry)
    return stats


def compile_one(job: tuple[cm.Variant, int, int]) -> dict[str, object]:
    """Compile one (variant, arch, config index); the record carries the measurements and broken checks."""
    variant, arch, config_index = job
    kernel = cm.KERNELS[variant.kernel]
    configs = cm.configs_for(kernel, variant, arch)
    config = configs[config_index]
    signature, constexprs, attrs = cm.specialize(kernel.fn, variant, config, arch=arch)
    record: dict[str, object] = {
        "kernel": variant.kernel, "variant": variant.label(), "arch": arch, "triton": triton.__version__,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "configs_of_variant": len(configs),
    }
    src = ASTSource(kernel.fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a config that does not compile is a failed check, not a crashed report
        record.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", problems=["compile error"])
        return record
    stats = cubin_stats(compiled.asm["cubin"])
    # Triton allocates shared memory dynamically: the cubin's SHARED is only the static part.
    record.update(stats, shared=compiled.metadata.shared + stats.pop("static_shared"))
    record["problems"] = problems(record, variant, config.num_warps)
    return record


def problems(r: dict, variant: cm.Variant, num_warps: int) -> list[str]:
    """What a record breaks (spills, registers over the launch's budget, shared memory over the arch's block limit, no
    tensor-core instruction where the arch has them); empty when all pass."""
    out = []
    allowance = WIDE_SPILL_ALLOWANCE if variant.wide else 0
    if r["stack"] + r["local"] > allowance:
        out.append(f"spills: STACK {r['stack']} B, LOCAL {r['local']} B per thread")
    reg_budget = min(255, REGISTER_FILE // (32 * num_warps))
    if r["registers"] > reg_budget:
        out.append(f"{r['registers']} registers > {reg_budget} for {num_warps} warps")
    if r["shared"] > SHARED_LIMIT[r["arch"]]:
        out.append(f"shared {r['shared']} B > {SHARED_LIMIT[r['arch']]} B on sm_{r['arch']}")
    want = cm.expected_tensor_ops(variant, r["arch"])
    if want and sum(r[op] for op in want.split("+")) == 0:
        out.append(f"no {want.upper().replace('+', '/')} (tensor-core) instruction")
    return out


def run(variants: dict[int, list[cm.Variant]], jobs: int, first_config_only: bool = False) -> list[dict]:
    """Compile every (arch, variant, config the autotuner may pick there); with ``first_config_only``, the config a
    launch takes with FUSED_LORA_AUTOTUNE=0 (CI samples that way on most archs: bench/README.md)."""
    work = [(v, arch, i) for arch, vs in variants.items() for v in vs
            for i in range(1 if first_config_only else len(cm.configs_for(cm.KERNELS[v.kernel], v, arch)))]
    if jobs <= 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, work, chunksize=4))


def _config_str(c: dict) -> str:
    tiles = "×".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
    return f"{tiles} w{c['num_warps']} s{c['num_stages']}"


def table(records: list[dict]) -> str:
    head = ("| target | kernel | variant | config | regs | shared KiB | stack/local B | HGMMA | HMMA | UTCMMA "
            "| check |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for r in records:
        if "error" in r:
            rows.append(f"| sm_{r['arch']} | {r['kernel']} | {r['variant']} | {_config_str(r['config'])} "
                        f"| | | | | | | {r['error']} |")
            continue
        check = "; ".join(r["problems"]) or "ok"
        rows.append(f"| sm_{r['arch']} | {r['kernel']} | {r['variant']} | {_config_str(r['config'])} "
                    f"| {r['registers']} | {r['shared'] / 1024:.1f} | {r['stack']}/{r['local']} | {r['hgmma']} "
                    f"| {r['hmma']} | {r.get('utcmma', 0)} | {check} |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["80", "90"], choices=[*map(str, cm.ARCHS), "all"],
                        help="compute capabilities to compile for (default 80 90); 'all' for every one")
    parser.add_argument("--matrix", choices=sorted(cm.MATRICES), default="ci",
                        help="variants (compile_matrix.py): ci, sample (CI's for every arch) or full")
    parser.add_argument("--kernel", nargs="+", help="only these kernels")
    parser.add_argument("--dtype", nargs="+", help="only these base/adapter dtypes, e.g. bf16/fp32")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--out", type=Path, help="write sm_<arch>-triton-<version>.{md,json} into this folder")
    parser.add_argument("--json", type=Path, help="write all records here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--first-config", action="store_true",
                        help="only each variant's first config (the one autotuning off takes): CI's sample")
    parser.add_argument("--quiet", action="store_true", help="print only the failed rows and the summary")
    args = parser.parse_args(argv)
    args.arch = list(cm.ARCHS) if "all" in args.arch else sorted({int(a) for a in args.arch})

    variants = {arch: [v for v in cm.variants_for(args.matrix, arch)
                       if (not args.kernel or v.kernel in args.kernel) and (not args.dtype or v.dtypes in args.dtype)]
                for arch in args.arch}
    start = time.perf_counter()
    records = run(variants, args.jobs, args.first_config)
    wall = time.perf_counter() - start
    failed = [r for r in records if r["problems"]]
    print(table(failed if args.quiet else records), end="")
    n_variants = sum(len(v) for v in variants.values())
    archs = "sm_" + "/sm_".join(map(str, args.arch))
    print(f"\n{len(records)} compiles ({n_variants} arch × variant pairs × configs, {archs}) with triton "
          f"{triton.__version__} in {wall:.0f} s on {args.jobs} processes; {len(failed)} failed checks")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for arch in args.arch:
            mine = [r for r in records if r["arch"] == arch]
            stem = f"sm_{arch}-triton-{triton.__version__}"
            (args.out / f"{stem}.json").write_text(json.dumps(mine, indent=1) + "\n")
            title = f"# Compile report: sm_{arch}, triton {triton.__version__}, matrix `{args.matrix}`\n\n"
            (args.out / f"{stem}.md").write_text(title + cm.LEGEND + "\n" + table(mine))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
