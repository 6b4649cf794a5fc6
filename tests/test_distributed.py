"""DDP, FSDP2 and DeepSpeed ZeRO-2/3 with fused LoRA layers on CPU (gloo, 2 processes started by torchrun):
after a few AdamW steps the trainable parameters equal a single-process run on the whole batch, on the PyTorch backend
(native shortcut off) and on the Triton kernels (interpreter), each rank having run the fused autograd Function; the
adapters saved straight from the sharded (FSDP2) and partitioned (ZeRO-3) models load into a fresh base, with
``load_adapter`` and with PEFT, equal to the trained ones. The workers live in tests/distributed_worker.py.

The first run builds DeepSpeed's CPU communication op with g++ (~40-55 s) into the folder
``distributed_common.torch_extensions_dir()`` names; later runs find it there."""

from __future__ import annotations

import os
import sys

import distributed_common as dc
import distributed_worker as dw
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]

COLLECTIVE_TIMEOUT_S = 180  # a cold DeepSpeed op build (one rank builds, the other waits on its lock) stays under it
TOTAL_TIMEOUT_S = 600
SCENARIOS = list(dw.SCENARIOS)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """``torchrun --nproc_per_node 2 tests/distributed_worker.py`` once for all the tests of this file; fails fast on
    a crash or a hang."""
    out_dir = str(tmp_path_factory.mktemp("dist"))
    dc.save_llama_base(os.path.join(out_dir, "llama_base"))  # the QLoRA runs load it in 4 bits
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dc.WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(dc.free_port()), dw.__file__, out_dir,
               str(COLLECTIVE_TIMEOUT_S), ",".join(SCENARIOS)]
    dc.launch(command, TOTAL_TIMEOUT_S, "torchrun")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(dc.WORLD_SIZE)]


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    """One process, native autograd ops."""
    return dc.reference()


@pytest.fixture(scope="module")
def single_fn() -> dict[str, dict[str, torch.Tensor]]:
    """One process, the fused Function, per backend."""
    runs = {}
    for backend in dc.BACKEND_NAMES:
        with dc.backend(backend):
            runs[backend] = dc.reference()
    return runs


def _compare(got, single, single_fn, backend: str, what: str) -> None:
    """Against one process on the same backend (tight: only the order of the gradient sums differs) and against the
    native ops (loose: another computation)."""
    same = dc.assert_same_training(got, single_fn[backend], f"{what} vs one process ({backend})", tight=True)
    native = dc.assert_same_training(got, single, f"{what} vs one process (native ops)")
    print(f"{what}: max |Δ| {same:.2g} vs one process on {backend}, {native:.2g} vs native ops")


@pytest.fixture(scope="module")
def single_trainer(tmp_path_factory) -> dict[str, torch.Tensor]:
    return dc.trainer_reference(str(tmp_path_factory.mktemp("trainer_reference")))


def test_reference_trains_every_parameter(single):
    names = sorted(single)
    assert names[:4] == ["score.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.0.attn.c_proj.lora_A",
                         "transformer.h.0.attn.c_proj.lora_B"], names
    assert len(names) == 1 + 3 * dc.LORA_LAYERS  # score + (bias, A, B) per LoRA layer
    start = dict(dc.injected_model().named_parameters())
    assert all(not torch.equal(t, start[n]) for n, t in single.items()), "training did not move every parameter"


def _check_ran_function(rank_results, key: str) -> None:
    for rank, results in enumerate(rank_results):
        nodes = results[key]["function_nodes"]
        assert nodes >= dc.LORA_LAYERS, f"{key} rank {rank}: {nodes} Function nodes"


@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_ddp_matches_single_process(rank_results, single, single_fn, backend):
    key = f"ddp/{backend}"
    _check_ran_function(rank_results, key)
    for rank, results in enumerate(rank_results):  # DDP keeps whole replicas: both ranks
        _compare(results[key]["params"], single, single_fn, backend, f"{key} rank {rank}")


@pytest.mark.parametrize("scenario", ["fsdp2_blocks", "zero2_inject", "zero3_inject", "zero2_peft", "zero3_peft"])
@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_sharded_engine_matches_single_process(rank_results, single, single_fn, scenario, backend):
    key = f"{scenario}/{backend}"
    _check_ran_function(rank_results, key)
    r0, r1 = (r[key] for r in rank_results)
    assert r0["sharded" if scenario.startswith("fsdp2") else "partitioned"], r0
    _compare(r0["params"], single, single_fn, backend, f"{key} (gathered)")
    if scenario.startswith("zero"):  # ZeRO-3 gathered on every rank, ZeRO-2 keeps whole parameters: both ranks agree
        dc.assert_same_training(r1["params"], single_fn[backend], f"{key} rank 1", tight=True)


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2_blocks", "zero2_inject", "zero3_inject", "trainer_ddp"])
@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_adapter_saved_from_the_engine_loads_into_a_fresh_base(rank_results, scenario, backend):
    """save_adapter straight from the engine's model (the DDP wrapper, the sharded FSDP2 model, the DeepSpeed engine;
    every rank called it, rank 0 wrote): the file restores exactly the trained parameters, through load_adapter and
    through PEFT."""
    from peft import PeftModel
    from tiny_models import build

    from fused_lora import load_adapter

    trained = rank_results[0][f"{scenario}/{backend}"]["params"]
    folder = rank_results[0][f"{scenario}/{backend}"]["adapter_dir"]
    files = sorted(f for f in os.listdir(folder) if f != "training_args.bin")  # the Trainer adds its arguments
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    restored = dict(load_adapter(build("gpt2_cls"), folder).named_parameters())
    peft_restored = dc.ours(dict(PeftModel.from_pretrained(build("gpt2_cls"), folder).named_parameters()))
    for name, tensor in trained.items():
        assert torch.equal(restored[name], tensor), f"load_adapter: {name}"
        assert torch.equal(peft_restored[name], tensor), f"PeftModel.from_pretrained: {name}"


