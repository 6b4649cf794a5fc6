"""transformers.Trainer on a tiny injected GPT-2 (CPU): training lowers the loss, save_model leaves an adapter that
load_adapter restores, and checkpoints resume."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from tiny_models import build

from fused_lora import LoRAConfig, inject_lora, load_adapter
from fused_lora.hf_trainer import FusedLoRATrainer

SEQ, N_EXAMPLES = 16, 16


class OneSequence(torch.utils.data.Dataset):
    """Every example is the same random sequence: memorizing it is a task adapters learn in a few steps, so the
    loss drop is large compared with step-to-step noise."""

    def __init__(self) -> None:
        ids = torch.randint(1, 64, (1, SEQ), generator=torch.Generator().manual_seed(0))
        self.ids = ids.repeat(N_EXAMPLES, 1)

    def __len__(self) -> int:
        return N_EXAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def injected_gpt2() -> torch.nn.Module:
    model = build("gpt2_lm")
    return inject_lora(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                         task_type="CAUSAL_LM"))


def args(out_dir, **overrides) -> transformers.TrainingArguments:
    kw = dict(output_dir=str(out_dir), per_device_train_batch_size=4, per_device_eval_batch_size=N_EXAMPLES,
              learning_rate=2e-2, max_steps=8, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
              disable_tqdm=True, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant")
    return transformers.TrainingArguments(**{**kw, **overrides})


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=OneSequence().ids[:2]).logits


def lora_parameter_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if "lora_" in n}


def optimized_parameter_ids(trainer: transformers.Trainer) -> set[int]:
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[FusedLoRATrainer, float, float]:
    """A FusedLoRATrainer run, with the (deterministic, eval-mode) loss on the data before and after."""
    model = injected_gpt2()
    trainer = FusedLoRATrainer(model=model, args=args(tmp_path_factory.mktemp("run")), train_dataset=OneSequence(),
                               eval_dataset=OneSequence())
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    return trainer, before, trainer.evaluate()["eval_loss"]


def test_training_lowers_the_loss(trained):
    trainer, before, after = trained
    assert after < before - 0.1, (before, after)
    assert optimized_parameter_ids(trainer) == lora_parameter_ids(trainer.model), "only the adapters train"


def test_save_model_writes_an_adapter_that_load_adapter_restores(trained, tmp_path):
    trainer = trained[0]
    trainer.save_model(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files, "the whole model was saved"
    restored = load_adapter(build("gpt2_lm"), tmp_path)
    torch.testing.assert_close(logits(restored), logits(trainer.model), rtol=0, atol=0)
    assert not torch.equal(logits(build("gpt2_lm")), logits(trainer.model)), "training changed nothing"


def test_plain_trainer_trains_an_injected_model(tmp_path):
    # No PEFT model, no quantization: transformers' Trainer accepts the injected model as it is.
    model = injected_gpt2()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=OneSequence())
    trainer.train()
    assert optimized_parameter_ids(trainer) == lora_parameter_ids(model)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.lora_B, start["transformer.h.0.attn.c_attn.lora_B"])


def test_checkpoints_hold_adapters_and_resume(tmp_path):
    # load_best_model_at_end too: the parent Trainer would look for full weights in the best checkpoint.
    run = args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
               load_best_model_at_end=True)
    uninterrupted = FusedLoRATrainer(model=injected_gpt2(), args=run, train_dataset=OneSequence(),
                                     eval_dataset=OneSequence())
    uninterrupted.train()
    assert uninterrupted.state.best_model_checkpoint is not None
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").is_file()
    # Resume from step 2 in a fresh model: adapter, optimizer and RNG state come back, and steps 3-4 give the
    # uninterrupted run's adapters.
    resumed = FusedLoRATrainer(model=injected_gpt2(), args=run, train_dataset=OneSequence(),
                               eval_dataset=OneSequence())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want = dict(uninterrupted.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
