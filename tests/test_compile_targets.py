"""The kernels compile for real GPUs (sm_75 … sm_120) on this CPU-only machine with the newest triton: every
kernel, autotune config and launch variant of bench/compile_matrix.py's sample matrix that the package launches on
each arch, checked from the cubin for spills (STACK and LOCAL 0), registers within the launch's budget, shared
memory within the device limit and tensor-core instructions. Runs bench/compile_report.py in a subprocess: the
compiler needs the jit functions that TRITON_INTERPRET=1 (set for this test session on CPU) replaces. .ci/run runs
the report with triton 3.6.0, the GPU image's version, in a torch-free venv: the CI matrix on sm_80/sm_90 and the
sample on the others."""

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
from helpers import legacy_tf32_flag  # noqa: E402

from fused_lora import dispatch, hardware  # noqa: E402
from fused_lora.backends import triton_launch  # noqa: E402


def test_matrix_follows_the_launchers(monkeypatch):
    """compile_matrix mirrors triton_launch's BLOCK_R and precision choices and the router's choice of what runs on each
    arch (it cannot import torch)."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name, dtype in names.items():
        for kernel in cm.KERNELS:
            if "BLOCK_R" not in cm.launch_args(cm.Variant(kernel))[1]:
                continue  # no rank-r term (4-bit dequantization)
            want = triton_launch.skinny_rank_block if kernel in cm.SKINNY_KERNELS else triton_launch.rank_block
            assert all(cm.block_r(r, name, kernel) == (want(r) if kernel in cm.SKINNY_KERNELS else want(r, dtype))
                       for r in range(1, 300)), kernel
            assert ({cm.block_r(r, name, kernel) for r in range(1, 300)}
                    <= {cm.block_r(v.rank, name, kernel) for v in cm.full_matrix() if v.kernel == kernel}), kernel
    cpu = torch.device("cpu")
    for arch in cm.ARCHS:  # per arch: Turing's FMA dots take 16-rank chunks
        monkeypatch.setattr(hardware, "device_capability", lambda d, a=arch: divmod(a, 10))
        for name, dtype in names.items():
            for r in (8, 16, 33, 64, 200):
                want = triton_launch.skinny_rank_block(r, cpu)
                assert cm.block_r(r, name, "lora_down_kernel", arch) == want, (arch, r)
                assert cm.block_r(r, name, "lora_up_add_kernel", arch) == triton_launch.rank_block(r, dtype, cpu)
    monkeypatch.undo()
    device = torch.device("cpu")
    for arch in cm.ARCHS:
        monkeypatch.setattr(hardware, "device_capability", lambda d, a=arch: divmod(a, 10))
        for tf32 in (False, True):
            with legacy_tf32_flag(tf32):
                for name, dtype in names.items():
                    got = triton_launch.dot_precision(dtype, device)
                    assert cm.precision(name, tf32, arch) == got, (arch, name, tf32)
    for arch in cm.ARCHS:
        monkeypatch.setattr(hardware, "device_capability", lambda d, a=arch: divmod(a, 10))
        # the fused GEMMs run where the router offers them ("auto" times them too); Turing's auto leaves them out
        gemm_kernels_run = "fused" in dispatch.route(dispatch.LORA, "dense", device, None, "triton")[2]
        for v in cm.full_matrix():
            runs = all(hardware.unfit_reason(device, names[d]) is None for d in (v.base, v.adapter))
            # DoRA where the GEMM is composed (Turing): the PyTorch path (fused_lora.dispatch.route), no DoRA kernel
            runs = runs and (gemm_kernels_run or (v.kernel not in cm.GEMM_KERNELS and v.kernel not in cm.DORA_KERNELS))
            # a 4-bit layer whose K is not a multiple of its blocksize: the composed path on GPUs (quantized.py)
            runs = runs and (v.q4_aligned or v.kernel not in cm.GEMM_KERNELS)
            assert cm.launched_on(v, arch) == runs, (arch, v)


def _without_interpreter(script: str) -> str:
    """Run ``script`` (with bench/ importable) where the kernels are the GPU's, not the interpreter's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r})\n{script}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_exclusions_name_real_configs():
    """Every per-arch exclusion in kernels/configs.py names a config of its kernel's lists and a known arch (a typo
    would silently exclude nothing), and no (arch, variant) is left without a config."""
    out = _without_interpreter("""
import compile_matrix as cm
configs = cm.configs
excluded = list(configs.EXCLUDED)
configs.EXCLUDED.clear()  # the configs lists before any arch's exclusions (DoRA has some on sm_80 too)
listed = {v: cm.configs_for(cm.KERNELS[v.kernel], v, 80) for v in cm.full_matrix()}
configs.EXCLUDED.extend(excluded)
for archs, kernel, cases, ranks, name, why in configs.EXCLUDED:
    assert set(archs) <= set(cm.ARCHS) and why
    assert set(cases) <= {"fp32", "fp32-adapters", "half"} and set(ranks) <= {16, 32, 64}
    names = {configs.config_name(c) for v in cm.full_matrix() if v.kernel == kernel for c in listed[v]}
    assert name in names, (kernel, name, sorted(names))
for arch in cm.ARCHS:
    for v in cm.variants_for("full", arch):
        consts = cm.launch_args(v, arch)[1]
        case = ("fp32" if v.base == "fp32" else "fp32-adapters" if v.adapter == "fp32" else "half")
        assert configs.kept_on(v.kernel, arch, case, consts.get("BLOCK_R", 0), listed[v]), (arch, v)
print("ok", len(configs.EXCLUDED))
""")
    assert out.startswith("ok")


