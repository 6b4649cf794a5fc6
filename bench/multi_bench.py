"""Several LoRA adapters on one frozen base, trained concurrently, vs the same adapters trained as separate runs.

    python bench/multi_bench.py --threads 1 --out bench/results/cpu-2026-12-06/multi   # CPU (torch path)
    python bench/multi_bench.py --device cuda --preset llama7b-mlp --blocks 1           # GPU (Triton kernels)
    python bench/multi_bench.py --preset tiny --ns 1 2 --tokens 8 --quick               # seconds: the smoke test

What is measured, for each adapter count n (default 1, 2, 4, 8), with the same tokens per adapter (--tokens):

- the model: a stack of --blocks MLP blocks h + fc2(gelu(fc1(h))) (--preset: OPT-350m's 1024→4096→1024 by default,
  Llama-7B's 4096→11008→4096), both projections adapted (rank --rank, p = 0, random A and B), mean-squared loss on a
  random target, AdamW on the adapters. Why a stack of adapted layers and not an HF model through inject_adapters: the
  claim is per adapted layer (one call per layer, the base weight read once for all adapters); attention, norms and
  embeddings do the same work both ways and would only dilute the ratio. The module path is the one inject_adapters
  builds (MultiLoRALinear layers sharing one Rows; adapter_names one per example).
- concurrent: ONE model (one copy of the base) with n adapters; a step is one forward over the n·tokens rows (one
  MultiLoRALinear call per layer), one backward, one AdamW step over every adapter.
- sequential: n separate single-adapter models (LoRALinear), each with ITS OWN COPY of the base, as n separate runs
  would have; a step runs them one after the other (forward, backward, AdamW each) on the same tokens per adapter.
- correctness first: both ways start from the same adapters and take two steps; every adapter's A and B must agree
  (fp32: 1e-4 relative, half: 2e-2) or the case is not timed (``check`` in the JSON).
- time per step: CPU: measure.time_cpu_interleaved (both ways in each round, --rounds, median and 20/80 % quantiles
  over all blocks); GPU: triton.testing.do_bench. The ratio is concurrent ÷ sequential.
- memory: ``tensor MiB``: exact bytes of the tensors each way keeps (base weights, adapters, their grads and AdamW
  states), counted per storage. ``peak``: CPU: the peak RSS (VmHWM) of a fresh process that builds one way and takes
  3 steps, minus that of a process that runs the same code on a tiny stack (libtorch's code pages count in RSS;
  ``--no-rss`` skips it); the sequential way is n SEPARATE processes of one single-adapter run (their peaks summed),
  as n separate runs would take. GPU: in this process, torch.cuda.max_memory_allocated over building and 2 steps of
  one way, above what was allocated before (the sequential way: its n models resident at once). ``goal``: the
  concurrent tensor bytes ≤ the sequential ones / n + the n adapters' (one base instead of n, the adapters' own bytes
  on top). Peaks also hold activations, which are the same total both ways but live at once in the concurrent step
  (n × tokens rows) and one run at a time in each separate process: the peak ratio is shown, not held to 1/n.
- W read: the frozen weights' DRAM bytes per step from bench/traffic_model.py's multi-adapter model (compulsory:
  once per GEMM; concurrent reads each W twice per step, sequential 2n times), summed over the stack's layers, and
  its predicted H100 time ratio for this stack (roofline; with the host floor).
- launches per layer (fc1's forward + backward, the adapters' parameters and x requiring grad): CPU: aten ops that do
  work (measure.count_cpu_ops: the torch path's passes over memory); plus, in a subprocess with TRITON_INTERPRET=1 and
  every Triton kernel stubbed out (bench/triton_host_calls.py's method), the GPU path's Triton launches + aten ops
  that would launch, and its host µs per layer fwd+bwd (the Python work a GPU step pays before its launches; this
  CPU's thread time, min and median of --rounds blocks). GPU: CUDA kernels, memsets and memcpys seen by torch.profiler.

CPU numbers are the PyTorch path (the Triton interpreter is not a timing); the fused Triton numbers come from a GPU
(bench/run_gpu.sh bench). Writes multi.json and multi.md into --out (default bench/results/<device>-<date>/multi).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling modules, however this file is started

# (hidden, ffn) of one MLP block; the stack's adapted layers are fc1 (hidden→ffn) and fc2 (ffn→hidden).
PRESETS = {
    "opt350m-mlp": (1024, 4096),  # facebook/opt-350m: hidden 1024, ffn_dim 4096
    "llama7b-mlp": (4096, 11008),  # Llama-2-7B: hidden 4096, intermediate 11008 (fc1 = up_proj, fc2 = down_proj)
    "tiny": (48, 80),  # the smoke test
}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
MiB = 2**20


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------- models

def _torch():
    import torch

    return torch


def build_stack(hidden: int, ffn: int, blocks: int, device, dtype, seed: int = 0):
    """The frozen base: ``blocks`` MLP blocks (fc1 hidden→ffn with a bias, fc2 ffn→hidden with a bias)."""
    torch = _torch()
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

        def forward(self, h):
            return h + self.fc2(nn.functional.gelu(self.fc1(h)))

    torch.manual_seed(seed)
    stack = nn.Sequential(*(Block() for _ in range(blocks))).to(device=device, dtype=dtype)
    for p in stack.parameters():
        p.requires_grad_(False)
    return stack


def adapter_values(i: int, layer: int, r: int, k: int, n: int, dtype, device):
    """Adapter i's A (r×k) and B (n×r) on adapted layer ``layer``: random (B not zero, so A trains from step one),
    the same for both ways."""
    torch = _torch()
    g = torch.Generator().manual_seed(1000 * i + layer)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _adapted(stack) -> list:
    return [m for blk in stack for m in (blk.fc1, blk.fc2)]


def concurrent_model(base, n: int, r: int, alpha: float):
    """One base, n adapters: every fc1/fc2 becomes a MultiLoRALinear sharing one Rows; every example of adapter i."""
    torch = _torch()
    from fused_lora.multi_layer import AdapterSettings, MultiLoRALinear, Rows

    rows = Rows()
    names = [f"a{i}" for i in range(n)]
    settings = {name: AdapterSettings(r=r, lora_alpha=alpha) for name in names}
    for blk in base:
        for attr in ("fc1", "fc2"):
            setattr(blk, attr, MultiLoRALinear(getattr(blk, attr), settings, rows=rows, init=False))
    with torch.no_grad():
        for j, m in enumerate(_adapted(base)):
            for i, name in enumerate(names):
                a, b = adapter_values(i, j, r, m.in_features, m.out_features, m.lora_A[name].dtype, m.weight.device)
                m.lora_A[name].copy_(a)
                m.lora_B[name].copy_(b)
    rows.set(names)  # x's dim 0: one example per adapter, in adapter order (grouped: no copy)
    params = [p for p in base.parameters() if p.requires_grad]
    return base, params, names


def sequential_models(base, n: int, r: int, alpha: float) -> list:
    """n single-adapter runs, each with its own deep copy of the base (as separate runs would load it)."""
    torch = _torch()
    from fused_lora import LoRALinear

    runs = []
    for i in range(n):
        own = copy.deepcopy(base)
        for blk in own:
            for attr in ("fc1", "fc2"):
                setattr(blk, attr, LoRALinear.from_linear(getattr(blk, attr), r=r, lora_alpha=alpha))
        with torch.no_grad():
            for j, m in enumerate(_adapted(own)):
                a, b = adapter_values(i, j, r, m.in_features, m.out_features, m.lora_A.dtype, m.weight.device)
                m.lora_A.copy_(a)
                m.lora_B.copy_(b)
        runs.append((own, [p for p in own.parameters() if p.requires_grad]))
    return runs


class Way:
    """One way's step: models, optimizers, inputs (x: n×tokens×hidden, target alike)."""

    def __init__(self, kind: str, models, x, target, lr: float = 1e-3) -> None:
        torch = _torch()
        self.kind = kind
        self.x, self.target = x, target
        if kind == "concurrent":
            model, params, _ = models
            self.runs = [(model, params, torch.optim.AdamW(params, lr=lr))]
        else:
            self.runs = [(m, p, torch.optim.AdamW(p, lr=lr)) for m, p in models]

    def step(self) -> list:
        losses = []
        if self.kind == "concurrent":
            model, _, opt = self.runs[0]
            opt.zero_grad(set_to_none=True)
            per_adapter = (model(self.x) - self.target).float().square().mean(dim=(1, 2))
            per_adapter.sum().backward()  # each adapter's gradient is that of its own mean loss
            opt.step()
            losses = per_adapter.detach()
        else:
            for i, (model, _, opt) in enumerate(self.runs):
                opt.zero_grad(set_to_none=True)
                loss = (model(self.x[i:i + 1]) - self.target[i:i + 1]).float().square().mean()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return losses

    def adapters(self) -> list:
        """Per adapter, its A and B tensors in layer order."""
        if self.kind == "concurrent":
            model = self.runs[0][0]
            names = list(_adapted(model)[0].lora_A)
            return [[t for m in _adapted(model) for t in (m.lora_A[n], m.lora_B[n])] for n in names]
        return [[t for m in _adapted(model) for t in (m.lora_A, m.lora_B)] for model, _, _ in self.runs]

    def tensor_bytes(self) -> dict:
        """Exact bytes kept: base weights; adapters + their grads + AdamW states (unique storages)."""
        seen: dict[int, tuple[str, int]] = {}

        def add(t, what: str) -> None:
            if t is not None:
                s = t.untyped_storage()
                seen.setdefault(s.data_ptr(), (what, s.nbytes()))

        for model, params, opt in self.runs:
            for p in model.parameters():
                add(p, "adapters" if p.requires_grad else "base")
            for p in params:
                add(p.grad, "adapters")
                for state in opt.state.get(p, {}).values():
                    if hasattr(state, "untyped_storage") and state.numel() > 1:
                        add(state, "adapters")
        out = {"base": 0, "adapters": 0}
        for what, nbytes in seen.values():
            out[what] += nbytes
        return out


