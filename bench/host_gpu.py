"""The Triton path's host cost per forward + backward as a GPU would pay it, estimated on a CPU, against PEFT's LoRA
layer: what bounds small layers (GPT-2, short sequences), whose GPU work is shorter than the time the host needs to
issue it.

    python bench/host_gpu.py                         # M=4, 16→16, r=8; p 0 / 0.1; fp32 / bf16; fused / composed
    python bench/host_gpu.py --profile --out DIR     # + cProfile of our path by module (what each layer costs)

Method (the estimate of the project's issue on host cost, reproduced):

- ours: ``LoRALinear`` on the Triton backend with triton's real launch path (``Autotuner.run``, ``JITFunction.run``,
  the kernels compiled for sm_90 on this CPU) up to the launcher, which is a stand-in that only counts
  (tests/fake_cuda.py); the package routes CPU tensors as on an sm_90 GPU. PEFT: its ``lora.Linear`` layer on CPU
  at the same tiny shape (its compute is ~1 µs an op there). Each ``y = layer(x); y.backward(dy)``, gradients set to
  None after each call (as ``zero_grad`` does), timed as this thread's CPU time (``time.thread_time_ns``: other
  processes on a shared machine do not count), median of interleaved rounds;
- plus, per forward + backward, ``TRITON_LAUNCH_US`` per Triton launch (the launcher and ``cuLaunchKernel``, which
  the stand-in replaces) and ``CUDA_KERNEL_US`` per aten op that would launch a CUDA kernel (``measure.count_cpu_ops``:
  ops that move data, top level only) for either provider.

Not in the estimate: the CUDA runtime's own work inside the device guard each layer pass enters
(``torch.cuda.device``, entered by the driver: a no-op context on CPU), and the self-check's steady-state set
lookup (off on CPU). bench/run_gpu.sh's ``host_gpu`` case measures the real thing on a GPU (wall clock per layer, ours
and PEFT's) to check this estimate.

Runs on a checkout without the fast path too (``PYTHONPATH=<checkout> python bench/host_gpu.py``): the "before"
numbers in bench/results/cpu-2026-12-06/host_gpu/ were taken that way.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # triton's real JIT: before triton (and the kernels) are imported
os.environ.setdefault("FUSED_LORA_AUTOTUNE", "0")  # one config per kernel to compile; the steady state is the same

import argparse  # noqa: E402
import copy  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import measure  # noqa: E402
from fake_cuda import fake_cuda, package_on_fake_gpu  # noqa: E402

# Host time of one Triton launch past JITFunction.run: CompiledKernel.run → triton's C launcher → cuLaunchKernel, for a
# 19-argument no-op kernel: ~5.6 µs (tritonbench launch_latency, meta-pytorch/tritonbench issue #1017; PR #669 has
# 3.6 µs for CompiledKernel.run at 19 arguments with triton 3.5, PR #1016 1.3 µs for a bare cuLaunchKernel). Our
# kernels take 20-35 arguments. On this machine a 19-argument no-op kernel's Python launch path (JITFunction.run up to
# the launcher) took 7.0 µs against ~6.85 µs published: the machine is comparable.
TRITON_LAUNCH_US = 5.6
# Host time of one aten op's CUDA kernel launch beyond its CPU dispatch (the CUDA runtime's cudaLaunchKernel and the
# caching allocator's bookkeeping), the constant of the project's estimate; the GPU calibration case checks it.
CUDA_KERNEL_US = 3.0
TARGETS = {"fused": 0.8, "composed": 1.0}  # ours / PEFT's estimated host cost per fwd+bwd


class CountingLauncher:
    """The stand-in for triton's C launcher here: counts, nothing else (its cost is ``TRITON_LAUNCH_US``)."""

    launches = 0

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args) -> None:
        CountingLauncher.launches += 1


def build(K: int, N: int, r: int, p: float, dtype: torch.dtype) -> dict[str, nn.Module]:
    import peft

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(K, N).to(dtype)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                     peft.LoraConfig(target_modules=["0"], r=r, lora_dropout=p,
                                                     init_lora_weights=False))
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_dropout=p, init_lora_weights=False)
    return {"peft": peft_model.base_model.model[0].train(), "ours": ours.train()}


