"""Worker script of tests/test_distributed_accelerate.py, started by ``accelerate launch --config_file <yaml>``
(2 processes, CPU, gloo): the engine comes from the launch's config, as in a user's run. On both backends, through the
fused autograd Function (proved per rank on the first step's loss):

- ``fsdp2`` config: ``Accelerator().prepare`` on an ``inject_lora`` model and on a PEFT model made under
  ``fused_lora.peft.enable()``; ``FusedLoRATrainer`` (inject_lora) and ``Trainer`` (PEFT + enable) with no engine
  argument, so that the Trainer takes FSDP2 from the launch;
- ``deepspeed`` config (ZeRO-3, every parameter partitioned): ``Accelerator().prepare`` (inject_lora);
  ``FusedLoRATrainer`` with no engine argument (ZeRO-3 from the launch); ``Trainer(deepspeed=<dict>)`` given ZeRO-2
  (``FusedLoRATrainer``, inject_lora) and ZeRO-3 (``Trainer``, PEFT + enable) explicitly.

Each Trainer saves its model at the end and a checkpoint at step 2, from which ``FusedLoRATrainer`` resumes once per
config (PyTorch backend); every rank writes ``rank<r>.pt`` (scenario → its results) into the output folder.

    accelerate launch --config_file fsdp2.yaml tests/distributed_accelerate.py <out_dir> fsdp2

**Test-only CPU shims** (:func:`cpu_shims`): on a machine without an accelerator, accelerate 1.16 picks no
process-group backend unless told ``cpu=True`` (which switches DeepSpeed off), so each launched process would run alone;
and it enables FSDP only for GPU-type backends (``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` in its
multi-GPU branch), so a CPU launch with an FSDP config silently runs without FSDP. The shims name gloo and set the FSDP
type after accelerate's own ``__init__``, so that the scripts run unchanged and accelerate's and the Trainer's FSDP2
and DeepSpeed code paths (``fsdp2_prepare_model``, the Trainer's saving) run here. They exist for this test only; on
GPUs nothing of them is needed.
"""

from __future__ import annotations

import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # distributed_common, tiny_models

import distributed_common as dc  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}

# The launch configs (written as YAML/JSON files by the test; docs/distributed.md shows the same, checked by the test).
# FSDP2 per transformer block (the model's _no_split_modules), sharded state dicts in checkpoints (accelerate's
# default for FSDP2).
FSDP2_LAUNCH = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
    "machine_rank": 0, "mixed_precision": "no", "use_cpu": False,
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                    "fsdp_cpu_ram_efficient_loading": False, "fsdp_offload_params": False},
}
# DeepSpeed from a config file (mixed precision and the ZeRO settings then live in the file, not in the YAML).
DEEPSPEED_LAUNCH = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 2,
    "machine_rank": 0, "use_cpu": False,
    "deepspeed_config": {"deepspeed_config_file": "ds_zero3.json", "zero3_init_flag": False},
}
# ZeRO-3 with every parameter partitioned (persistence thresholds 0: otherwise small parameters stay whole), no gradient
# clipping (DeepSpeed's default clips at 1.0; the single-process run does not).
DEEPSPEED_ZERO3_FILE = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {**ZERO3, "stage3_gather_16bit_weights_on_model_save": False},
}


def cpu_shims() -> None:
    """TEST-ONLY: make accelerate 1.16 run a launched 2-process job on a CPU-only machine as it runs one on GPUs. Never
    use this for training.

    1. ``PartialState``: without an accelerator, and with ``cpu=False`` (the default; ``cpu=True`` would switch
       DeepSpeed off), accelerate finds no process-group backend for the device and runs each process alone (world
       size 1), so each rank would train on the whole batch. The shim names gloo, as a GPU machine gets nccl.
    2. ``AcceleratorState``: FSDP is enabled only for GPU-type distributed types (``__init__``'s multi-GPU branch); on
       CPU a launch with an FSDP config silently runs without it. After accelerate's own ``__init__``, a job of several
       processes given an FSDP plugin gets the FSDP type, so that accelerate's ``fsdp2_prepare_model`` and the Trainer's
       FSDP code paths run."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    partial_init = PartialState.__init__

    def partial_state_init(self, cpu: bool = False, **kwargs):
        if not cpu and kwargs.get("backend") is None and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            kwargs["backend"] = "gloo"
        partial_init(self, cpu=cpu, **kwargs)

    accelerator_init = AcceleratorState.__init__

    def accelerator_state_init(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        cpu_types = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.FSDP)  # FSDP: a later state
        if fsdp_plugin is not None and self.distributed_type in cpu_types and self.num_processes > 1:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    PartialState.__init__ = partial_state_init
    AcceleratorState.__init__ = accelerator_state_init


def fresh_accelerate_state() -> None:
    """Each scenario starts from accelerate's state as a fresh script would (the process group stays)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# --------------------------------------------------------------------------------------------------- what is checked


