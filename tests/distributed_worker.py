"""Worker side of tests/test_distributed.py: a tiny model with fused LoRA layers, trained for a few AdamW steps
under DDP or FSDP2 (``fully_shard``) on CPU with gloo. Each rank writes its trainable parameters (full, unsharded
tensors) to ``out_dir`` for the parent test to compare with a single-process run.

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
GLOBAL_BATCH, SEQ, VOCAB, WIDTH = 4, 5, 32, 16


def build_model(lora_dropout: float = 0.0) -> nn.Module:
    """Frozen embedding → LoRA on nn.Linear (trainable bias, like bias="lora_only") → GELU → LoRA on a GPT-2
    Conv1D → a fully trainable head (like modules_to_save). Frozen and trainable parameters share modules, so
    FSDP2 must handle both in one parameter group."""
    from transformers.pytorch_utils import Conv1D

    from fused_lora import LoRALinear

    torch.manual_seed(0)
    embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
    up = LoRALinear.from_linear(nn.Linear(WIDTH, 2 * WIDTH), r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                init_lora_weights=False)  # random A and B: every gradient is non-zero
    up.bias.requires_grad_(True)
    down = LoRALinear.from_linear(Conv1D(WIDTH, 2 * WIDTH), r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                  init_lora_weights=False)
    head = nn.Linear(WIDTH, VOCAB)
    return nn.Sequential(embed, up, nn.GELU(), down, head)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, labels


def train(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """AdamW over the trainable parameters only (the frozen base never enters the optimizer)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        # Mean over this rank's tokens; DDP and FSDP average gradients over ranks, so with equal shards the
        # update equals the single-process update on the whole batch.
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def single_process_result(lora_dropout: float = 0.0) -> dict[str, torch.Tensor]:
    model = build_model(lora_dropout)
    train(model, *batch())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run_ddp(rank: int, lora_dropout: float) -> dict[str, torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(build_model(lora_dropout))
    ids, labels = (t.chunk(2)[rank] for t in batch())
    train(model, ids, labels)
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run_fsdp2(rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fused_lora import LoRALinear

    model = build_model()
    mesh = init_device_mesh("cpu", (2,))
    # One FSDP unit per LoRA layer (as one would wrap transformer blocks), then the root for the rest.
    for module in model:
        if isinstance(module, LoRALinear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "fully_shard did not shard"
    ids, labels = (t.chunk(2)[rank] for t in batch())
    train(model, ids, labels)
    # The documented way to get unsharded weights out of an FSDP2 model (e.g. to save an adapter).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.clone() for n, t in full.items() if n in trainable}


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
            "fsdp2": _run_fsdp2(rank),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