def make_way(args, n: int, device, dtype, kind: str) -> Way:
    """One way of case n, built alone (its own base; the inputs are the same for both ways)."""
    torch = _torch()
    hidden, ffn = PRESETS[args.preset]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, args.tokens, hidden, generator=g).to(device=device, dtype=dtype)
    target = torch.randn(n, args.tokens, hidden, generator=g).to(device=device, dtype=dtype)
    base = build_stack(hidden, ffn, args.blocks, device, dtype)
    if kind == "concurrent":
        return Way(kind, concurrent_model(base, n, args.rank, args.alpha), x, target)
    runs = sequential_models(base, n, args.rank, args.alpha)
    del base  # each run has its own copy
    return Way(kind, runs, x, target)


def make_ways(args, n: int, device, dtype) -> tuple[Way, Way]:
    return make_way(args, n, device, dtype, "concurrent"), make_way(args, n, device, dtype, "sequential")


def check_equal(conc: Way, seq: Way, dtype_name: str, steps: int = 2) -> dict:
    """Both ways from the same adapters: the losses and every A, B after ``steps`` steps must agree."""
    torch = _torch()
    for _ in range(steps):
        lc, ls = conc.step(), seq.step()
    loss_err = max(abs(float(a) - float(b)) / max(abs(float(b)), 1e-12) for a, b in zip(lc, ls, strict=True))
    err = 0.0
    for pc, ps in zip(conc.adapters(), seq.adapters(), strict=True):
        for a, b in zip(pc, ps, strict=True):
            a, b = a.detach().float(), b.detach().float()
            err = max(err, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    tol = 1e-4 if dtype_name == "float32" else 2e-2
    ok = err <= tol and loss_err <= tol and all(torch.isfinite(t).all() for t in lc)
    return {"steps": steps, "adapter_rel_err": err, "loss_rel_err": loss_err, "tolerance": tol, "ok": bool(ok)}


# --------------------------------------------------------------------------------- launches per layer

def one_layer(way: Way, n: int):
    """fc1 of the first block, fwd + bwd on n × tokens rows (concurrent: one call; sequential: n calls, one per run),
    x and the adapters requiring grad (a layer inside the stack)."""
    torch = _torch()
    fc1s = [model[0].fc1 for model, _, _ in way.runs]
    dy = torch.randn(*way.x.shape[:-1], fc1s[0].out_features, device=way.x.device, dtype=way.x.dtype)
    if way.kind == "concurrent":
        m, xs = fc1s[0], way.x.detach().clone().requires_grad_()
        params = [xs, *m.lora_A.values(), *m.lora_B.values()]
        return lambda: torch.autograd.grad(m(xs), params, dy)
    xs = [way.x[i:i + 1].detach().clone().requires_grad_() for i in range(n)]
    return lambda: [torch.autograd.grad(m(xs[i]), [xs[i], m.lora_A, m.lora_B], dy[i:i + 1])
                    for i, m in enumerate(fc1s)]


def count_layer_launches(conc: Way, seq: Way, n: int, device) -> dict:
    import measure

    out = {}
    for way in (conc, seq):
        run = one_layer(way, n)
        run()
        names, _ = measure.count_launches(run, device)
        out[way.kind] = len(names)
        out[way.kind + "_names"] = [s[:80] for s in names]
    return out


def stub_child(args) -> int:
    """--stub-child: the GPU path's Triton launches and host µs per layer fwd+bwd, on CPU with the kernels stubbed."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: a CPU tensor may take the Triton backend
    os.environ["FUSED_LORA_BACKEND"] = "triton"
    os.environ.setdefault("FUSED_LORA_GEMM", "fused")
    torch = _torch()
    import measure
    import triton_host_calls

    torch.set_num_threads(1)
    counter = {"launches": 0}

    class Counting:
        def __getitem__(self, grid):
            def launch(*a, **k):
                counter["launches"] += 1
            return launch

    triton_host_calls.stub_kernels()  # every *_kernel attribute of every fused_lora module
    for name, module in list(sys.modules.items()):
        if name.startswith("fused_lora") and module is not None:
            for attr in list(vars(module)):
                if attr.endswith("_kernel") and not attr.startswith("_"):
                    setattr(module, attr, Counting())
    # The launch count does not depend on the layer's size: a small layer keeps the stubbed host work the thing timed.
    hidden, ffn, tokens = 64, 96, 16
    result = {}
    for n in args.ns:
        sub = argparse.Namespace(**{**vars(args), "preset": "tiny", "tokens": tokens, "blocks": 1})
        PRESETS["tiny"] = (hidden, ffn)
        conc, seq = make_ways(sub, n, torch.device("cpu"), torch.float32)
        entry = {}
        for way in (conc, seq):
            run = one_layer(way, n)
            for _ in range(min(20, args.host_iters)):
                run()
            samples = []  # thread CPU time (the time this thread ran: other processes' load left out)
            for _ in range(max(3, args.rounds)):
                t0 = time.thread_time()
                for _ in range(args.host_iters):
                    run()
                samples.append((time.thread_time() - t0) / args.host_iters * 1e6)
            counter["launches"] = 0
            run()
            triton = counter["launches"]
            ops, _ = measure.count_cpu_ops(run)
            entry[way.kind] = {"triton_launches": triton, "aten_ops": len(ops), "launches": triton + len(ops),
                               "aten_op_names": ops, "host_us": statistics.median(samples),
                               "host_us_min": min(samples), "host_us_samples": samples}
        result[str(n)] = entry
    print(json.dumps(result))
    return 0


def gpu_path_launches(args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stub-child", "--ns", *map(str, args.ns),
           "--rounds", str(args.rounds), "--host-iters", str(args.host_iters)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_child_env(), check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- memory (CPU)

def rss_child(args) -> int:
    """--rss-child WAY N: build one way (or nothing: 'none'), take 3 steps, print the peak RSS in bytes (VmHWM: the
    peak of this process's own address space; getrusage's ru_maxrss would carry the parent's peak over the exec)."""
    torch = _torch()
    torch.set_num_threads(args.threads or 1)
    way_name, n = args.rss_child[0], int(args.rss_child[1])
    dtype = getattr(torch, args.dtype)
    if way_name != "none":
        way = make_way(args, n, torch.device("cpu"), dtype, way_name)
        for _ in range(3):
            way.step()
    else:  # the same imports and code paths (libtorch's code pages count in RSS), on a tiny stack of both ways
        tiny = argparse.Namespace(**{**vars(args), "preset": "tiny", "tokens": 4, "blocks": 1})
        for way in make_ways(tiny, n, torch.device("cpu"), dtype):
            for _ in range(3):
                way.step()
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) * 1024)  # kB
    return 0


