"""Compile every kernel for a GPU target without a GPU and report registers, spills and tensor-core use.

    python bench/compile_report.py --arch 90 --dtype bf16     # Hopper: expect HGMMA (wgmma)
    python bench/compile_report.py --arch 80 --dtype fp16     # Ampere: expect HMMA (mma.sync)

Triton compiles to PTX/cubin for any target on a CPU-only machine (NOTES §3); cuobjdump from Triton's
bundled CUDA tools reads the cubin. Must run WITHOUT TRITON_INTERPRET (the interpreter replaces jit
functions). Each kernel is compiled with the first GPU config of its autotune list (--all-configs: each).
Shared memory is not reported: Triton allocates it dynamically, cuobjdump shows only the static part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py: unset TRITON_INTERPRET (the interpreter replaces the jit functions)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_lora import kernels  # noqa: E402

DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def _signature(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            raise KeyError(f"{fn.__name__}: no pointer type for {name}")
        elif name in ("scaling", "p", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_specs(dtype: str, adapter_dtype: str | None = None) -> list[tuple[str, object, dict[str, str], dict]]:
    """(name, autotuned kernel, pointer types, constexprs) for each kernel at one realistic setting:
    adapters in ``adapter_dtype`` (default: the base dtype), dropout on, rank 16 (BLOCK_R=16), bias on."""
    adapter_dtype = adapter_dtype or dtype
    t, ta = f"*{dtype}", f"*{adapter_dtype}"
    f32 = "*fp32"
    prec = lambda d: "ieee" if d == "fp32" else "tf32"  # noqa: E731
    lora = {"LORA_DOT": DTYPES[adapter_dtype], "LORA_PREC": prec(adapter_dtype), "BLOCK_R": 16}
    base = {"BASE_DOT": DTYPES[dtype], "BASE_PREC": prec(dtype)}
    return [
        ("lora_down_kernel", kernels.lora_down_kernel, {"x_ptr": t, "a_ptr": ta, "s_ptr": f32},
         {"HAS_DROPOUT": True, **lora}),
        ("lora_fwd_kernel", kernels.lora_fwd_kernel,
         {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "s_ptr": f32, "b_ptr": ta, "y_ptr": t},
         {"HAS_BIAS": True, **base, **lora}),
        ("lora_dy_kernel", kernels.lora_dy_kernel,
         {"dy_ptr": t, "b_ptr": ta, "s_ptr": f32, "ds_ptr": f32, "db_ptr": f32, "dbias_ptr": f32},
         {"SPLIT_N": 2, "HAS_DBIAS": True, "NEED_DS": True, "NEED_DB": True, **lora}),
        ("lora_dx_kernel", kernels.lora_dx_kernel,
         {"dy_ptr": t, "w_ptr": t, "ds_ptr": f32, "a_ptr": ta, "dx_ptr": t},
         {"HAS_DROPOUT": True, **base, **lora}),
        ("lora_da_kernel", kernels.lora_da_kernel, {"ds_ptr": f32, "x_ptr": t, "da_ptr": f32},
         {"SPLIT_M": 2, "HAS_DROPOUT": True, **lora}),
    ]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def compile_kernel(kernel, types, constexprs, arch: int, config: triton.Config) -> dict[str, object]:
    consts = {**constexprs, **config.kwargs}
    fn = kernel.fn
    src = ASTSource(fn, _signature(fn, types, consts), constexprs=consts)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    sass = _cuobjdump(cubin, "--dump-sass")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill_st = int(re.search(r"STACK:(\d+)", usage).group(1))
    return {
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "registers": regs,
        "stack_bytes": spill_st,
        "spills": "spill" in compiled.asm["ptx"].lower() or spill_st > 0,
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version: 80 (A100) or 90 (H100/H200)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--adapter-dtype", choices=sorted(DTYPES), help="default: --dtype (PEFT's is fp32)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    args = parser.parse_args(argv)
    report = {}
    for name, kernel, types, constexprs in kernel_specs(args.dtype, args.adapter_dtype):
        configs = kernel.configs if args.all_configs else kernel.configs[:1]
        for i, config in enumerate(configs):
            r = compile_kernel(kernel, types, constexprs, args.arch, config)
            report[name if i == 0 else f"{name}#{i}"] = r
            dtypes = f"{args.dtype}/{args.adapter_dtype or args.dtype}"
            print(f"sm_{args.arch} {dtypes} {name:18s} regs={r['registers']:3d} stack={r['stack_bytes']:4d} "
                  f"HGMMA={r['hgmma']:3d} HMMA={r['hmma']:3d} {r['config']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
