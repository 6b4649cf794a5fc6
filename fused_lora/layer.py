"""``LoRALinear``: a drop-in frozen linear layer (nn.Linear or GPT-2's Conv1D) with a fused LoRA adapter (and
DoRA with ``use_dora=True``). A quantized base gets the module its base kind names (``fused_lora/bases/``; the
bitsandbytes kinds: ``quantized.QuantizedLoRALinear``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from . import bases
from .bases import looks_quantized, unsupported_quantized_message
from .dispatch import DORA, LORA, check_supported, dora_call, lora_call
from .functional import fused_lora_linear
from .reference import dora_weight_norm
from .validation import FLOAT_DTYPES, WEIGHT_LAYOUTS, ShapeError, autocast_inputs


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha/r, or alpha/sqrt(r) with rsLoRA (PEFT's definition)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """Frozen ``weight``/``bias`` plus trainable ``lora_A`` (r×in) and ``lora_B`` (out×r).

    ``y = x Wᵀ + b + scaling · B A dropout(x)``, computed by :func:`fused_lora.fused_lora_linear`.
    ``weight`` and ``bias`` keep the base layer's names so a base checkpoint's keys still load; with
    ``weight_layout="conv1d"`` the weight is stored in×out like GPT-2's Conv1D.

    Adapters default to the weight's dtype for fp32 weights and to float32 for fp16/bf16 weights, as
    PEFT does (``autocast_adapter_dtype=True``): AdamW updates of a low-rank adapter are lost in bf16
    rounding. Pass ``adapter_dtype`` to choose.

    ``use_dora=True``: DoRA, PEFT's weight-decomposed variant (``autograd/dora.py``, ``docs/dora.md``): a trainable
    ``lora_magnitude_vector`` (out_features,) in the adapters' dtype, initialised to ‖W + scaling·B A‖ per output row
    as PEFT does (‖W‖ with the default zero B), and
    ``y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ scaling · B A x_d`` with g = magnitude / ‖W + scaling·B A‖.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_layout: str = "linear",
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"LoRALinear: weight_layout={weight_layout!r}; use one of {WEIGHT_LAYOUTS}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"LoRALinear: dtype={dtype}; the base weight must be floating point (float32, float16 or "
                            "bfloat16)")
        shape = (out_features, in_features) if weight_layout == "linear" else (in_features, out_features)
        weight = torch.empty(shape, device=device, dtype=dtype)
        # nn.Linear's init (the weight's fan-in is in_features in both layouts).
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
        nn.init.uniform_(weight, -bound, bound)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._setup_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                            init_lora_weights, weight_layout, adapter_dtype, use_dora)

    @classmethod
    def from_linear(
        cls,
        layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        *,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wraps an ``nn.Linear`` or transformers ``Conv1D``, sharing (not copying) its weight and bias; or a
        bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, kept as it is (a :class:`~fused_lora.quantized.
        QuantizedLoRALinear`: QLoRA)."""
        if isinstance(layer, LoRALinear):
            raise TypeError("LoRALinear.from_linear: the layer is already a LoRALinear; adapters are not stacked. "
                            "Use it as it is, or wrap its base layer instead")
        kind = bases.of(layer)
        if kind is not None:
            check_supported(DORA if use_dora else LORA, kind, "LoRALinear.from_linear")
        if kind is not None and kind.quantized:
            return kind.wrap(layer, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype)
        if looks_quantized(layer) or (kind is None and isinstance(getattr(layer, "weight", None), torch.Tensor)
                                      and not layer.weight.dtype.is_floating_point):
            raise TypeError(unsupported_quantized_message("LoRALinear.from_linear", type(layer).__name__,
                                                          layer.weight.dtype))
        if kind is None:
            served = ", ".join(k.describe for k in bases.registered())
            raise TypeError(f"LoRALinear.from_linear: expected a layer of a registered base kind ({served}), got "
                            f"{type(layer).__name__}; custom layers are not supported")
        layout = kind.layout(layer)
        in_features, out_features = kind.in_out(layer)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = layer.weight
        self.weight.requires_grad_(False)
        self.bias = layer.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                            init_lora_weights, layout, adapter_dtype, use_dora)
        return self

    def _setup_adapter(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                       init_lora_weights, weight_layout, adapter_dtype, use_dora=False) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRALinear: r={r!r} must be a positive integer")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"LoRALinear: in_features={in_features}, out_features={out_features}; a LoRA layer "
                             "needs both >= 1")
        if not 0.0 <= lora_dropout <= 1.0:
            raise ValueError(f"LoRALinear: lora_dropout={lora_dropout} must be in [0, 1] (1: the branch is dropped "
                             "entirely while training, as nn.Dropout(p=1))")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoRALinear: init_lora_weights={init_lora_weights!r}; use True, False or 'gaussian'")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self._a_shape, self._b_shape = torch.Size((r, in_features)), torch.Size((out_features, r))
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.weight_layout = weight_layout
        self.merged = False
        self.enabled = True
        if adapter_dtype is not None and not adapter_dtype.is_floating_point:
            raise TypeError(f"LoRALinear: adapter_dtype={adapter_dtype}; adapters are trained, so they must be "
                            "floating point: the weight's dtype or float32")
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.use_dora = bool(use_dora)
        if self.use_dora:  # PEFT's name and shape; set from the weights by reset_lora_parameters
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **factory))
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's init: True → A kaiming-uniform(a=√5), B zeros (the layer starts as the base layer);
        "gaussian" → A normal(std=1/r), B zeros; False → both random (for tests)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)
        if getattr(self, "use_dora", False):
            self.reset_dora_magnitude()

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """DoRA: magnitude = ‖W + scaling·B A‖ per output row, computed as PEFT's ``DoraLinearLayer.update_layer`` does
        (in the weight's dtype), so the layer starts as W + scaling·B A (the base layer with PEFT's zero B)."""
        norm = dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling, self.weight_layout)
        self.lora_magnitude_vector.copy_(norm)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer's output, exactly as nn.Linear / Conv1D compute it."""
        if self.weight_layout == "linear":
            return nn.functional.linear(x, self.weight, self.bias)
        out_shape = (*x.shape[:-1], self.out_features)
        x2d = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            return (x2d @ self.weight).view(out_shape)
        return torch.addmm(self.bias, x2d, self.weight).view(out_shape)

    def _name(self) -> str:
        return f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, r={self.r})"

    def _check_adapter_shapes(self) -> None:
        """lora_A / lora_B replaced by tensors of another shape than the layer's r, in_features, out_features."""
        want_a, want_b = (self.r, self.in_features), (self.out_features, self.r)
        if tuple(self.lora_A.shape) != want_a or tuple(self.lora_B.shape) != want_b:
            raise ValueError(f"{self._name()}: lora_A has shape {tuple(self.lora_A.shape)} and lora_B "
                             f"{tuple(self.lora_B.shape)}, but the layer needs {want_a} and {want_b}. Assign adapters "
                             "of those shapes (copy_ into the existing ones), or build a layer with the new rank")
        if self.use_dora and tuple(self.lora_magnitude_vector.shape) != (self.out_features,):
            raise ValueError(f"{self._name()}: lora_magnitude_vector has shape "
                             f"{tuple(self.lora_magnitude_vector.shape)}, but the layer needs ({self.out_features},)")

    def _check_input(self, x: torch.Tensor) -> None:
        """Errors that name this layer, before either path (fused or base-only) runs."""
        if x.device != self.weight.device:
            raise ValueError(f"{self._name()}: x is on {x.device} but the layer's weight is on {self.weight.device}; "
                             "move the input or the layer (module.to(device)) so they match")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"{self._name()}: x has shape {tuple(x.shape)}; its last dim must be "
                             f"in_features={self.in_features}")
        if self.merged or not self.enabled:
            return
        self._check_adapter_shapes()
        if self.weight.requires_grad:
            raise ValueError(
                f"{self._name()}: the frozen base weight {tuple(self.weight.shape)} requires grad (something "
                "unfroze it, e.g. model.requires_grad_(True)). The fused layer trains only lora_A, lora_B and "
                "optionally the bias, and never computes the weight's gradient: freeze it again with "
                "layer.weight.requires_grad_(False), or unload_lora(model) for full fine-tuning")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            self._check_input(x)
            return self.base_forward(x)
        # The common case is checked with plain comparisons on the parameter dict (nn.Module.__getattr__ costs ~0.5
        # µs a parameter), fused_lora_linear's full checks run only when something does not go together (for their
        # error message): this runs per call, and small layers wait on it.
        params = self._parameters
        weight, lora_A, lora_B = params["weight"], params["lora_A"], params["lora_B"]
        bias = params["bias"] if "bias" in params else self.bias  # None (bias=False) is a plain attribute
        if (x.device != weight.device or x.dim() == 0 or x.shape[-1] != self.in_features or weight.requires_grad
                or lora_A.shape != self._a_shape or lora_B.shape != self._b_shape):
            self._check_input(x)
        x_c, w_c, b_c = autocast_inputs(x, weight, bias)
        p = self.lora_dropout
        magnitude = params["lora_magnitude_vector"] if self.use_dora else None
        if (x_c.dtype != w_c.dtype or lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x_c.dtype, torch.float32)
                or (b_c is not None and b_c.dtype not in (x_c.dtype, torch.float32)) or not 0.0 <= p <= 1.0
                or x_c.dtype not in FLOAT_DTYPES
                or (magnitude is not None and (magnitude.dim() != 1 or magnitude.shape[0] != self.out_features
                                               or magnitude.dtype not in (lora_A.dtype, torch.float32)))):
            return fused_lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, p, self.training,
                                     self.weight_layout, magnitude=magnitude)
        if magnitude is not None:
            return dora_call(x_c, w_c, b_c, lora_A, lora_B, magnitude, self.scaling, p if self.training else 0.0,
                             self.weight_layout)
        return lora_call(x_c, w_c, b_c, lora_A, lora_B, self.scaling, p if self.training else 0.0, self.weight_layout)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling · B A in the weight's own layout and dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        if self.weight_layout == "conv1d":
            delta = delta.t()
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def _merged_weight(self, merge: bool) -> torch.Tensor:
        """W + scaling · B A (``merge``) or W - scaling · B A, checked before anything is written: non-finite adapters,
        or a result that overflows the weight's dtype, would destroy the base weight for good, so they raise instead
        (naming the layer) and nothing changes."""
        if self.use_dora:
            return self._dora_merged_weight(merge)[0]
        what = "merge" if merge else "unmerge"
        self._check_adapter_shapes()
        if self.weight.device.type != "meta":  # (meta: shapes only, no values to check)
            for name in ("lora_A", "lora_B"):
                if not torch.isfinite(getattr(self, name)).all():
                    raise ValueError(f"{self._name()}: {what} refused, {name} holds NaN or Inf; the base weight was "
                                     "left unchanged. Fix or re-initialize the adapters (reset_lora_parameters()) "
                                     "first")
        new = self.weight + self.delta_weight() if merge else self.weight - self.delta_weight()
        if self.weight.device.type != "meta" and not (torch.isfinite(new) | ~torch.isfinite(self.weight)).all():
            raise ValueError(f"{self._name()}: {what} refused, W {'+' if merge else '-'} scaling·BA overflows "
                             f"{self.weight.dtype}; the base weight was left unchanged. Keep the layer unmerged, or "
                             "merge in a wider dtype (module.float())")
        return new

    @torch.no_grad()
    def _dora_merged_weight(self, merge: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DoRA, as PEFT's ``DoraLinearVariant.merge_*`` / ``unmerge``: merge gives (m / ‖W + ΔW‖) ⊙ (W + ΔW) with
        ΔW = scaling·B A, the factor per output row, and that norm (kept for unmerge, as PEFT caches it); unmerge gives
        W' / factor − ΔW with the norm kept at merge time. In fp32, rounded once to the weight's dtype. Refused (naming
        the layer, nothing written) for non-finite adapters or magnitude, a non-finite result, or an unmerge through a
        zero factor (a row whose magnitude is 0 cannot be recovered)."""
        what = "merge" if merge else "unmerge"
        self._check_adapter_shapes()
        meta = self.weight.device.type == "meta"
        if not meta:
            for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                if not torch.isfinite(getattr(self, name)).all():
                    raise ValueError(f"{self._name()}: {what} refused, {name} holds NaN or Inf; the base weight was "
                                     "left unchanged. Fix or re-initialize the adapters (reset_lora_parameters()) "
                                     "first")
        w = self.weight if self.weight_layout == "linear" else self.weight.t()  # out×in
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        magnitude = self.lora_magnitude_vector.float()
        if merge:
            v = w.float() + delta
            norm = torch.linalg.vector_norm(v, dim=1)
            new = (magnitude / norm)[:, None] * v
        else:
            norm = getattr(self, "_dora_merge_norm", None)
            if norm is None:
                raise ValueError(f"{self._name()}: unmerge refused, the layer holds no norm from its merge (DoRA needs "
                                 "it to undo the magnitude scaling); the base weight was left unchanged")
            factor = magnitude / norm
            if not meta and not (torch.isfinite(factor) & (factor != 0)).all():
                raise ValueError(f"{self._name()}: unmerge refused, a DoRA row factor magnitude/‖W + ΔW‖ is 0 or not "
                                 "finite, so the merged weight cannot be divided back; the base weight was left "
                                 "unchanged")
            new = w.float() / factor[:, None] - delta
            norm = None
        new = new.to(self.weight.dtype)
        if not meta and not (torch.isfinite(new) | ~torch.isfinite(w)).all():
            raise ValueError(f"{self._name()}: {what} refused, the DoRA-{what}d weight overflows {self.weight.dtype} "
                             "or is not finite (a zero-norm row?); the base weight was left unchanged. Keep the layer "
                             "unmerged, or merge in a wider dtype (module.float())")
        return (new if self.weight_layout == "linear" else new.t()), norm

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling · B A (DoRA: W ← (m / ‖W + scaling·B A‖) ⊙ (W + scaling·B A), as PEFT); forward then runs the
        base GEMM only. No-op when already merged. Refused (weight unchanged) when the adapters are not finite."""
        if not self.merged:
            if self.use_dora:
                new, norm = self._dora_merged_weight(merge=True)
                self.weight.copy_(new)
                # a non-persistent buffer: .to() moves it with the weight, the state dict does not hold it
                self.register_buffer("_dora_merge_norm", norm, persistent=False)
            else:
                self.weight.copy_(self._merged_weight(merge=True))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the weight dtype's rounding). No-op when not merged."""
        if self.merged:
            self.weight.copy_(self._merged_weight(merge=False))
            self.merged = False
            self._dora_merge_norm = None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block, forward returns exactly the base layer's output."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, weight_layout={self.weight_layout!r}, merged={self.merged}"
                + (", use_dora=True" if self.use_dora else ""))