def rss_peaks(args) -> dict:
    """Peak RSS above an empty process: concurrent per n; one single-adapter run (× n for n separate runs)."""
    def peak(way: str, n: int) -> int:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", way, str(n), "--preset", args.preset,
               "--blocks", str(args.blocks), "--tokens", str(args.tokens), "--rank", str(args.rank),
               "--dtype", args.dtype, "--threads", str(args.threads or 1)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_child_env(), check=True)
        return int(proc.stdout.strip().splitlines()[-1])

    empty = min(peak("none", 1) for _ in range(2))
    single = peak("sequential", 1) - empty
    out = {"empty_process": empty, "single_run": single, "concurrent": {}}
    for n in args.ns:
        out["concurrent"][str(n)] = peak("concurrent", n) - empty
    return out


# ---------------------------------------------------------------------------------------- the model

def traffic(args, n: int, e: int, ea: int) -> dict:
    import traffic_model as tm

    hidden, ffn = PRESETS[args.preset]
    layers = [(hidden, ffn), (ffn, hidden)] * args.blocks
    h100 = tm.DEVICES[0]
    out = {"W_bytes_once": {}, "W_bytes_h100": {}, "ms_h100": {}, "ms_h100_host_floor": {}}
    models = [tm.multi_model(tm.Shape("bench", "fc", args.tokens, k, nn, r=args.rank, p=0.0, bias=True, e=e, ea=ea),
                             n) for k, nn in layers]
    for way in tm.MULTI_WAYS:
        out["W_bytes_once"][way] = sum(m["ways"][way]["base_bytes_once"] for m in models)
        out["W_bytes_h100"][way] = sum(m["ways"][way]["devices"][h100.name]["base_bytes"] for m in models)
        out["ms_h100"][way] = sum(m["ways"][way]["devices"][h100.name]["ms"] for m in models)
        host = 1e-3 * len(models) * tm.host_us(way, n)
        out["ms_h100_host_floor"][way] = max(out["ms_h100"][way], host)
    out["ratio_h100"] = out["ms_h100"]["concurrent"] / out["ms_h100"]["sequential"]
    out["ratio_h100_host_floor"] = out["ms_h100_host_floor"]["concurrent"] / out["ms_h100_host_floor"]["sequential"]
    return out


