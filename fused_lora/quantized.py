"""LoRA on bitsandbytes 4-bit and 8-bit base layers (QLoRA): ``QuantizedLoRALinear`` and its autograd Function.

    y = base(x) + scaling · B A dropout(x)          base: bitsandbytes Linear4bit (NF4/FP4) or Linear8bitLt

Two ways to compute it (``QuantLoRAFunction``):
- composed (any backend, any bitsandbytes base): the base layer's own matmul (``base_ops.Bnb4Base`` /
  ``Bnb8Base``: exactly what the layer computes), then the LoRA branch added in place into its output by the
  rank-r kernels (``triton_ops.composed_forward``; the PyTorch path on CPU); in backward the base's input gradient
  (dY · dequantized W, as bitsandbytes' own backward computes it) with m ⊙ (dS A) added in place.
- fused 4-bit (Triton backend, NF4/FP4 base, x already in the layer's compute dtype): the 4-bit weight is
  dequantized in registers inside the base GEMM's K-loop with the rank-r term folded into its accumulator
  (``bnb4_ops``): forward 2 launches, backward 3, and no dequantized copy of W at all.

Either way the saved activations are x, S (M×r) and the seed; the quantized weight is used as it is and no
dequantized copy of W is kept on the layer or saved for backward. bitsandbytes is optional: this module imports it
only when a bitsandbytes layer is handed over.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .backend import backend_ops, resolve_backend, resolve_gemm
from .base_ops import BNB_4BIT, BNB_8BIT, quantized_base, quantized_kind
from .functional import (
    _seed_value,
    draw_dropout_seed,
    in_function_transform,
    plain_backward,
    without_autocast,
)
from .layer import LoRALinear


def _forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed, backend, mode):
    if mode == "fused-4bit":
        from . import bnb4_ops

        return bnb4_ops.fused_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed)
    y, s = backend_ops(backend).composed_forward(x2d, base, lora_A, lora_B, scaling, p, seed)
    return y, s


def _backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, backend, mode, needs):
    if mode == "fused-4bit":
        from . import bnb4_ops

        return bnb4_ops.fused_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)
    return backend_ops(backend).composed_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)


class QuantLoRAFunction(torch.autograd.Function):
    """Autograd Function of LoRA on a quantized base (``base``: a ``base_ops`` object holding the layer). ``bias`` is
    the base layer's bias, passed as an input so that it gets a gradient when it is trained."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, base, scaling, dropout_p, seed, backend, mode):
        x2d = x.reshape(-1, x.shape[-1])
        y, s = without_autocast(_forward, x.device.type, x2d, base, bias, lora_A, lora_B, scaling, dropout_p,
                            _seed_value(seed), backend, mode)
        ctx.save_for_backward(x, lora_A, lora_B, s, seed)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.backend, ctx.mode = base, scaling, dropout_p, backend, mode
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, s, seed = ctx.saved_tensors
        need_dx, need_dbias, need_da, need_db = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: plain, differentiable ops (the base's dX is linear in dY)
            dx, dbias, da, db = plain_backward(ctx, dy, x, lora_A, lora_B, seed,
                                               lambda d: ctx.base.input_grad(d, d.dtype),
                                               (need_dx, need_dbias, need_da, need_db))
            return dx, dbias, da, db, None, None, None, None, None, None
        dy2d, x2d = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx, da, db, dbias = without_autocast(_backward, dy.device.type, dy2d, x2d, ctx.base, lora_A, lora_B, s,
                                         ctx.scaling, ctx.dropout_p, _seed_value(seed), ctx.backend, ctx.mode,
                                         (need_dx, need_da, need_db, need_dbias))
        return (dx.view(x.shape) if need_dx else None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                da.to(lora_A.dtype) if need_da else None, db.to(lora_B.dtype) if need_db else None,
                None, None, None, None, None, None)


def _plain_ops(x, layer, lora_A, lora_B, scaling, p) -> torch.Tensor:
    """PEFT's bitsandbytes LoRA forward, op for op (``peft.tuners.lora.bnb``): for torch.func transforms and
    forward-mode AD."""
    result = layer(x)
    x_a = x.to(lora_A.dtype)
    if p > 0:
        x_a = torch.nn.functional.dropout(x_a, p, training=True)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x_a, lora_A), lora_B) * scaling
    return result + lora.to(result.dtype)