def stepper(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [t for t in layer.parameters() if t.requires_grad] + [x]

    def step() -> None:
        layer(x).backward(dy)
        for t in params:
            t.grad = None

    return step


def launchers_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, p: float, gemm: str):
    """The five launcher calls of one forward + backward of ``layer``'s Triton path, alone (their plans, allocations
    and launches; nothing above them): the part of ours this bench attributes to the launchers."""
    from fused_lora.backends import lora_triton as lt

    w, b, A, B = layer.weight, layer.bias, layer.lora_A.detach(), layer.lora_B.detach()
    x, scaling = x.detach(), layer.scaling
    seed = torch.tensor([1234], dtype=torch.int64) if p > 0 else None
    y_buf, dx_buf = torch.empty(dy.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)

    def step() -> None:
        s = lt.lora_down(x, A, seed, p)
        if gemm == "fused":
            lt.lora_forward(x, w, b, s, B, scaling, "linear")
        else:
            lt.lora_up_add(y_buf, s, B, scaling)
        ds, _, _ = lt.lora_dy_pass(dy, B, s, scaling, True, True, False)
        if gemm == "fused":
            lt.lora_dx(dy, w, ds, A, "linear", seed, p, x.dtype)
        else:
            lt.lora_dx_add(dx_buf, ds, A, seed, p)
        lt.lora_da(ds, x, A, seed, p)

    return step


def thread_time_us(step, iterations: int) -> float:
    start = time.thread_time_ns()
    for _ in range(iterations):
        step()
    return (time.thread_time_ns() - start) / iterations / 1e3


def measure_case(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, gemm: str, rounds: int,
                 iterations: int) -> dict:
    os.environ["FUSED_LORA_GEMM"] = gemm
    layers = build(K, N, r, p, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype)
    steps = {name: stepper(layer, x, dy) for name, layer in layers.items()}
    steps["launchers"] = launchers_step(layers["ours"], x, dy, p, gemm)
    for step in steps.values():
        for _ in range(30):  # compile, tune, warm the allocator and the plans
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(thread_time_us(step, iterations))
    cpu = {name: statistics.median(v) for name, v in samples.items()}
    kernels, launches = {}, {}
    for name, step in steps.items():
        before = CountingLauncher.launches
        kernels[name] = len(measure.count_cpu_ops(step)[0])
        launches[name] = CountingLauncher.launches - before
    fixed = {name: CUDA_KERNEL_US * kernels[name] + TRITON_LAUNCH_US * launches[name] for name in steps}
    est = {name: cpu[name] + fixed[name] for name in steps}
    # the ratio per round (both providers timed back to back), then its median: load drift between rounds cancels
    ratio = statistics.median((o + fixed["ours"]) / (q + fixed["peft"])
                              for o, q in zip(samples["ours"], samples["peft"], strict=True))
    return {"M": M, "K": K, "N": N, "r": r, "p": p, "dtype": str(dtype).removeprefix("torch."), "gemm": gemm,
            "cpu_us": cpu, "aten_kernels": kernels, "triton_launches": launches, "estimate_us": est,
            "ours_over_peft": ratio, "target": TARGETS[gemm], "met": ratio <= TARGETS[gemm],
            "cpu_us_samples": samples}


LAUNCHERS = {"lora_down", "lora_forward", "lora_up_add", "lora_dy_pass", "lora_dx", "lora_dx_add", "lora_da",
             "forward_4bit", "dx_4bit", "dequantize", "dora_norm", "dora_down", "dora_forward_gemm", "dora_dy_pass",
             "dora_dx", "dropout_mask"}
LAUNCHER_FILES = ("backends/lora_triton.py", "backends/dora_triton.py", "backends/bnb4_triton.py",
                  "backends/dropout_triton.py")
