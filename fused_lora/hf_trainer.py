"""``transformers.Trainer`` that saves and restores fused-LoRA adapters instead of whole models.

    from fused_lora.hf_trainer import FusedLoRATrainer
    model = inject_lora(model, LoRAConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"))
    trainer = FusedLoRATrainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    trainer.save_model("out")            # out/adapter_model.safetensors + adapter_config.json (PEFT's format)

A plain ``Trainer`` trains an injected model as it is (only parameters with ``requires_grad`` enter the
optimizer), but its ``save_model`` writes the whole model with ``save_pretrained``, and it cannot resume from
or reload such adapter-only checkpoints: the model is not a ``PeftModel``, so it looks for full weights. The
mixin below changes exactly those three places; mix it into other Trainer subclasses (TRL's ``SFTTrainer``)
with ``class MyTrainer(FusedLoRATrainerMixin, SFTTrainer): ...``.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.utils import logging

from .adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from .injector import get_state

__all__ = ["FusedLoRATrainer", "FusedLoRATrainerMixin"]

logger = logging.get_logger(__name__)
TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the saved TrainingArguments


def _has_adapter(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) and os.path.isfile(os.path.join(directory,
                                                                                               CONFIG_NAME))


class FusedLoRATrainerMixin:
    """Trainer methods for models injected with :func:`fused_lora.inject_lora` (or loaded with ``load_adapter``).
    Models without fused LoRA layers go through the parent Trainer's methods unchanged."""

    def _fused_model(self) -> torch.nn.Module | None:
        """The unwrapped model (no DDP / torch.compile wrapper) when it carries fused LoRA state, else None."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if get_state(model) is not None else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._fused_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is not None:
            # FSDP and DeepSpeed hand over a gathered state dict because the model's own parameters are sharded;
            # save_adapter reads the model's parameters, which would be shards here. Not supported yet: keep the
            # parent's full save so that no checkpoint is lost, and say so.
            logger.warning("FusedLoRATrainer: the engine passed a gathered state dict (FSDP/DeepSpeed); saving it in "
                           "full with the parent Trainer's _save instead of an adapter")
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving the fused LoRA adapter to {output_dir}")
        save_adapter(model, output_dir)
        processing_class = getattr(self, "processing_class", None)  # named `tokenizer` before transformers 4.46
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        fused = self._fused_model() if model is None else (model if get_state(model) is not None else None)
        if fused is None or not _has_adapter(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        logger.info(f"Loading the fused LoRA adapter from {resume_from_checkpoint}")
        load_adapter(fused, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        fused = self._fused_model()
        best = self.state.best_model_checkpoint
        if fused is None or best is None or not _has_adapter(best):
            return super()._load_best_model()
        logger.info(f"Loading the best fused LoRA adapter from {best} (score: {self.state.best_metric})")
        load_adapter(fused, best)


class FusedLoRATrainer(FusedLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``save_model``, checkpoints, ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` use fused-LoRA adapters (PEFT's file format) instead of whole models."""