def _compile_check(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--check", "--quiet", "--jobs", "2",
                           "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    records = json.loads(out.read_text())
    failed = [f"sm_{r['arch']} {r['kernel']} {r['variant']} {r['config']}: {r['problems']}"
              for r in records if r["problems"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return records


def test_kernels_compile_for_every_gpu_arch(tmp_path):
    """The sampled matrix on all seven archs (sm_75 … sm_120) with the newest triton, each variant at the config a
    launch takes with autotuning off (the first left after the arch's exclusions); .ci/run checks triton 3.6.0 so
    on sm_90 (every launch variant of the CI matrix). The committed reports (bench/results/compile/) hold every
    config of the CI matrix on every arch for both tritons."""
    records = _compile_check(tmp_path, "--arch", "all", "--matrix", "sample", "--first-config")
    groups = Counter((r["arch"], r["kernel"], r["variant"]) for r in records)
    assert set(groups) == {(a, v.kernel, v.label()) for a in cm.ARCHS for v in cm.variants_for("sample", a)}
    assert set(groups.values()) == {1}  # the first config of each: what a launch takes with autotuning off
    for arch in cm.ARCHS:  # every kernel the arch runs is in the sample, and Turing runs no GEMM kernel
        kernels = {r["kernel"] for r in records if r["arch"] == arch}
        assert kernels == ({*cm.KERNELS} - (set(cm.GEMM_KERNELS) | set(cm.DORA_KERNELS) if arch < 80 else set())), arch


def test_call_to_call_values_compile_one_variant():
    """Launches that differ only in M, the M bucket and the GPU kind (``ARCH``, every autotuned kernel's argument and
    autotune key) specialize to one signature with Triton's own rule (an int that is 1 or a multiple of 16 is otherwise
    a new variant: a recompile in the middle of training for a new batch length; sm_80's 80 is a multiple of 16); the
    dropout seed is no argument value at all but read from device memory (``seed_ptr``), and a launch with
    dropout passes an int64 pointer there. Issue 12. Runs without the interpreter, in a subprocess, because the rule
    is the compiler's."""
    script = """
import sys
sys.path.insert(0, sys.argv[1])
import compile_matrix as cm
for name, kernel in cm.KERNELS.items():
    variant = cm.Variant(name)
    config = cm.configs_for(kernel, variant)[0]
    args = cm.launch_args(variant)[0]
    seen = set()
    assert "ARCH" in args and "ARCH" in kernel.keys, name
    assert "seed" not in args and ("seed_ptr" not in args or args["seed_ptr"] == "i64"), name
    for m, arch in ((1000, 90), (1024, 80), (1, 75), (4096, 100), (17, 86)):
        over = {k: v for k, v in {"M": m, "M_BUCKET": m, "ARCH": arch}.items() if k in args}
        sig, const, attrs = cm.specialize(kernel.fn, variant, config, over)
        seen.add(repr((sorted(sig.items()), sorted(map(str, const.items())), sorted(map(str, attrs.items())))))
    assert len(seen) == 1, (name, seen)
    print(name, "ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, str(BENCH)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == len(cm.KERNELS)


def test_dora_g_is_ieee_rounded_and_its_norm_has_no_atomics():
    """DoRA's g = magnitude / ‖W + s·B A‖ in the kernels is IEEE-rounded, as PyTorch's (PEFT's) is: the sm_90 PTX of the
    norm kernel (its root, one K slice) holds sqrt.rn.f32, the forward GEMM (both forms) and the dY pass div.rn.f32,
    and none holds an approximate root, reciprocal or division (plain tl.sqrt and / gave sqrt.approx.ftz.f32 and
    div.full.f32); and the norm kernel split over K has no atomic instruction (its slices' partials are summed in a
    fixed order: bitwise repeatable)."""
    out = _without_interpreter("""
import json, os, re
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import compile_matrix as cm
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for v in (cm.Variant("dora_fwd_kernel"), cm.Variant("dora_fwd_kernel", dropout=False), cm.Variant("dora_dy_kernel"),
          cm.Variant("dora_norm_kernel", split=1), cm.Variant("dora_norm_kernel", split=2)):
    kernel = cm.KERNELS[v.kernel]
    config = cm.configs_for(kernel, v, 90)[0]
    signature, constexprs, attrs = cm.specialize(kernel.fn, v, config, arch=90)
    ptx = triton.compile(ASTSource(kernel.fn, signature, constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": config.num_warps, "num_stages": config.num_stages}).asm["ptx"]
    print(json.dumps([v.kernel, v.label(), sorted(set(re.findall(r"\\b(?:sqrt|rsqrt|rcp|div)\\.[\\w.]*f32", ptx))),
                      sorted(set(re.findall(r"\\b(?:atom|red)\\.[\\w.]+", ptx)))]))
""")
    found = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert len(found) == 5, out
    for kernel, label, float_ops, atomics in found:
        assert not [op for op in float_ops if ".rn." not in op], (kernel, label, float_ops)
        if kernel == "dora_norm_kernel":
            assert atomics == [], (label, atomics)
            assert float_ops == (["sqrt.rn.f32"] if "split1" in label else []), (label, float_ops)
        else:
            assert "div.rn.f32" in float_ops, (kernel, label, float_ops)