MODULE_GROUPS = [  # (label, path fragments): the first match names a profiled function's group
    ("router, module, functional API", ("fused_lora/dispatch.py", "fused_lora/functional.py", "fused_lora/layer.py",
                                        "fused_lora/validation.py", "fused_lora/dropout.py", "fused_lora/config.py",
                                        "fused_lora/call.py", "fused_lora/bases/__init__.py")),
    ("autograd driver (the Function, path state, checks' bookkeeping)", ("fused_lora/autograd/",
                                                                         "backends/path_state.py")),
    ("path choice and self-check", ("backends/self_check.py", "backends/path_choice.py", "backends/gemm_choice.py")),
    ("layer passes (forward_with, backward_with, ...)", ("backends/kernel_fallback.py", "backends/masks.py")),
    ("the base layer's GEMMs (composed: cuBLAS on a GPU)", ("fused_lora/base_layers.py", "backends/dense_base.py")),
    ("launchers (plans, allocations)", ("backends/triton_launch.py", "fused_lora/hardware.py", "kernels/configs.py")),
    ("fast launch", ("backends/fast_launch.py",)),
    ("triton runtime (Autotuner.run, JITFunction.run, CompiledKernel)", ("/triton/",)),
    ("stand-ins (driver's stream getter, launcher, hardware.device_capability)", ("fake_cuda.py", "host_gpu.py")),
    ("PyTorch (Module.__call__, Function.apply, the autograd engine)", ("/torch/",)),
]


def group_of(filename: str, name: str) -> str:
    if filename == "~":  # a C function: torch ops (allocation, autograd engine), dict/tuple builtins
        return "C calls (torch ops, the autograd engine, builtins)"
    if any(f in filename for f in LAUNCHER_FILES):  # the launchers' files also hold the layer passes
        if name in LAUNCHERS or name.startswith("_"):
            return "launchers (plans, allocations)"
        return "layer passes (forward_with, backward_with, ...)"
    for label, fragments in MODULE_GROUPS:
        if any(f in filename for f in fragments):
            return label
    return "other Python"