@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_trainer_ddp_matches_single_process(rank_results, single_trainer, single_fn, backend):
    key = f"trainer_ddp/{backend}"
    _check_ran_function(rank_results, key)
    for rank, results in enumerate(rank_results):
        assert results[key]["wrapper"] == "DistributedDataParallel", results[key]["wrapper"]
        _compare(results[key]["params"], single_trainer, single_fn, backend, f"{key} rank {rank}")


def test_ddp_with_dropout_keeps_ranks_in_sync(rank_results):
    # Each rank regenerates its dropout masks from the seed in backward; DDP must still keep the replicas
    # identical, and training must move the adapters.
    r0, r1 = (r["ddp_dropout"]["params"] for r in rank_results)
    dc.assert_same_training(r1, r0, "ddp_dropout rank 1 vs rank 0")
    name = "transformer.h.0.attn.c_proj.lora_A"
    assert not torch.equal(r0[name], dict(dc.injected_model(lora_dropout=0.1).named_parameters())[name])


def test_peft_fsdp_wrapping_keeps_peft_forward_and_says_why(rank_results, single):
    """lora_A/lora_B as FSDP units of their own (PEFT's fsdp_auto_wrap_policy): PEFT's forward, one warning naming the
    cause and the remedy, and the same training as a single process."""
    r0 = rank_results[0]["fsdp2_peft_policy"]
    assert len(r0["warnings"]) == 1 and "FSDP units of their own" in r0["warnings"][0], r0["warnings"]
    assert "wrap per transformer block" in r0["warnings"][0]
    dc.assert_same_training(r0["params"], single, "PEFT's FSDP wrapping")


@pytest.fixture(scope="module")
def single_qlora(rank_results, tmp_path_factory) -> dict[str, torch.Tensor]:
    path = str(tmp_path_factory.mktemp("llama"))
    dc.save_llama_base(path)
    return dc.qlora_reference(path)


@pytest.mark.parametrize(("backend", "storage"), [("torch", s) for s in dc.QLORA_STORAGES]
                         + [("triton", s) for s in dc.TRITON_QLORA_STORAGES])
def test_fsdp2_qlora_sharded_4bit_fused_equals_plain_peft(rank_results, single_qlora, backend, storage):
    """FSDP2 with the 4-bit weights sharded (fully_shard turns each Params4bit into a DTensor, at forward time a plain
    tensor without quant_state): every LoRA layer runs the fused Function on both ranks, an eval-mode forward under
    FSDP2 repacks nothing, and training equals plain PEFT under the same sharding and in one process."""
    fused = [r[f"fsdp2_qlora/{backend}"][f"fused/{storage}"] for r in rank_results]
    plain = rank_results[0]["fsdp2_qlora/torch"][f"plain/{storage}"]
    for rank, r in enumerate(fused):
        assert r["function_nodes"] >= dc.QLORA_LAYERS, (rank, r["function_nodes"])
        assert r["sharded_4bit"] == 2 * 7, r["sharded_4bit"]  # every projection of both layers
        assert r["repacked"] == [], f"rank {rank}: bitsandbytes repacked {r['repacked']} for its CPU inference kernel"
    got = fused[0]["params"]
    vs_plain = dc.assert_same_training(got, plain["params"], f"fused {storage} vs plain PEFT", tight=True)
    vs_single = dc.assert_same_training(got, single_qlora, f"fused {storage} vs one process", tight=True)
    dc.assert_same_training(plain["params"], single_qlora, f"plain PEFT {storage} vs one process", tight=True)
    print(f"fsdp2 qlora {storage} {backend}: max |Δ| {vs_plain:.2g} vs plain PEFT (FSDP2), {vs_single:.2g} vs one "
          "process (plain PEFT)")


def test_fsdp2_qlora_with_inject_lora_and_its_adapter(rank_results, single_qlora, tmp_path):
    """inject_lora's own 4-bit layers under FSDP2 with the weights sharded (bf16 storage, PyTorch backend): fused on
    both ranks, equal to one process; the adapter saved straight from the sharded model loads into a fresh 4-bit base
    equal to the trained parameters."""
    from fused_lora import load_adapter

    runs = [r["fsdp2_qlora/torch"]["inject/bfloat16"] for r in rank_results]
    for rank, r in enumerate(runs):
        assert r["function_nodes"] >= dc.QLORA_LAYERS and r["repacked"] == [], (rank, r)
    got = runs[0]["params"]
    print("fsdp2 qlora inject_lora: max |Δ|", dc.assert_same_training(got, single_qlora, "inject vs one process",
                                                                       tight=True))
    base = str(tmp_path / "llama")
    dc.save_llama_base(base)
    restored = dict(load_adapter(dc.llama_4bit(base, "bfloat16"), runs[0]["adapter_dir"]).named_parameters())
    for name, tensor in got.items():
        assert torch.equal(restored[name], tensor), name


def test_zero3_peft_layer_called_alone_takes_peft_forward(rank_results):
    """ZeRO-3, PEFT + enable(): a LoRA layer called on its own before any forward of the model finds its base layer's
    and adapters' parameters partitioned (nothing gathered them for it): PEFT's forward, with the cause named."""
    for results in rank_results:
        shape, messages = results["zero3_peft/torch"]["alone"]
        assert shape == (1, 3, 4 * 32), shape
        assert len(messages) == 1 and "DeepSpeed ZeRO-3 parameters not gathered" in messages[0], messages