def quantized_lora(x: torch.Tensor, layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   dropout_p: float = 0.0, training: bool = True, *, dropout_seed: int | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """``layer(x) + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
    ``layer`` (frozen). Same conventions as :func:`fused_lora.fused_lora_linear`."""
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    if p == 1.0:  # as in fused_lora_linear: nn.Dropout(p=1) drops the whole branch
        p, scaling = 0.0, 0.0
    bias = layer.bias
    if in_function_transform((x, lora_A, lora_B, bias)):
        return _plain_ops(x, layer, lora_A, lora_B, scaling, p)
    base = quantized_base(layer)
    compute = getattr(base, "compute_dtype", x.dtype)
    name = resolve_backend(backend, x.device, compute)
    seed = None
    if p > 0:
        seed = draw_dropout_seed() if dropout_seed is None else torch.tensor([int(dropout_seed)])
    mode = "composed"
    if name == "triton" and quantized_kind(layer) == BNB_4BIT and x.dtype == compute:
        mode = _choose_4bit_path(x, base, bias, lora_A, lora_B, scaling, p, seed)
    return QuantLoRAFunction.apply(x, bias, lora_A, lora_B, base, scaling, p, seed, name, mode)


def _choose_4bit_path(x, base, bias, lora_A, lora_B, scaling, p, seed) -> str:
    """'fused-4bit' or 'composed' for a 4-bit base on the Triton backend: ``FUSED_LORA_GEMM`` as for dense layers
    (``fused``, ``composed``; ``auto``: the faster of the two for this shape, timed once by ``gemm_choice``; Turing
    takes the composed path, whose base GEMM is bitsandbytes' dequantize + cuBLAS, and so does a GPU layer whose K is
    not a multiple of the blocksize)."""
    if x.device.type == "cuda" and x.shape[-1] % base.layer.weight.quant_state.blocksize:
        # in_features not a multiple of the blocksize (no projection of GPT-2 or Gemma): the kernels' per-element scale
        # gathers spilled or passed 99 KiB of shared memory on several GPUs (kernels/configs.py); bitsandbytes' matmul
        return "composed"
    gemm = resolve_gemm(x.device)
    if gemm != "auto":
        return "fused-4bit" if gemm == "fused" else "composed"
    from . import bnb4_ops, gemm_choice, triton_ops
    from .kernels.configs import m_bucket

    x2d = x.reshape(-1, x.shape[-1])
    key = gemm_choice.key(x.device, x2d, lora_B, lora_A, "linear", m_bucket(x2d.shape[0])) + "|bnb4"
    choice = gemm_choice.cached(key)
    if choice is None:  # first call of this shape: time both (the seed read only then)
        seed = _seed_value(seed)
        with torch.no_grad():
            choice = gemm_choice.choose(
                key, x.device, lambda: bnb4_ops.fused_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed),
                lambda: triton_ops.composed_forward(x2d, base, lora_A, lora_B, scaling, p, seed))
    return "fused-4bit" if choice == "fused" else "composed"


def _requantized(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes weight for ``layer`` holding ``weight`` (N×K, float), quantized like the old one, as
    PEFT's merge does (``peft.tuners.lora.bnb``)."""
    import bitsandbytes as bnb

    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs["requires_grad"] = False
    if quantized_kind(layer) == BNB_4BIT:
        kwargs["bnb_quantized"] = False
        kwargs.pop("quant_state", None)
        return bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
    kwargs = {k: kwargs[k] for k in ("requires_grad", "has_fp16_weights") if k in kwargs}
    return bnb.nn.Int8Params(weight.to("cpu"), **kwargs).to(old.device)


class QuantizedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose frozen base is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (QLoRA), made by
    :meth:`LoRALinear.from_linear` and ``inject_lora``.

    The bitsandbytes layer is kept as it is, as the child ``base_layer`` (its packed weight and quantization state
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
        kind = quantized_kind(layer)
        name = type(layer).__name__
        if kind == BNB_4BIT and getattr(layer.weight, "quant_state", None) is None:
            raise ValueError(f"LoRALinear.from_linear: the {name} has no quant_state: its weight was never quantized "
                             "(bitsandbytes quantizes a Linear4bit when it is moved to a device: layer.to('cuda') or "
                             "layer.to('cpu'), or load the model with a BitsAndBytesConfig)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self._renamed_keys: dict[str, str] = {}
        self._register_state_dict_hook(_base_keys_on_save)
        self._register_load_state_dict_pre_hook(_base_keys_on_load, with_module=True)
        self.register_load_state_dict_post_hook(_base_keys_reported)
        self._setup_adapter(layer.in_features, layer.out_features, r, lora_alpha, lora_dropout, use_rslora,
                            init_lora_weights, "linear", adapter_dtype if adapter_dtype is not None else torch.float32)
        return self

    @property
    def quantization(self) -> str:
        """``"bnb-4bit"`` or ``"bnb-8bit"``."""
        return quantized_kind(self.base_layer)

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
        dense = quantized_base(self.base_layer).dequantized().float()
        return dense + self.delta_weight() if merge else dense - self.delta_weight()

    def _requantize(self, merge: bool) -> None:
        warnings.warn(f"{self._name()}: {'merging into' if merge else 'unmerging from'} a "
                      f"{type(self.base_layer).__name__} dequantizes its weight, adds the adapter and quantizes it "
                      "again: lossy (the re-quantization error is of the order of the quantization step, as with "
                      "PEFT's merge)", UserWarning, stacklevel=3)
        self.base_layer.weight = _requantized(self.base_layer, self._merged_weight(merge))
        if quantized_kind(self.base_layer) == BNB_8BIT:
            self.base_layer.state.reset_grads()
            self.base_layer.state.CB = self.base_layer.state.SCB = None

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


__all__ = ["BNB_4BIT", "BNB_8BIT", "QuantLoRAFunction", "QuantizedLoRALinear", "quantized_lora"]
