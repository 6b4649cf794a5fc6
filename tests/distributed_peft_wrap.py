"""What PEFT's own FSDP wrapping costs with fused_lora.peft (docs/distributed.md, "PEFT's FSDP wrapping"): a
measurement, not a test. Run it by hand:

    python tests/distributed_peft_wrap.py [--steps 30] [--hidden 256] [--layers 4] [--seq 128] [--batch 8]

Two processes (gloo, CPU, one thread each) train a GPT-2 classifier made by PEFT under ``fused_lora.peft.enable()``
(LoRA r=16 on c_attn, c_proj, c_fc) with FSDP2, in four ways, and report the median step time, the collectives per
step and the largest difference of the trained adapters from the per-block fused run:

- ``block_fused``: one unit per block + accelerate's layout (what accelerate's FSDP2 preparation does): fused;
- ``block_peft``: the same wrapping, plain PEFT (``fused_lora.peft`` off): the unfused computation, for comparison;
- ``peft_policy_fallback``: PEFT's ``fsdp_auto_wrap_policy`` applied with ``fully_shard`` (lora_A and lora_B units
  of their own, then blocks, then the root): fused_lora.peft falls back to PEFT's forward (what it does today);
- ``peft_policy_gathered``: the same wrapping, served fused by a prototype kept here (not in the package): the fused
  call runs inside registered FSDP forward methods of lora_A and lora_B (``register_fsdp_forward_method``), so FSDP2
  gathers those units for the call, reshards them after it, gathers them again for its backward and reduce-scatters
  their gradients.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed_common as dc  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

WAYS = ("block_fused", "block_peft", "peft_policy_fallback", "peft_policy_gathered")


def build(args, fused: bool) -> nn.Module:
    import peft
    import transformers
    from tiny_models import gpt2_config

    import fused_lora.peft as flp

    torch.manual_seed(0)
    base = transformers.GPT2ForSequenceClassification(gpt2_config(n_embd=args.hidden, n_layer=args.layers, n_head=4,
                                                                  n_positions=args.seq, num_labels=2))
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             task_type="SEQ_CLS", init_lora_weights=False)
    torch.manual_seed(1)
    if fused:
        with flp.enabled():
            return peft.get_peft_model(base, config)
    return peft.get_peft_model(base, config)


def peft_policy_wrap(model: nn.Module, mesh) -> None:
    """peft.utils.other.fsdp_auto_wrap_policy's choice of units (FSDP1's policy), applied bottom-up with FSDP2's
    fully_shard: every leaf module with a trainable weight (lora_A, lora_B, the head's trained copy), every block."""
    from torch.distributed.fsdp import fully_shard
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    def leaf_trainable(m):
        return not list(m.children()) and getattr(m, "weight", None) is not None and m.weight.requires_grad

    for module in reversed(list(model.modules())):  # children before their parents
        if module is not model and (leaf_trainable(module) or isinstance(module, GPT2Block)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def serve_gathered(model: nn.Module) -> None:
    """The prototype of ``peft_policy_gathered``: each LoRA layer whose lora_A/lora_B are FSDP2 units computes the fused
    call inside their registered forward methods (lora_B's method calls lora_A's, which calls the fused Function)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    import fused_lora.peft as flp
    from fused_lora.functional import fused_lora_linear

    def enter(self, x, run):  # lora_B's method: its parameters gathered around run(x)
        return run(x)

    def fused(self, x, run):  # lora_A's method
        return run(x)

    for layer in model.modules():
        if not isinstance(layer, flp.FusedLinear):
            continue
        lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
        assert isinstance(lora_A, FSDPModule) and isinstance(lora_B, FSDPModule)
        lora_A.fused_in_unit = fused.__get__(lora_A)
        lora_B.fused_in_unit = enter.__get__(lora_B)
        register_fsdp_forward_method(lora_A, "fused_in_unit")
        register_fsdp_forward_method(lora_B, "fused_in_unit")

        def forward(x, *args, layer=layer, lora_A=lora_A, lora_B=lora_B, **kwargs):
            base = layer.get_base_layer()
            scaling = float(layer.scaling["default"])

            def run(x):
                return fused_lora_linear(x, base.weight, base.bias, lora_A.weight, lora_B.weight, scaling, 0.0,
                                         layer.training, "conv1d")

            return lora_B.fused_in_unit(x, lambda x: lora_A.fused_in_unit(x, run))

        layer.forward = forward


class Collectives:
    """Counts the collectives FSDP2 issues (all-gathers and reduce-scatters) on this rank."""

    def __init__(self) -> None:
        self.count = 0
        for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
            original = getattr(dist, name)

            def counted(*a, _original=original, **k):
                self.count += 1
                return _original(*a, **k)

            setattr(dist, name, counted)


def run_way(way: str, args, rank: int, collectives: Collectives) -> dict:
    import distributed_worker as dw
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dc.WORLD_SIZE,))
    model = build(args, fused=way != "block_peft")
    if way.startswith("block"):
        dw.accelerate_fsdp2_layout(model, mesh)
    else:
        peft_policy_wrap(model, mesh)
        if way == "peft_policy_gathered":
            serve_gathered(model)
    g = torch.Generator().manual_seed(2 + rank)
    ids = torch.randint(1, 64, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, function_nodes = [], None
    for step in range(args.warmup + args.steps):
        dist.barrier()
        before, start = collectives.count, time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        if function_nodes is None:
            function_nodes = sum(type(n).__name__ in dc.FUNCTION_NODES for n in _graph(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            per_step = collectives.count - before
    from distributed_accelerate import gathered_trainables

    return {"median_ms": 1e3 * statistics.median(times), "collectives": per_step, "function_nodes": function_nodes,
            "params": gathered_trainables(model)}


def _graph(loss):
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


def worker(rank: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FUSED_LORA_BACKEND="torch", FUSED_LORA_NATIVE="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=dc.WORLD_SIZE, timeout=datetime.timedelta(seconds=300))
    import warnings

    warnings.simplefilter("ignore")
    collectives = Collectives()
    results = {way: run_way(way, args, rank, collectives) for way in WAYS}
    if rank == 0:
        reference = results["block_fused"]["params"]
        print(f"GPT-2 classifier n_embd={args.hidden} n_layer={args.layers}, LoRA r=16 on c_attn/c_proj/c_fc "
              f"({4 * args.layers} layers), batch {args.batch}x{args.seq} per rank, 2 ranks (gloo, CPU, 1 thread "
              f"each), {args.steps} steps after {args.warmup}; torch {torch.__version__}")
        print(f"{'way':<22} {'median step ms':>15} {'collectives/step':>17} {'Function nodes':>15} "
              f"{'max |Δ| vs block':>17}")
        for way, r in results.items():
            print(f"{way:<22} {r['median_ms']:>15.1f} {r['collectives']:>17} {r['function_nodes']:>15} "
                  f"{dc.max_difference(r['params'], reference):>17.2e}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mp.start_processes(worker, args=(dc.free_port(), args), nprocs=dc.WORLD_SIZE, start_method="spawn")


if __name__ == "__main__":
    main()
