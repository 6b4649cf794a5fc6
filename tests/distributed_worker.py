"""Worker side of tests/test_distributed.py: a tiny GPT-2 classifier injected with fused LoRA layers, trained for a
few AdamW steps under DDP or FSDP2 (``fully_shard``) on CPU with gloo. Each rank writes its trainable parameters
(full, unsharded tensors) to ``out_dir`` for the parent test to compare with a single-process run; rank 0 also
saves the FSDP2-trained adapter the way docs/distributed.md describes.

fused_lora is imported inside functions only: a spawned worker unpickles this module before ``worker`` runs, and
the backend environment (TRITON_INTERPRET, FUSED_LORA_BACKEND) must be in place before fused_lora is imported.
"""

from __future__ import annotations

import datetime
import os

import torch
from torch import nn

STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 6


def build_model(lora_dropout: float = 0.0) -> nn.Module:
    """GPT-2 (Conv1D layers) for sequence classification: LoRA on c_proj and c_fc with their biases trainable
    (bias="lora_only"), the ``score`` head trained in full (SEQ_CLS), everything else frozen. Frozen and trainable
    parameters share modules, so FSDP2 must handle both in one parameter group.

    Not c_attn: the key bias (and the key rows of lora_B) get a gradient that is zero in exact arithmetic (softmax
    ignores a per-query constant), so AdamW turns float noise into full-size steps and no two runs agree."""
    from tiny_models import build

    from fused_lora import LoRAConfig, inject_lora

    model = build("gpt2_cls")
    torch.manual_seed(0)
    config = LoRAConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["c_proj", "c_fc"],
                        bias="lora_only", task_type="SEQ_CLS", init_lora_weights=False)  # random A and B
    return inject_lora(model, config)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (GLOBAL_BATCH, SEQ), generator=g)  # no pad token (0): the last token is pooled
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    return ids, labels


def train(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """AdamW over the trainable parameters only (the frozen base never enters the optimizer)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        # Mean over this rank's examples; DDP and FSDP average gradients over ranks, so with equal shards the
        # update equals the single-process update on the whole batch.
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def single_process_result(lora_dropout: float = 0.0) -> dict[str, torch.Tensor]:
    model = build_model(lora_dropout)
    train(model, *batch())
    return trainable_state(model)


def _run_ddp(rank: int, lora_dropout: float) -> dict[str, torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(build_model(lora_dropout))
    ids, labels = (t.chunk(2)[rank] for t in batch())
    train(model, ids, labels)
    return trainable_state(model.module)


def _run_fsdp2(rank: int, out_dir: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fused_lora import save_adapter

    model = build_model()
    mesh = init_device_mesh("cpu", (2,))
    for block in model.transformer.h:  # one FSDP unit per transformer block, then the root for the rest
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "fully_shard did not shard"
    ids, labels = (t.chunk(2)[rank] for t in batch())
    train(model, ids, labels)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Saving an adapter from a sharded model (docs/distributed.md): every rank joins the gather; rank 0 loads the
    # full state into an unsharded copy of the injected model and saves the adapter from there.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = build_model()
        plain.load_state_dict(full)
        save_adapter(plain, os.path.join(out_dir, "fsdp2_adapter"))
        return {n: t.clone() for n, t in full.items() if n in trainable}
    return {}  # cpu_offload=True gathers on rank 0 only


def worker(rank: int, port: int, out_dir: str, env: dict[str, str], timeout_s: float) -> None:
    """Entry point for ``torch.multiprocessing``: runs DDP (dropout off and on) and FSDP2 in one process group,
    so the two-process start-up is paid once."""
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    # A short timeout: a collective that never completes fails the test instead of hanging CI.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        results = {
            "ddp": _run_ddp(rank, lora_dropout=0.0),
            "ddp_dropout": _run_ddp(rank, lora_dropout=0.1),
            "fsdp2": _run_fsdp2(rank, out_dir),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank that exits while its peer's last collective is still
        # in flight can abort in gloo's threads ("terminate called without an active exception", seen once in a
        # full-suite run on 2 busy cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()
