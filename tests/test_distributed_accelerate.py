"""FSDP2 and DeepSpeed through ``accelerate launch`` (2 processes, CPU, gloo), with the engine taken from the launch's
config as in a user's run: ``Accelerator().prepare``, ``FusedLoRATrainer`` and ``Trainer`` with PEFT +
``fused_lora.peft.enable()``, and ``Trainer(deepspeed=<dict>)`` for ZeRO-2 and ZeRO-3. On both backends, through the
fused autograd Function on every rank; the trainable parameters equal a single-process run on the whole batch;
FusedLoRATrainer's ``save_model`` and checkpoints hold the adapter (PEFT's format, no full model) under FSDP2, ZeRO-2
and ZeRO-3, written and logged by rank 0 only, and it loads into a fresh base with ``load_adapter`` and with PEFT.

The workers (tests/distributed_accelerate.py) install test-only CPU shims of accelerate (its docstring says why);
docs/distributed.md names them too."""

from __future__ import annotations

import json
import os
import re
import sys

import distributed_accelerate as da
import distributed_common as dc
import pytest
import torch
import torch.distributed as dist

yaml = pytest.importorskip("yaml")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]

LAUNCH_TIMEOUT_S = 600
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_accelerate.py")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "distributed.md")


def launch(config: str, folder) -> list[dict]:
    """``accelerate launch --config_file <config>.yaml distributed_accelerate.py <folder> <config>``; the ranks'
    results."""
    launch_config = da.FSDP2_LAUNCH if config == "fsdp2" else json.loads(json.dumps(da.DEEPSPEED_LAUNCH))
    if config == "deepspeed":
        ds_file = folder / "ds_zero3.json"
        ds_file.write_text(json.dumps(da.DEEPSPEED_ZERO3_FILE, indent=2))
        launch_config["deepspeed_config"]["deepspeed_config_file"] = str(ds_file)
    config_file = folder / f"{config}.yaml"
    config_file.write_text(yaml.safe_dump(launch_config))
    out_dir = folder / "out"
    out_dir.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--main_process_port", str(dc.free_port()), SCRIPT, str(out_dir), config]
    dc.launch(command, LAUNCH_TIMEOUT_S, f"accelerate launch ({config})")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(dc.WORLD_SIZE)]


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return launch("fsdp2", tmp_path_factory.mktemp("fsdp2"))


@pytest.fixture(scope="module")
def deepspeed_launch(tmp_path_factory) -> list[dict]:
    return launch("deepspeed", tmp_path_factory.mktemp("deepspeed"))


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


@pytest.fixture(scope="module")
def single_trainer(tmp_path_factory) -> dict[str, torch.Tensor]:
    return dc.trainer_reference(str(tmp_path_factory.mktemp("trainer_reference")))


FSDP2_SCENARIOS = [s for s in da.SCENARIOS["fsdp2"] if not s.endswith("_resumed")]
DEEPSPEED_SCENARIOS = [s for s in da.SCENARIOS["deepspeed"] if not s.endswith("_resumed")]
ZERO_STAGE = {"trainer_inject": 3, "trainer_zero2_inject": 2, "trainer_zero3_peft": 3}


def _check(ranks: list[dict], key: str, engine: str, want: dict[str, torch.Tensor],
           same_backend: dict[str, torch.Tensor]) -> dict:
    r0 = ranks[0][key]
    for rank, results in enumerate(ranks):
        assert results[key]["engine"] == f"DistributedType.{engine}", (rank, results[key]["engine"])
        assert results[key]["world_size"] == dc.WORLD_SIZE, (rank, results[key]["world_size"])
        assert results[key]["function_nodes"] >= dc.LORA_LAYERS, (rank, results[key]["function_nodes"])
        if "batches_per_epoch" in results[key]:  # the Trainer split the 4 examples over the 2 ranks
            assert results[key]["batches_per_epoch"] == 1, results[key]["batches_per_epoch"]
    loose = dc.assert_same_training(r0["params"], want, f"{key} vs one process")
    tight = dc.assert_same_training(r0["params"], same_backend, f"{key} vs one process (same backend)", tight=True)
    print(f"{key}: max |Δ| {tight:.2g} vs one process on the same backend, {loose:.2g} vs the native/Trainer run")
    return r0


@pytest.mark.parametrize("scenario", FSDP2_SCENARIOS)
@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_fsdp2_launch_matches_single_process(fsdp2, single, single_trainer, single_fn, scenario, backend):
    r0 = _check(fsdp2, f"{scenario}/{backend}", "FSDP", single_trainer if "trainer" in scenario else single,
                single_fn[backend])
    sharding = r0["sharding"]
    assert sharding["dtensor"] == sharding["total"], f"accelerate's FSDP2 left parameters unsharded: {sharding}"