def rank() -> int:
    return torch.distributed.get_rank()


def sharding(model: nn.Module) -> dict:
    """How the engine holds the parameters: FSDP2 DTensors, ZeRO-3 placeholders, or whole tensors."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {"total": len(params), "dtensor": sum(isinstance(p, DTensor) for p in params),
            "zero3": sum(p.numel() == 0 and getattr(p, "ds_numel", 0) > 0 for p in params)}


def gathered_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full (rank 0; FSDP2 gathers to rank 0 only): a collective, every rank calls it."""
    from torch.distributed.tensor import DTensor

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero3 = [p for _, p in named if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3):
            return dc.ours({n: p.detach().clone() for n, p in named})
    if any(isinstance(p, DTensor) for _, p in named):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dc.ours({n: full[n].clone() for n, _ in named}) if rank() == 0 else {}
    return dc.ours({n: p.detach().clone() for n, p in named})


class Proving:
    """A Trainer mixin: the first training loss must hold the fused Function's nodes (``dc.prove_fused_function``)."""

    proof: int | None = None
    backend_name = "torch"
    where = ""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.proof is None:
            loss = result[0] if return_outputs else result
            self.proof = dc.prove_fused_function(loss, self.backend_name, dc.LORA_LAYERS, f"{self.where} rank {rank()}")
        return result


class LogRecords(logging.Handler):
    """fused_lora.hf_trainer's log records on this rank (who logs, and whether anything warns)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


# --------------------------------------------------------------------------------------------------------- scenarios


def make_model(kind: str) -> nn.Module:
    if kind == "inject":
        return dc.injected_model()
    import fused_lora.peft as flp

    with flp.enabled():
        return dc.peft_model()


def run_accelerator(backend: str, kind: str) -> dict:
    """``Accelerator().prepare(model, optimizer)`` with the launch's engine, then the same AdamW steps as the
    single-process run on this rank's half of the batch."""
    from accelerate import Accelerator

    fresh_accelerate_state()
    accelerator = Accelerator()
    model = make_model(kind)
    model, opt = accelerator.prepare(model, dc.optimizer(model))
    out = {"engine": str(accelerator.distributed_type), "sharding": sharding(accelerator.unwrap_model(model)),
           "world_size": accelerator.num_processes}
    ids, labels = dc.rank_batch(rank())
    for step in range(dc.STEPS):
        loss = model(input_ids=ids, labels=labels).loss
        if step == 0:
            out["function_nodes"] = dc.prove_fused_function(loss, backend, dc.LORA_LAYERS,
                                                            f"accelerate {kind} rank {rank()}")
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    out["params"] = gathered_trainables(accelerator.unwrap_model(model))
    return out