def profile_case(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, gemm: str, iterations: int) -> dict:
    """cProfile of our layer's forward + backward, own time summed by module group (shares; cProfile's overhead per
    Python call inflates call-heavy groups, so read these as where the calls are, with the thread-time total beside)."""
    os.environ["FUSED_LORA_GEMM"] = gemm
    layer = build(K, N, r, p, dtype)["ours"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype)
    step = stepper(layer, x, dy)
    for _ in range(30):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iterations):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    groups: dict[str, float] = {}
    calls = 0
    for (filename, _, name), (_, ncalls, tottime, _, _) in stats.items():
        if name in ("step", "disable"):
            continue
        label = group_of(filename, name)
        groups[label] = groups.get(label, 0.0) + tottime
        calls += ncalls
    total = sum(groups.values())
    return {"p": p, "dtype": str(dtype).removeprefix("torch."), "gemm": gemm, "python_calls": calls // iterations,
            "share": {k: v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "profiled_us": total / iterations * 1e6}


def sample_case(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, gemm: str, iterations: int,
                interval_us: int = 47) -> dict:
    """Where our forward + backward spends its CPU time, sampled: a CPU-time timer (``ITIMER_PROF``) interrupts every
    ``interval_us`` µs and the sample goes to the innermost frame of the stack that belongs to a module group (C calls
    count for the Python function that made them; the autograd engine's C++ for PyTorch's Python that entered it).
    No per-call overhead, unlike cProfile: the shares are of the real time."""
    import signal

    os.environ["FUSED_LORA_GEMM"] = gemm
    layer = build(K, N, r, p, dtype)["ours"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype)
    step = stepper(layer, x, dy)
    for _ in range(30):
        step()
    counts: dict[str, int] = {}
    here = str(Path(__file__).resolve())

    def on_sample(signum, frame) -> None:
        label = "other"
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename != here:
                label = group_of(filename, frame.f_code.co_name)
                if label != "other Python":
                    break
            frame = frame.f_back
        counts[label] = counts.get(label, 0) + 1

    previous = signal.signal(signal.SIGPROF, on_sample)
    signal.setitimer(signal.ITIMER_PROF, interval_us / 1e6, interval_us / 1e6)
    start = time.thread_time_ns()
    try:
        for _ in range(iterations):
            step()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, previous)
    us = (time.thread_time_ns() - start) / iterations / 1e3
    total = sum(counts.values())
    return {"p": p, "dtype": str(dtype).removeprefix("torch."), "gemm": gemm, "samples": total, "cpu_us": us,
            "share": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def table(records: list[dict], header: str) -> str:
    lines = [header, "",
             "| p | dtype | path | PEFT CPU µs | PEFT kernels | PEFT est. µs | ours CPU µs | ours aten kernels "
             "| ours Triton launches | ours est. µs | ours/PEFT | target | of ours' CPU µs: launchers | above them |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in records:
        c, k, n, e = r["cpu_us"], r["aten_kernels"], r["triton_launches"], r["estimate_us"]
        lines.append(f"| {r['p']} | {r['dtype']} | {r['gemm']} | {c['peft']:.1f} | {k['peft']} | {e['peft']:.1f} "
                     f"| {c['ours']:.1f} | {k['ours']} | {n['ours']} | {e['ours']:.1f} | {r['ours_over_peft']:.2f} "
                     f"| ≤ {r['target']} {'met' if r['met'] else 'MISSED'} | {c['launchers']:.1f} "
                     f"| {c['ours'] - c['launchers']:.1f} |")
    return "\n".join(lines) + "\n"


def profile_table(profiles: list[dict], title: str) -> str:
    labels = []
    for prof in profiles:
        labels += [k for k in prof["share"] if k not in labels]
    head = " | ".join(f"p={q['p']} {q['dtype']} {q['gemm']}" for q in profiles)
    lines = ["", title, "", f"| group | {head} |", "|---|" + "---:|" * len(profiles)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{100 * q['share'].get(label, 0):.0f}%" for q in profiles) + " |")
    if "python_calls" in profiles[0]:
        lines.append("| Python calls per fwd+bwd | " + " | ".join(str(q["python_calls"]) for q in profiles) + " |")
    else:
        lines.append("| CPU µs per fwd+bwd (while sampled) | " + " | ".join(f"{q['cpu_us']:.1f}" for q in profiles)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--gemms", nargs="+", default=["fused", "composed"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=200, help="calls per timed block")
    parser.add_argument("--profile", action="store_true", help="also cProfile our path by module group")
    parser.add_argument("--label", default="", help="a name for this checkout in the output (e.g. before/after)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import triton

    import fused_lora

    records, profiles, sampled = [], [], []
    with fake_cuda(record=False) as gpu, package_on_fake_gpu():
        gpu.driver.launcher_cls = CountingLauncher
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for p in args.ps:
                for gemm in args.gemms:
                    records.append(measure_case(args.tokens, args.features, args.features, args.r, p, dtype, gemm,
                                                args.rounds, args.iterations))
                    if args.profile:
                        profiles.append(profile_case(args.tokens, args.features, args.features, args.r, p, dtype,
                                                     gemm, args.iterations * 5))
                        sampled.append(sample_case(args.tokens, args.features, args.features, args.r, p, dtype,
                                                   gemm, args.iterations * 20))
    fast = getattr(getattr(fused_lora.backends, "fast_launch", None), "enabled", lambda: False)()
    header = (f"Host cost per forward+backward, estimated for a GPU on {platform.machine()} "
              f"({os.cpu_count()} CPUs, {args.threads} torch thread(s)), {args.label or 'this checkout'} "
              f"({fused_lora.__file__.rsplit('/fused_lora/', 1)[0]}; fast launch {'on' if fast else 'absent/off'}); "
              f"triton {triton.__version__}, torch {torch.__version__}; M={args.tokens}, "
              f"{args.features}→{args.features}, r={args.r}, fp32 adapters (both layers' default; on the bf16 base "
              f"too), bias frozen (PEFT's default), x trained.\n\n"
              f"estimate = CPU thread time + {CUDA_KERNEL_US} µs × aten kernels (CUDA_KERNEL_US) + "
              f"{TRITON_LAUNCH_US} µs × Triton launches (TRITON_LAUNCH_US: tritonbench issue #1017); "
              f"median of {args.rounds} interleaved rounds of {args.iterations} calls (ours/PEFT: the median of the "
              f"rounds' ratios). Launchers: the five launcher calls alone, allocations included; above them: the "
              f"rest of ours (router, autograd Function, path driver, guard, PyTorch's autograd).\n"
              f"Command: python bench/host_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    text = table(records, header)
    if profiles:
        text += profile_table(profiles, "Our forward + backward under cProfile: share of own time by module group "
                                        "(cProfile's per-call overhead inflates groups of many small calls)")
        text += profile_table(sampled, "Our forward + backward, CPU-time samples every 47 µs: share by module group "
                                       "(the innermost frame of a group; C calls count for their Python caller)")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"host_gpu_{args.label}" if args.label else "host_gpu"
        (args.out / f"{name}.json").write_text(json.dumps({"records": records, "profiles": profiles,
                                                          "samples": sampled}, indent=1) + "\n")
        (args.out / f"{name}.md").write_text("# " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