# --------------------------------------------------------------------------------------- the driver

def run_case(args, n: int, device) -> dict:
    torch = _torch()
    import measure

    dtype = getattr(torch, args.dtype)
    e = torch.empty((), dtype=dtype).element_size()
    rec: dict = {"n": n, "tokens_per_adapter": args.tokens}
    conc, seq = make_ways(args, n, device, dtype)
    ea = conc.adapters()[0][0].element_size()
    rec["check"] = check_equal(conc, seq, args.dtype)
    rec["tensor_bytes"] = {w.kind: w.tensor_bytes() for w in (conc, seq)}
    rec["traffic"] = traffic(args, n, e, ea)
    if not rec["check"]["ok"]:
        rec["error"] = "concurrent and sequential disagree: not timed"
        return rec
    try:
        rec["launches_per_layer"] = count_layer_launches(conc, seq, n, device)
    except Exception as exc:  # a profiler quirk must not cost the timing
        rec["launches_per_layer"] = {"error": f"{type(exc).__name__}: {exc}"}
    if device.type == "cuda":
        rec["time"] = {w.kind: measure.time_gpu(w.step, args.warmup_ms, args.rep_ms) for w in (conc, seq)}
    else:
        rec["time"] = measure.time_cpu_interleaved({w.kind: w.step for w in (conc, seq)}, rounds=args.rounds,
                                                   min_run_time=args.min_time)
    rec["ratio"] = rec["time"]["concurrent"]["ms"] / rec["time"]["sequential"]["ms"]
    if device.type == "cuda":
        del conc, seq
        torch.cuda.empty_cache()
        rec["peak_bytes"] = {k: _cuda_peak(args, n, device, dtype, k) for k in ("concurrent", "sequential")}
    return rec


