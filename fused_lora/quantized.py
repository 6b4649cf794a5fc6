"""LoRA on quantized base layers (QLoRA): ``QuantizedLoRALinear`` and ``quantized_lora``.

    y = base(x) + scaling · B A dropout(x)          base: a layer of a quantized base kind (``fused_lora/bases/``:
                                                    bitsandbytes Linear4bit (NF4/FP4), Linear8bitLt, or a plug-in)

The quantized layer is kept as it is (its packed weight and quantization state untouched, no dequantized copy); the
router (``dispatch.quantized_call``) runs the one autograd Function with the kind's passes: the layer's own matmul with
the LoRA branch added in place (composed), or, where the kind has one (bitsandbytes 4-bit), one GEMM that dequantizes W
in registers (fused). Either way the saved activations are x, S (M×r) and the seed. Everything kind-specific (its base
object, how a merge writes the weight back) is the kind's; bitsandbytes is optional.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import bases
from .dispatch import quantized_call
from .layer import LoRALinear


def quantized_lora(x: torch.Tensor, layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   dropout_p: float = 0.0, training: bool = True, *, dropout_seed: int | torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """``layer(x) + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ`` for a quantized ``layer`` (frozen; bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt`` or a registered plug-in kind). Same conventions as
    :func:`fused_lora.fused_lora_linear`."""
    return quantized_call(x, layer, lora_A, lora_B, float(scaling), float(dropout_p) if training else 0.0,
                          dropout_seed, backend)


class QuantizedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose frozen base is a quantized layer (QLoRA: bitsandbytes ``Linear4bit`` or
    ``Linear8bitLt``, or a registered plug-in kind), made by :meth:`LoRALinear.from_linear` and ``inject_lora``.

    The quantized layer is kept as it is, as the child ``base_layer`` (its packed weight and quantization state
    untouched, no dequantized copy); ``weight`` and ``bias`` are its. The state dict keeps the base layer's own keys
    (``weight``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ``SCB``, …) beside ``lora_A`` /
    ``lora_B``, so a 4-bit checkpoint's keys load into the injected model. Adapters default to float32 (PEFT's
    default on a quantized base).
    """

    weight_layout = "linear"

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.base_layer.bias

    @classmethod
    def wrap(cls, layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
             init_lora_weights: bool | str, adapter_dtype: torch.dtype | None) -> QuantizedLoRALinear:
        kind = bases.of(layer)
        why = kind.not_ready(layer)
        if why is not None:
            raise ValueError(f"LoRALinear.from_linear: {why}")
        if kind.prepare is not None:  # also where its own forward runs (merged, disabled), e.g. no CPU repack of W
            kind.prepare(layer)
        bases.base_of(layer)  # its base object now, not while torch.compile traces the first call
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self._renamed_keys: dict[str, str] = {}
        self._register_state_dict_hook(_base_keys_on_save)
        self._register_load_state_dict_pre_hook(_base_keys_on_load, with_module=True)
        self.register_load_state_dict_post_hook(_base_keys_reported)
        self._setup_adapter(*kind.in_out(layer), r, lora_alpha, lora_dropout, use_rslora,
                            init_lora_weights, "linear", adapter_dtype if adapter_dtype is not None else torch.float32)
        return self

    @property
    def quantization(self) -> str:
        """The base kind's name: ``"bnb-4bit"``, ``"bnb-8bit"``, or a plug-in's."""
        return bases.of(self.base_layer).name

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.device != self.weight.device:
            raise ValueError(f"{self._name()}: x is on {x.device} but the layer's {type(self.base_layer).__name__} "
                             f"weight is on {self.weight.device}; move the input or the model so they match")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._name()}: x has shape {tuple(x.shape)}; its last dim must be "
                             f"in_features={self.in_features}")
        if not (self.merged or not self.enabled):
            self._check_adapter_shapes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.merged or not self.enabled:
            return self.base_layer(x)
        return quantized_lora(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
                              self.training)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling · B A in float32 (N×K)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def _merged_weight(self, merge: bool) -> torch.Tensor:
        """The dequantized weight ± scaling · B A (float32), checked before anything is written."""
        what = "merge" if merge else "unmerge"
        self._check_adapter_shapes()
        for name in ("lora_A", "lora_B"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{self._name()}: {what} refused, {name} holds NaN or Inf; the base weight was left "
                                 "unchanged. Fix or re-initialize the adapters (reset_lora_parameters()) first")
        dense = bases.base_of(self.base_layer)[1].dequantized().float()
        return dense + self.delta_weight() if merge else dense - self.delta_weight()

    def _requantize(self, merge: bool) -> None:
        warnings.warn(f"{self._name()}: {'merging into' if merge else 'unmerging from'} a "
                      f"{type(self.base_layer).__name__} dequantizes its weight, adds the adapter and quantizes it "
                      "again: lossy (the re-quantization error is of the order of the quantization step, as with "
                      "PEFT's merge)", UserWarning, stacklevel=3)
        kind = bases.of(self.base_layer)
        if kind.requantize is None:
            raise TypeError(f"{self._name()}: the {kind.describe} base kind cannot write a merged weight back "
                            "(it registers no requantize); keep the layer unmerged")
        kind.requantize(self.base_layer, self._merged_weight(merge))

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the quantized weight (dequantize, add, quantize again, like PEFT): lossy, warns."""
        if not self.merged:
            self._requantize(merge=True)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the adapter out of the quantized weight again (lossy twice over, warns)."""
        if self.merged:
            self._requantize(merge=False)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"base={self.quantization}, merged={self.merged}")


_BASE = "base_layer."


def _base_keys_on_save(module, state_dict, prefix, local_metadata):
    """``<prefix>base_layer.<key>`` → ``<prefix><key>``: the bitsandbytes layer's own keys, as in a base checkpoint."""
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix + _BASE):]] = state_dict.pop(key)
    return state_dict


def _base_keys_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    """The reverse of :func:`_base_keys_on_save`, for keys that are not the adapter's (remembered, so that
    :func:`_base_keys_reported` reports any the bitsandbytes layer leaves unused under their checkpoint names)."""
    own = {prefix + "lora_A", prefix + "lora_B"}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own
                and not k.startswith(prefix + _BASE)]:
        renamed = prefix + _BASE + key[len(prefix):]
        state_dict[renamed] = state_dict.pop(key)
        module._renamed_keys[renamed] = key


def _base_keys_reported(module, incompatible_keys):
    """Unused or missing keys under the names the checkpoint has: a 4-bit layer reports its quantization-state keys
    as unexpected (bitsandbytes reads them only in from_pretrained), the same keys as the base model itself."""
    for keys in (incompatible_keys.unexpected_keys, incompatible_keys.missing_keys):
        keys[:] = [module._renamed_keys.get(k, k) for k in keys]
    module._renamed_keys.clear()


__all__ = ["QuantizedLoRALinear", "quantized_lora"]