def run_trainer(backend: str, kind: str, out_dir: str, name: str, deepspeed: dict | None = None) -> dict:
    """``FusedLoRATrainer`` (inject_lora) or ``Trainer`` (PEFT + enable) on the global batch of 4 examples (2 per
    rank, one step per epoch: every step sees all 4, as the single-process run), checkpoint at step 2, save_model at
    the end. The engine: the launch's, or ``deepspeed`` given to TrainingArguments."""
    import transformers

    from fused_lora.hf_trainer import FusedLoRATrainer

    fresh_accelerate_state()
    model = make_model(kind)  # before the TrainingArguments: a ZeRO-3 config would make transformers build it sharded
    folder = os.path.join(out_dir, name)
    args = dc.training_arguments(folder, dc.WORLD_SIZE, deepspeed=deepspeed, save_strategy="steps", save_steps=2)
    parent = FusedLoRATrainer if kind == "inject" else transformers.Trainer
    trainer_class = type("ProvingTrainer", (Proving, parent), {"backend_name": backend, "where": name})
    trainer = trainer_class(model=model, args=args, train_dataset=dc.Examples())
    if kind == "inject":
        # The adapter is gathered parameter by parameter; the parent Trainer's way (the engine's full state dict)
        # must not be taken.
        def no_full_state_dict(*_, **__):
            raise AssertionError("FusedLoRATrainer gathered the model's full state dict")

        trainer.accelerator.get_state_dict = no_full_state_dict
    handler = LogRecords()
    trainer_logger = logging.getLogger("fused_lora.hf_trainer")
    trainer_logger.addHandler(handler)
    trainer_logger.setLevel(logging.INFO)
    try:
        trainer.train()
        out = {"engine": str(trainer.accelerator.distributed_type), "sharding": sharding(trainer.model),
               "function_nodes": trainer.proof, "world_size": trainer.args.world_size,
               "batches_per_epoch": len(trainer.get_train_dataloader())}
        if trainer.is_deepspeed_enabled:
            out["zero_stage"] = trainer.deepspeed.zero_optimization_stage()
            if out["zero_stage"] == 2:  # this rank's fp32 share of the trainable values, against all of them
                share = trainer.deepspeed.optimizer.single_partition_of_fp32_groups
                out["zero2_share"] = (sum(t.numel() for t in share),
                                      sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
        out["params"] = gathered_trainables(trainer.model)
        trainer.save_model(os.path.join(folder, "final"))
        torch.distributed.barrier()
    finally:
        trainer_logger.removeHandler(handler)
    out["folder"] = folder
    out["logs"] = handler.records
    return out


def run_resume(out_dir: str, name: str) -> dict:
    """``FusedLoRATrainer`` resumed from the step-2 checkpoint of the run ``name`` (PyTorch backend): the engine's own
    checkpoint (FSDP's sharded model and optimizer state, DeepSpeed's global_step2) restores the training state, and
    the last step ends where the uninterrupted run ended."""
    from fused_lora.hf_trainer import FusedLoRATrainer

    fresh_accelerate_state()
    model = dc.injected_model()
    args = dc.training_arguments(os.path.join(out_dir, name + "_resumed"), dc.WORLD_SIZE)
    trainer = FusedLoRATrainer(model=model, args=args, train_dataset=dc.Examples())
    trainer.train(resume_from_checkpoint=os.path.join(out_dir, name, "checkpoint-2"))
    return {"params": gathered_trainables(trainer.model), "global_step": trainer.state.global_step}


def zero_config(stage: int, gather_on_save: bool = False) -> dict:
    """What a user hands ``TrainingArguments(deepspeed=...)``: the Trainer fills the "auto" values from its arguments
    (micro batch, accumulation, gradient clipping from max_grad_norm). ``gather_on_save``: ZeRO-3's
    ``stage3_gather_16bit_weights_on_model_save``, which the Trainer needs to save a PEFT model's adapter (it gathers
    the trainable parameters into a state dict); FusedLoRATrainer saves its adapter either way."""
    zero = {**ZERO3, "stage3_gather_16bit_weights_on_model_save": gather_on_save} if stage == 3 else {"stage": stage}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero}


SCENARIOS = {
    "fsdp2": {
        "accelerator_inject": lambda b, d: run_accelerator(b, "inject"),
        "accelerator_peft": lambda b, d: run_accelerator(b, "peft"),
        "trainer_inject": lambda b, d: run_trainer(b, "inject", d, f"fsdp2_trainer_inject_{b}"),
        "trainer_peft": lambda b, d: run_trainer(b, "peft", d, f"fsdp2_trainer_peft_{b}"),
        "trainer_inject_resumed": lambda b, d: run_resume(d, f"fsdp2_trainer_inject_{b}"),
    },
    "deepspeed": {
        "accelerator_inject": lambda b, d: run_accelerator(b, "inject"),
        "trainer_inject": lambda b, d: run_trainer(b, "inject", d, f"ds_launch_trainer_inject_{b}"),
        "trainer_inject_resumed": lambda b, d: run_resume(d, f"ds_launch_trainer_inject_{b}"),
        "trainer_zero2_inject": lambda b, d: run_trainer(b, "inject", d, f"zero2_trainer_inject_{b}", zero_config(2)),
        "trainer_zero3_peft": lambda b, d: run_trainer(b, "peft", d, f"zero3_trainer_peft_{b}",
                                                      zero_config(3, gather_on_save=True)),
    },
}


def main() -> None:
    out_dir, config = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # two ranks on two cores
    cpu_shims()
    from accelerate import PartialState

    state = PartialState()  # the process group, from the launcher's environment
    assert state.num_processes == dc.WORLD_SIZE, f"accelerate sees {state.num_processes} processes"
    rank_ = torch.distributed.get_rank()
    results = {"world_size": state.num_processes}
    chosen = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SCENARIOS[config])  # a subset: for debugging
    for name in chosen:
        scenario = SCENARIOS[config][name]
        for backend in dc.BACKEND_NAMES if not name.endswith("_resumed") else ("torch",):  # checkpoint plumbing only
            start, cpu = time.perf_counter(), time.process_time()
            with dc.backend(backend):
                results[f"{name}/{backend}"] = scenario(backend, out_dir)
            print(f"rank {rank_}: {config} {name}/{backend} {time.perf_counter() - start:.1f} s "
                  f"(cpu {time.process_time() - cpu:.1f} s)", file=sys.stderr, flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank_}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