def _cuda_peak(args, n: int, device, dtype, kind: str) -> int:
    """Peak allocated bytes of building one way and taking 2 steps, above what was allocated before."""
    torch = _torch()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    way = make_way(args, n, device, dtype, kind)
    for _ in range(2):
        way.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    del way
    torch.cuda.empty_cache()
    return peak


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", nargs="+", default=["opt350m-mlp"], choices=list(PRESETS),
                    help="block shapes, one after the other (CPU memory and stub counts: the first)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, help="tokens per adapter (default: 64 on CPU, 512 on GPU)")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8], help="adapter counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dtype", choices=list(DTYPES), help="base dtype (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=2.0, help="CPU: seconds per way and case, over the rounds")
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="CPU: skip the per-process peak RSS")
    ap.add_argument("--no-stub", dest="stub", action="store_false",
                    help="CPU: skip the GPU path's launch count and host µs (stubbed kernels, a subprocess)")
    ap.add_argument("--host-iters", type=int, default=50, help="stubbed GPU path: layer calls per host-time sample")
    ap.add_argument("--quick", action="store_true", help="1 round, 0.1 s per way, no subprocesses")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--print-json", action="store_true", help="also print the JSON (run_gpu.sh: it keeps 8 files)")
    ap.add_argument("--rss-child", nargs=2, metavar=("WAY", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--stub-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.presets = args.preset if isinstance(args.preset, list) else [args.preset]
    args.preset = args.presets[0]
    if args.tokens is None:
        args.tokens = 512 if args.device == "cuda" else 64
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.quick:
        args.rounds, args.min_time, args.rss, args.stub = 1, 0.1, False, False
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cpu" and not args.stub_child:
        os.environ.setdefault("FUSED_LORA_BACKEND", "torch")  # the interpreter is a correctness tool, not a timing
    if args.stub_child:
        return stub_child(args)
    torch = _torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    import report

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    out_dir = args.out or report.default_out_dir(device) / "multi"
    payload = {"kind": "multi", "environment": report.environment(device), "argv": argv,
               "command": "python bench/multi_bench.py " + " ".join(argv),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "rss_child", "stub_child")}
               | {"hidden_ffn": {p: PRESETS[p] for p in args.presets}},
               "load_before": report.load_average(), "cases": []}
    print(f"# multi-adapter benchmark on {payload['environment']['device']}, {torch.get_num_threads()} threads: "
          f"{args.presets} × {args.blocks} blocks, {args.tokens} tokens per adapter, n = {args.ns}", flush=True)
    for preset, n in [(p, n) for p in args.presets for n in args.ns]:
        t0 = time.time()
        args.preset = preset
        try:
            rec = run_case(args, n, device)
        except Exception as exc:
            rec = {"n": n, "error": f"{type(exc).__name__}: {exc}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rec["preset"] = preset
        rec["seconds"] = round(time.time() - t0, 1)
        rec["load_after"] = report.load_average()
        payload["cases"].append(rec)
        print(_case_line(rec), flush=True)
        if args.print_json:  # each case as soon as it is done: a run cut off at its cap keeps what it measured
            print("MULTI_CASE " + json.dumps({k: v for k, v in rec.items() if not k.startswith("launches")},
                                             default=str), flush=True)
        write_outputs(payload, out_dir)
    args.preset = args.presets[0]
    if device.type == "cpu" and args.stub:
        payload["gpu_path_stubbed"] = gpu_path_launches(args)
    if device.type == "cpu" and args.rss:
        try:
            payload["rss"] = rss_peaks(args)
        except Exception as exc:
            payload["rss"] = {"error": f"{type(exc).__name__}: {exc}"}
    payload["load_after"] = report.load_average()
    md = write_outputs(payload, out_dir)
    print("\n" + md, flush=True)
    if args.print_json:
        print("MULTI_JSON " + json.dumps(payload, default=str))
    failed = [c for c in payload["cases"] if "error" in c]
    return 1 if failed else 0


def _case_line(rec: dict) -> str:
    if "time" not in rec:
        return f"{rec.get('preset')} n={rec['n']}: ERROR {rec.get('error')} ({rec.get('check')})"
    t = rec["time"]
    return (f"{rec['preset']} n={rec['n']}: concurrent {t['concurrent']['ms']:.2f} ms, "
            f"sequential {t['sequential']['ms']:.2f} ms, "
            f"ratio {rec['ratio']:.2f} (check rel err {rec['check']['adapter_rel_err']:.1e}) [{rec['seconds']}s]")


def _mib(b) -> str:
    return "–" if b is None else f"{b / MiB:.1f}"


def tables(payload: dict) -> str:
    cases = [c for c in payload["cases"] if "time" in c]
    rss = payload.get("rss") or {}
    stub = payload.get("gpu_path_stubbed") or {}
    lines = ["| stack | n | concurrent ms (q20–q80) | sequential ms (q20–q80) | ratio | check rel err | "
             "tensor MiB c / s | peak MiB c / s (c÷s) | goal: tensor c ≤ s/n + adapters | W MiB/step once c / s | "
             "model H100 ratio (roofline, host floor) | launches/layer c / s |",
             "|---|---:|---|---|---:|---:|---|---|---|---|---|---|"]
    for c in cases:
        n, t, tb = c["n"], c["time"], c["tensor_bytes"]
        tc, ts = (tb[w]["base"] + tb[w]["adapters"] for w in ("concurrent", "sequential"))
        adapters = tb["concurrent"]["adapters"]
        if "peak_bytes" in c:
            pc, ps = c["peak_bytes"]["concurrent"], c["peak_bytes"]["sequential"]
        elif "single_run" in rss and c["preset"] == payload["settings"]["preset"]:
            pc, ps = rss["concurrent"].get(str(n)), n * rss["single_run"]
        else:
            pc = ps = None
        bound = ts / n + adapters
        goal = f"{'yes' if tc <= bound else 'NO'} ({_mib(tc)} ≤ {_mib(bound)})"
        peak_ratio = "–" if not pc or not ps else f"{pc / ps:.2f}"
        tr = c["traffic"]
        lc = c.get("launches_per_layer", {})
        fmt = lambda x: f"{x['ms']:.2f} ({x['ms_q20']:.2f}–{x['ms_q80']:.2f})"  # noqa: E731
        lines.append(f"| {c['preset']} | {n} | {fmt(t['concurrent'])} | {fmt(t['sequential'])} | {c['ratio']:.2f} | "
                     f"{c['check']['adapter_rel_err']:.1e} | {_mib(tc)} / {_mib(ts)} | "
                     f"{_mib(pc)} / {_mib(ps)} ({peak_ratio}) | "
                     f"{goal} | {_mib(tr['W_bytes_once']['concurrent'])} / {_mib(tr['W_bytes_once']['sequential'])}"
                     f" | {tr['ratio_h100']:.2f}, {tr['ratio_h100_host_floor']:.2f} | "
                     f"{lc.get('concurrent', '–')} / {lc.get('sequential', '–')} |")
    out = "\n".join(lines)
    if stub and "error" not in stub:
        rows = ["| n | Triton launches c / s | + aten ops c / s | host µs per layer fwd+bwd, min (median) c / s | "
                "host ratio (min) |",
                "|---:|---|---|---|---:|"]
        for n, e in stub.items():
            c, s = e["concurrent"], e["sequential"]
            rows.append(f"| {n} | {c['triton_launches']} / {s['triton_launches']} | {c['aten_ops']} / "
                        f"{s['aten_ops']} | {c['host_us_min']:.0f} ({c['host_us']:.0f}) / {s['host_us_min']:.0f} "
                        f"({s['host_us']:.0f}) | {c['host_us_min'] / s['host_us_min']:.2f} |")
        out += ("\n\nThe GPU path's launches and host work per layer (fc1 fwd+bwd), counted on this CPU with every "
                "Triton kernel stubbed out (TRITON_INTERPRET=1, FUSED_LORA_GEMM=fused, 64→96, 16 tokens per adapter, "
                "1 thread; nothing launched, so host µs leave out the launch itself):\n\n" + "\n".join(rows))
    elif stub:
        out += f"\n\nStubbed GPU-path count failed: {stub['error'][-300:]}"
    return out


def write_outputs(payload: dict, out_dir: Path) -> str:
    import report

    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "multi.json", payload)
    env, s = payload["environment"], payload["settings"]
    stacks = ", ".join(f"{p} {h}→{f}→{h}" for p, (h, f) in s["hidden_ffn"].items())
    head = (f"# Several adapters on one base: concurrent vs sequential, {env['device']}\n\n"
            f"{env['date']}; torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} threads; "
            f"FUSED_LORA_BACKEND={env.get('FUSED_LORA_BACKEND')}; load average before/after "
            f"{payload['load_before']} / {payload.get('load_after')}; commit {env['git_commit']}.\n\n"
            f"Command: `{payload['command']}`\n\n"
            f"Stack: {s['blocks']} × MLP block ({stacks}), both projections adapted, "
            f"r = {s['rank']}, p = 0, {s['dtype']} base, {s['tokens']} tokens per adapter; one training step (forward, "
            "backward, AdamW). c = concurrent (one base, n adapters, one call per layer), s = sequential (n separate "
            "single-adapter runs, each with its own base copy, one after the other). ratio = c ÷ s. tensor MiB: base + "
            "adapters + grads + AdamW states kept. peak: CPU: peak RSS of a fresh process above one running the same "
            "code on a tiny stack (s: n × one single-adapter run's process, as n separate runs); GPU: max allocated. "
            "W MiB/step once: the frozen weights' compulsory DRAM reads (bench/traffic_model.py). launches/layer: "
            "fc1's fwd+bwd; CPU: aten ops of the torch path; GPU: CUDA kernels. Definitions: bench/multi_bench.py's "
            "docstring.\n")
    body = tables(payload)
    if payload.get("traffic_recomputed"):
        body += f"\n\nNote: {payload['traffic_recomputed']}."
    errors = [f"- n={c['n']}: {c['error']}" for c in payload["cases"] if "error" in c]
    if errors:
        body += "\n\nErrors:\n" + "\n".join(errors)
    (out_dir / "multi.md").write_text(f"{head}\n{body}\n")
    return body


if __name__ == "__main__":
    raise SystemExit(main())
