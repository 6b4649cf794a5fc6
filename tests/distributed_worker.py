"""Worker script of tests/test_distributed.py, started by ``torchrun --nproc_per_node 2`` (gloo, CPU): two processes
train the tiny GPT-2 classifier of tests/distributed_common.py under each engine, on each backend, through the fused
autograd Function (proved per rank on the first step's loss):

- DDP with ``inject_lora``; the adapter saved with ``save_adapter`` from the DDP wrapper, every rank calling it;
- FSDP2 (``fully_shard``) per block + root with ``inject_lora``; the adapter saved with ``save_adapter`` straight from
  the sharded model;
- DeepSpeed ZeRO-2 and ZeRO-3 (``deepspeed.initialize``; ZeRO-3 with every parameter partitioned) with ``inject_lora``
  and with ``fused_lora.peft.enable()``; the adapter saved with ``save_adapter`` straight from the engine;
- FSDP2 with PEFT QLoRA, the 4-bit weights sharded, for every ``bnb_4bit_quant_storage``: fused, after an eval-mode
  forward under FSDP2 that must not repack the weights, and plain PEFT under the same sharding;
- PEFT's own FSDP wrapping (lora_A/lora_B units): PEFT's forward, the reason named once;
- ``FusedLoRATrainer`` with DDP (the Trainer under torchrun), saving its adapter.

Each rank writes ``rank<r>.pt`` (scenario → its results) for the parent test. One process group for all of it, so that
the start-up of two interpreters is paid once.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # distributed_common, tiny_models

import distributed_common as dc  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

# ZeRO-3 partitions tiny parameters only without persistence thresholds: otherwise every parameter of a test model
# stays whole on every rank and the test proves nothing about partitioning.
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}


def deepspeed_config(stage: int) -> dict:
    # gradient_clipping: DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the single process does not.
    return {"train_micro_batch_size_per_gpu": dc.GLOBAL_BATCH // dc.WORLD_SIZE, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": ZERO3 if stage == 3 else {"stage": stage},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _prover(rank: int, backend: str, where: str, out: dict, layers: int = dc.LORA_LAYERS):
    def prove(loss: torch.Tensor) -> None:
        out["function_nodes"] = dc.prove_fused_function(loss, backend, layers, f"{where} rank {rank}")
    return prove


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _full_trainables_fsdp(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable parameters of an FSDP2 model on rank 0 (empty on the others), gathered by torch's own
    state-dict API: a collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = _trainable_names(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dc.ours({n: t.clone() for n, t in full.items() if n in names})


def run_ddp(rank: int, backend: str, out_dir: str | None = None, lora_dropout: float = 0.0) -> dict:
    from fused_lora import save_adapter

    out: dict = {}
    model = nn.parallel.DistributedDataParallel(dc.injected_model(lora_dropout))
    dc.train(model, *dc.rank_batch(rank), prove=_prover(rank, backend, "ddp", out))
    out["params"] = dc.trainable_state(model.module)
    if out_dir is not None:  # the DDP wrapper as it is, every rank calling: rank 0 writes
        out["adapter_dir"] = os.path.join(out_dir, f"ddp_{backend}")
        save_adapter(model, out["adapter_dir"])
    return out


def _check_fsdp2_sharded(model: nn.Module) -> int:
    """Every parameter a DTensor sharded on dim 0 (the frozen base included); returns how many."""
    from torch.distributed.tensor import DTensor, Shard

    params = list(model.parameters())
    bad = [n for n, p in model.named_parameters() if not (isinstance(p, DTensor) and p.placements == (Shard(0),))]
    assert not bad, f"fully_shard left parameters unsharded: {bad[:5]}"
    return len(params)


def run_fsdp2_blocks(rank: int, backend: str, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fused_lora import save_adapter

    out: dict = {}
    model = dc.injected_model()
    mesh = init_device_mesh("cpu", (dc.WORLD_SIZE,))
    for block in model.transformer.h:  # one FSDP unit per transformer block, then the root for the rest
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out["sharded"] = _check_fsdp2_sharded(model)
    dc.train(model, *dc.rank_batch(rank), prove=_prover(rank, backend, "fsdp2 per block", out))
    out["params"] = _full_trainables_fsdp(model)  # every rank joins the gather; rank 0 gets the tensors
    # Straight from the sharded model, on every rank: only the adapter's tensors are gathered, rank 0 writes.
    out["adapter_dir"] = os.path.join(out_dir, f"fsdp2_blocks_{backend}")
    save_adapter(model, out["adapter_dir"])
    return out


def accelerate_fsdp2_layout(model: nn.Module, mesh) -> None:
    """``fully_shard`` as accelerate 1.16's FSDP2 preparation does it (accelerate.utils.fsdp_utils.fsdp2_prepare_model
    with the transformer-layer policy): each block (the model's ``_no_split_modules``), the input embeddings, the
    final norm as a tail unit kept unsharded after forward, then the root."""
    from torch.distributed.fsdp import fully_shard

    gpt2 = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in gpt2.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(gpt2.get_input_embeddings(), mesh=mesh)
    fully_shard([gpt2.transformer.ln_f], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


def run_fsdp2_peft_policy(rank: int) -> dict:
    """PEFT's own FSDP wrapping (peft.utils.other.fsdp_auto_wrap_policy's units, with fully_shard: lora_A and lora_B
    units of their own): fused_lora.peft keeps PEFT's forward, says why once, and trains right."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    import fused_lora.peft as flp

    with flp.enabled():
        model = dc.peft_model()
    mesh = init_device_mesh("cpu", (dc.WORLD_SIZE,))
    for module in reversed(list(model.modules())):  # children first, as the FSDP1 policy wraps them
        leaf = not list(module.children()) and getattr(module, "weight", None) is not None
        if module is not model and ((leaf and module.weight.requires_grad) or isinstance(module, GPT2Block)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    flp._reported.clear()  # a reason is reported once per process
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dc.train(model, *dc.rank_batch(rank))
    out["warnings"] = [str(w.message) for w in caught if "fused_lora.peft" in str(w.message)]
    out["params"] = _full_trainables_fsdp(model)
    return out


def run_fsdp2_qlora(rank: int, backend: str, storage: str, fused: bool, base_path: str, inject: bool = False,
                    out_dir: str | None = None) -> dict:
    """PEFT QLoRA with the 4-bit weights sharded by fully_shard (per decoder layer + root), fused
    (``fused_lora.peft.enable()``) or plain PEFT. The fused model first runs an eval-mode forward without gradients
    under FSDP2, as ``from_pretrained`` leaves it: the forward after which bitsandbytes would repack its weights for its
    CPU inference kernel (on a CPU with AVX512-BF16); it must not (the layers' flag is off, no state says repacked), and
    training afterwards must equal plain PEFT trained under the same sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fused_lora.peft as flp
    from fused_lora import save_adapter
    from fused_lora.backends.bnb4_triton import quant_state_of
    from fused_lora.bases import bnb4

    out: dict = {}
    if inject:  # fused_lora's own layers (inject_lora), the same start
        model = dc.qlora_injected(base_path, storage)
    elif fused:
        with flp.enabled():
            model = dc.qlora_model(base_path, storage)
    else:
        model = dc.qlora_model(base_path, storage).train()  # plain PEFT: train mode before anything runs
    mesh = init_device_mesh("cpu", (dc.WORLD_SIZE,))
    base_model = model if inject else model.get_base_model()
    for layer in base_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    four_bit = [m for m in model.modules() if bnb4.detect(m)]
    assert four_bit and all(isinstance(m.weight, DTensor) for m in four_bit), "the 4-bit weights are not sharded"
    out["sharded_4bit"] = len(four_bit)
    ids, labels = dc.rank_batch(rank)
    # The optimizer first: FSDP2's root unit keeps its parameters unsharded after a forward without backward, so
    # model.parameters() would hand an optimizer made after the eval forward the root's unsharded tensors.
    opt = dc.optimizer(model)
    if fused:
        assert not base_model.training  # as from_pretrained left it
        with torch.no_grad():
            model(input_ids=ids)
        out["repacked"] = [m for m in four_bit if getattr(quant_state_of(m), "packing_format_for_cpu", False)
                           or getattr(m, "support_avx512bf16_for_cpu", False)]
        model.train()
    dc.train(model, ids, labels, prove=_prover(rank, backend, f"fsdp2 qlora {storage}", out, dc.QLORA_LAYERS)
             if fused else None, opt=opt)
    out["params"] = _full_trainables_fsdp(model)
    if inject:  # straight from the sharded 4-bit model
        out["adapter_dir"] = os.path.join(out_dir, f"qlora_inject_{storage}")
        save_adapter(model, out["adapter_dir"])
    return out


def run_deepspeed(rank: int, backend: str, stage: int, kind: str, out_dir: str) -> dict:
    import deepspeed

    import fused_lora.peft as flp
    from fused_lora import save_adapter

    out: dict = {}
    if kind == "peft":
        with flp.enabled():
            model = dc.peft_model()
    else:
        model = dc.injected_model()
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=dc.optimizer(model),
                                             config=deepspeed_config(stage))
    params = list(model.parameters())
    if stage == 3 and kind == "peft":
        # A LoRA layer called on its own before any forward of the model: nothing gathered its base layer's and
        # adapters' parameters for it, so it takes PEFT's forward (whose modules gather their own), and says why.
        import warnings

        flp._reported.clear()
        layer = model.get_base_model().transformer.h[0].mlp.c_fc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(torch.randn(1, 3, layer.in_features))
        out["alone"] = (tuple(y.shape), [str(w.message) for w in caught if "fused_lora.peft" in str(w.message)])
    if stage == 3:  # every parameter, frozen or not, an empty placeholder outside its module's forward
        partitioned = [p for p in params if p.numel() == 0 and p.ds_numel > 0]
        assert len(partitioned) == len(params), f"ZeRO-3 partitioned {len(partitioned)} of {len(params)} parameters"
        out["partitioned"] = len(partitioned)
    else:  # ZeRO-2: the optimizer's fp32 partition is this rank's share of the trainable parameters
        share = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
        total = sum(p.numel() for p in params if p.requires_grad)
        assert share < total, f"ZeRO-2 keeps {share} of {total} trainable values on one rank: not partitioned"
        out["partitioned"] = (share, total)
    ids, labels = dc.rank_batch(rank)
    prove = _prover(rank, backend, f"deepspeed zero-{stage} {kind}", out)
    for step in range(dc.STEPS):
        loss = engine(input_ids=ids, labels=labels).loss
        if step == 0:
            prove(loss)
        engine.backward(loss)
        engine.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, enabled=stage == 3):
        out["params"] = dc.trainable_state(model)
    if kind == "inject":
        out["adapter_dir"] = os.path.join(out_dir, f"zero{stage}_{backend}")
        save_adapter(engine, out["adapter_dir"])  # the engine as it is, every rank; ZeRO-3 gathers the adapter only
    engine.destroy()
    return out


def run_trainer_ddp(rank: int, backend: str, out_dir: str) -> dict:
    """FusedLoRATrainer under torchrun: the Trainer wraps the model in DDP (CPU: use_cpu=True, gloo), save_model writes
    the adapter from the main process. Last in the group: it leaves accelerate's process-wide state behind."""
    from accelerate.state import AcceleratorState

    from fused_lora.hf_trainer import FusedLoRATrainer

    AcceleratorState._reset_state(reset_partial_state=True)
    model = dc.injected_model()
    folder = os.path.join(out_dir, f"trainer_ddp_{backend}")
    args = dc.training_arguments(folder, dc.WORLD_SIZE, use_cpu=True, ddp_backend="gloo")
    out: dict = {}

    class ProvingTrainer(FusedLoRATrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if "function_nodes" not in out:
                _prover(rank, backend, "trainer ddp", out)(loss)
            return loss

    trainer = ProvingTrainer(model=model, args=args, train_dataset=dc.Examples())
    trainer.train()
    out["wrapper"] = type(trainer.model_wrapped).__name__
    out["params"] = dc.trainable_state(model)
    trainer.save_model(os.path.join(folder, "final"))
    out["adapter_dir"] = os.path.join(folder, "final")
    return out


def run_qlora(rank: int, backend: str, out_dir: str) -> dict:
    """Every quant storage fused (the Triton backend: dc.TRITON_QLORA_STORAGES); plain PEFT once per storage and
    inject_lora once (bf16 storage), on the PyTorch backend's turn."""
    base_path = os.path.join(out_dir, "llama_base")
    storages = dc.QLORA_STORAGES if backend == "torch" else dc.TRITON_QLORA_STORAGES
    results = {f"fused/{storage}": run_fsdp2_qlora(rank, backend, storage, True, base_path) for storage in storages}
    if backend == "torch":
        results.update({f"plain/{storage}": run_fsdp2_qlora(rank, backend, storage, False, base_path)
                        for storage in dc.QLORA_STORAGES})
        # inject_lora's layers: the same Function and 4-bit code; once, on the storage accelerate would shard
        results["inject/bfloat16"] = run_fsdp2_qlora(rank, backend, "bfloat16", True, base_path, inject=True,
                                                     out_dir=out_dir)
    return results


SCENARIOS = {
    "ddp": run_ddp,
    "fsdp2_blocks": run_fsdp2_blocks,
    **{f"zero{stage}_{kind}": (lambda rank, backend, out_dir, s=stage, k=kind: run_deepspeed(rank, backend, s, k,
                                                                                             out_dir))
       for stage in (2, 3) for kind in ("inject", "peft")},
    "fsdp2_qlora": run_qlora,
    "trainer_ddp": run_trainer_ddp,
}


def worker(rank: int, out_dir: str, timeout_s: float, scenarios: list[str]) -> None:
    """Every scenario on both backends in one process group (the environment torchrun sets)."""
    # A short timeout: a collective that never completes fails the test instead of hanging CI.
    dist.init_process_group("gloo", rank=rank, world_size=dc.WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results: dict = {}
    try:
        if any(s.startswith("zero") for s in scenarios):
            import deepspeed

            deepspeed.init_distributed("gloo")  # takes the process group above (builds its CPU op once: cached)
        for name in scenarios:
            for backend in dc.BACKEND_NAMES:
                start, cpu = time.perf_counter(), time.process_time()
                with dc.backend(backend):
                    results[f"{name}/{backend}"] = SCENARIOS[name](rank, backend, out_dir)
                print(f"rank {rank}: {name}/{backend} {time.perf_counter() - start:.1f} s "
                      f"(cpu {time.process_time() - cpu:.1f} s)", file=sys.stderr, flush=True)
        with dc.backend("torch"):  # p > 0: each rank regenerates its masks from the seed in backward
            results["ddp_dropout"] = run_ddp(rank, "torch", lora_dropout=0.1)
            results["fsdp2_peft_policy"] = run_fsdp2_peft_policy(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank that exits while its peer's last collective is still
        # in flight can abort in gloo's threads ("terminate called without an active exception", seen once in a
        # full-suite run on 2 busy cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    """``torchrun --nproc_per_node 2 tests/distributed_worker.py <out_dir> <collective timeout s> [scenario,...]``"""
    out_dir, timeout_s = sys.argv[1], float(sys.argv[2])
    scenarios = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SCENARIOS)
    torch.set_num_threads(1)  # two ranks on two cores
    worker(int(os.environ["RANK"]), out_dir, timeout_s, scenarios)


if __name__ == "__main__":
    main()