@pytest.mark.parametrize("scenario", DEEPSPEED_SCENARIOS)
@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_deepspeed_launch_matches_single_process(deepspeed_launch, single, single_trainer, single_fn, scenario,
                                                backend):
    r0 = _check(deepspeed_launch, f"{scenario}/{backend}", "DEEPSPEED",
                single_trainer if "trainer" in scenario else single, single_fn[backend])
    sharding = r0["sharding"]
    if ZERO_STAGE.get(scenario, 3) == 3:
        assert sharding["zero3"] == sharding["total"], f"ZeRO-3 left parameters whole: {sharding}"
    else:
        share, total = r0["zero2_share"]
        assert r0["zero_stage"] == 2 and share < total, r0["zero2_share"]
    if scenario in ZERO_STAGE:
        assert r0["zero_stage"] == ZERO_STAGE[scenario]


def _adapter_files(folder: str) -> list[str]:
    """The model files in ``folder`` (not the engine's own resume state in subfolders: FSDP's pytorch_model_fsdp_0/,
    DeepSpeed's global_step<N>/, each rank its shards)."""
    return sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))
                  and f.startswith(("adapter_", "model", "pytorch_model")))


@pytest.mark.parametrize("case", ["fsdp2/trainer_inject", "deepspeed/trainer_inject", "deepspeed/trainer_zero2_inject",
                                  "deepspeed/trainer_zero3_peft"])
@pytest.mark.parametrize("backend", dc.BACKEND_NAMES)
def test_trainer_saves_an_adapter(request, case, backend):
    """save_model and the step-2 checkpoint hold PEFT's adapter files and no full model; the final adapter loads into
    a fresh base with load_adapter and with PEFT, equal to the trained parameters. FusedLoRATrainer: rank 0 alone logs
    the saves and nothing warns. (Trainer + PEFT under ZeRO-3: PEFT's own saving, with
    stage3_gather_16bit_weights_on_model_save.)"""
    from peft import PeftModel
    from tiny_models import build

    from fused_lora import load_adapter

    config, scenario = case.split("/")
    ranks = request.getfixturevalue("fsdp2" if config == "fsdp2" else "deepspeed_launch")
    r0, r1 = (r[f"{scenario}/{backend}"] for r in ranks)
    for sub in ("final", "checkpoint-2"):
        assert _adapter_files(os.path.join(r0["folder"], sub)) == ["adapter_config.json", "adapter_model.safetensors"]
    final = os.path.join(r0["folder"], "final")
    peft_restored = dc.ours(dict(PeftModel.from_pretrained(build("gpt2_cls"), final).named_parameters()))
    restored = dict(load_adapter(build("gpt2_cls"), final).named_parameters()) if "inject" in scenario else None
    for name, tensor in r0["params"].items():
        assert torch.equal(peft_restored[name], tensor), f"PeftModel.from_pretrained: {name}"
        if restored is not None:
            assert torch.equal(restored[name], tensor), f"load_adapter: {name}"
    if "inject" in scenario:
        saves = [m for level, m in r0["logs"] if level == "INFO" and m.startswith("Saving the fused LoRA adapter")]
        assert len(saves) == 3, r0["logs"]  # checkpoint-2, checkpoint-3 (the last step), final
        assert r1["logs"] == [], r1["logs"]
        assert not [m for level, m in r0["logs"] if level != "INFO"], r0["logs"]


@pytest.mark.parametrize("config", ["fsdp2", "deepspeed"])
def test_fused_lora_trainer_resumes_from_the_engines_checkpoint(request, config):
    """Resumed from the step-2 checkpoint (the engine's own state beside the adapter), the last step ends where the
    uninterrupted run ended."""
    ranks = request.getfixturevalue("fsdp2" if config == "fsdp2" else "deepspeed_launch")
    resumed, whole = ranks[0]["trainer_inject_resumed/torch"], ranks[0]["trainer_inject/torch"]
    assert resumed["global_step"] == dc.STEPS
    print(config, "resumed vs uninterrupted:", dc.assert_same_training(resumed["params"], whole["params"],
                                                                      f"{config} resumed", tight=True))


def test_docs_show_the_launch_configs_the_tests_use():
    """docs/distributed.md's accelerate configs (YAML) and DeepSpeed file (JSON) are the ones launched here."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    yaml_blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    json_blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    assert da.FSDP2_LAUNCH in yaml_blocks, "docs/distributed.md lacks the FSDP2 accelerate config the test launches"
    assert da.DEEPSPEED_LAUNCH in yaml_blocks, "docs/distributed.md lacks the DeepSpeed accelerate config"
    assert da.DEEPSPEED_ZERO3_FILE in json_blocks, "docs/distributed.md lacks the ZeRO-3 file the test launches"
