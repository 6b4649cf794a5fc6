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
    Models without fused LoRA layers go through the parent Trainer's methods unchanged.

    Under FSDP and DeepSpeed (ZeRO-2 and ZeRO-3) ``save_model`` and the checkpoints write the adapter too: every
    process joins :func:`fused_lora.save_adapter`, which gathers only the adapter's tensors (the parent Trainer would
    gather the whole model into one state dict), and the main process writes and logs. Resuming and
    ``load_best_model_at_end`` under those engines read the engine's own checkpoint files (the parent's way: they hold
    the whole training state); elsewhere they read the adapter."""

    def _fused_model(self) -> torch.nn.Module | None:
        """The unwrapped model (no DDP / torch.compile wrapper) when it carries fused LoRA state, else None."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if get_state(model) is not None else None

    def _sharded_engine(self) -> bool:
        """FSDP (either version) or DeepSpeed: the engines whose own checkpoint files hold the training state."""
        return bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))

    def _gathers_by_parameter(self) -> bool:
        """FSDP2 or DeepSpeed: save_adapter can gather the adapter's parameters alone. FSDP1 flattens each unit's
        parameters into one shard: the parent's save_model gathers its full state dict, and ``_save`` reads the
        adapter from it."""
        if getattr(self, "is_deepspeed_enabled", False):
            return True
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return bool(getattr(self, "is_fsdp_enabled", False)) and getattr(plugin, "fsdp_version", 1) == 2

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self._fused_model()
        if model is None or not self._gathers_by_parameter():
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._save_adapter(model, output_dir)  # a collective: every process is here
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._fused_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # An engine that hands over a gathered state dict (FSDP1's full state dict, SageMaker): the adapter's tensors
        # are read from it.
        self._save_adapter(model, output_dir, state_dict=state_dict)

    def _save_adapter(self, model: torch.nn.Module, output_dir: str, state_dict: dict | None = None) -> None:
        """The adapter, the processing class and the training arguments into ``output_dir``; the main process writes
        (every process must call it when the model is sharded)."""
        main = self.args.should_save
        if main:
            os.makedirs(output_dir, exist_ok=True)
            logger.info(f"Saving the fused LoRA adapter to {output_dir}")
        save_adapter(model, output_dir, is_main_process=main, state_dict=state_dict)
        if not main:
            return
        processing_class = getattr(self, "processing_class", None)  # named `tokenizer` before transformers 4.46
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        fused = self._fused_model() if model is None else (model if get_state(model) is not None else None)
        if fused is None or self._sharded_engine() or not _has_adapter(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        logger.info(f"Loading the fused LoRA adapter from {resume_from_checkpoint}")
        load_adapter(fused, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        fused = self._fused_model()
        best = self.state.best_model_checkpoint
        if fused is None or self._sharded_engine() or best is None or not _has_adapter(best):
            return super()._load_best_model()
        logger.info(f"Loading the best fused LoRA adapter from {best} (score: {self.state.best_metric})")
        load_adapter(fused, best)


class FusedLoRATrainer(FusedLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``save_model``, checkpoints, ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` use fused-LoRA adapters (PEFT's file format) instead of whole models."""
