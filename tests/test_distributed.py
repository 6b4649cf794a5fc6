"""DDP and FSDP2 with fused LoRA layers on CPU (gloo, 2 processes): after a few AdamW steps on the same data the
trainable parameters equal a single-process run's. The workers live in tests/distributed_worker.py."""

from __future__ import annotations

import os
import socket
import time

import distributed_worker as dw
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 30
TOTAL_TIMEOUT_S = 120  # start-up of two fresh interpreters dominates: ~10-20 s on 2 busy cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Runs the two workers once for all the tests of this file; fails fast on a crash or a hang."""
    out_dir = str(tmp_path_factory.mktemp("dist"))
    # The workers are fresh interpreters (spawn): hand them the backend choice conftest.py made.
    env = {k: os.environ[k] for k in ("TRITON_INTERPRET", "FUSED_LORA_BACKEND") if k in os.environ}
    ctx = mp.start_processes(dw.worker, args=(_free_port(), out_dir, env, COLLECTIVE_TIMEOUT_S),
                             nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TOTAL_TIMEOUT_S} s")
    finally:
        for process in ctx.processes:  # only ours; a no-op for those that exited
            if process.is_alive():
                process.kill()
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]
    for r in results:
        r["out_dir"] = out_dir
    return results


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    return dw.single_process_result()


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), f"{what}: trainable parameters {sorted(got)} != {sorted(want)}"
    for name, tensor in want.items():
        # fp32; only the order of the gradient sums differs (all-reduce of two half-batch means).
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{what} {n}: {m}")


def test_trainable_set_is_lora_bias_and_head(single):
    names = sorted(single)
    assert names[:4] == ["score.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.0.attn.c_proj.lora_A",
                         "transformer.h.0.attn.c_proj.lora_B"], names
    assert len(names) == 1 + 2 * 3 * 3  # score + 2 blocks × (attn.c_proj, mlp.c_fc, mlp.c_proj) × (bias, A, B)
    start = dict(dw.build_model().named_parameters())
    assert all(not torch.equal(t, start[n]) for n, t in single.items()), "training did not move every parameter"


def test_ddp_matches_single_process(rank_results, single):
    for rank, results in enumerate(rank_results):
        _assert_close(results["ddp"], single, f"ddp rank {rank}")


def test_fsdp2_matches_single_process_and_saves_an_adapter(rank_results, single, tmp_path_factory):
    _assert_close(rank_results[0]["fsdp2"], single, "fsdp2 (gathered on rank 0)")
    from tiny_models import build

    from fused_lora import load_adapter

    out_dir = rank_results[0]["out_dir"]
    restored = dict(load_adapter(build("gpt2_cls"), os.path.join(out_dir, "fsdp2_adapter")).named_parameters())
    _assert_close({n: restored[n].detach() for n in single}, single, "adapter saved from FSDP2")


def test_ddp_with_dropout_keeps_ranks_in_sync(rank_results):
    # Each rank regenerates its dropout masks from the seed in backward; DDP must still keep the replicas
    # identical, and training must move the adapters.
    r0, r1 = (r["ddp_dropout"] for r in rank_results)
    _assert_close(r1, r0, "ddp_dropout rank 1 vs rank 0")
    name = "transformer.h.0.attn.c_proj.lora_A"
    assert not torch.equal(r0[name], dict(dw.build_model(lora_dropout=0.1).named_parameters())[name])
