"""The call record: what one layer call computes, apart from its tensors, and the tensors of that call.

Every layer below the router takes these two objects instead of a dozen positional arguments:

    call  = Call(variant, kind, layout, scaling, p, backend, path, candidates)   made by the router, kept and reused
    t     = Operands(x, weight, bias, lora_A, lora_B, magnitude, base)            made per call

Several adapters on one base (the ``multi`` variant) extend both by what only that variant has: the call record its
adapters' ``scalings`` and dropout ``ps`` (per adapter, in segment order; ``scaling`` is then unused and ``p`` the
largest), the operands the batch's row ``segments`` and the ``adapters`` (``fused_lora.segments``; lora_A and lora_B
are then None).

``Call`` holds nothing that changes from one call of a layer to the next (the router keeps one per route,
``dispatch.call_record``), so a layer's steady state builds none. Words used across the package (docs/architecture.md):

- variant: what is computed on top of the frozen base: ``"lora"``, ``"dora"`` or ``"multi"`` (several LoRA adapters,
  one per segment of rows: ``autograd/variants.py``);
- base kind: what the frozen layer is: ``"dense"`` (nn.Linear, GPT-2 Conv1D), ``"bnb-4bit"``, ``"bnb-8bit"``, or a
  registered plug-in (``fused_lora/bases/``);
- backend: what computes: ``"triton"`` (the kernels) or ``"torch"`` (the PyTorch path, no kernels);
- path: within the Triton backend, which computation runs a call: ``"fused"`` (the base GEMM with the rank-r term in
  its accumulator), ``"composed"`` (the base layer's own GEMM, then the rank-r term added in place) or ``"torch"``
  (the PyTorch path with the kernels' dropout mask); ``"auto"`` until timing picks one;
- seed: the dropout seed of a call (:data:`Seed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# The dropout seed of one call: a one-element int64 tensor on the inputs' device on the Triton backend (the kernels read
# it from memory, so a CUDA graph replay takes a new one), a Python int on the PyTorch backend (its Generator's seed),
# None without dropout.
Seed = torch.Tensor | int | None

PATHS = ("fused", "composed", "torch")  # in the order a failed check or a kernel that cannot run walks them


@dataclass(frozen=True, eq=False)
class Call:
    """What a call computes and where, apart from the tensors (see the module docstring for the words)."""

    variant: Any  # autograd.variants.Variant (LoRA or DoRA): typed loosely, it lives above this layer
    kind: Any  # bases.BaseKind: the frozen layer's kind
    layout: str  # "linear" (weight out×in) or "conv1d" (in×out, GPT-2); "linear" for quantized bases
    scaling: float
    p: float  # the dropout applied by this call (0 outside training)
    backend: str  # "triton" | "torch"
    path: str  # "fused" | "composed" | "torch" | "auto"
    candidates: tuple[str, ...]  # the paths "auto" times, and a failed check walks, in PATHS order
    # the multi variant: each adapter's scaling and applied dropout, in segment order (empty for the others)
    scalings: tuple[float, ...] = ()
    ps: tuple[float, ...] = ()

    def __repr__(self) -> str:
        scaling = f"scalings={self.scalings}, ps={self.ps}" if self.scalings else \
            f"scaling={self.scaling:g}, p={self.p:g}"
        return (f"Call({self.variant.name}, {self.kind.name}, {self.layout}, {scaling}, {self.backend}, {self.path}, "
                f"{self.candidates})")


class Operands(NamedTuple):
    """The tensors of one call, x as a 2-D (tokens × features) view."""

    x: torch.Tensor
    weight: torch.Tensor | None  # a dense base's weight, in its own layout; None for a quantized base
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None  # r × in_features (None for the multi variant)
    lora_B: torch.Tensor | None  # out_features × r
    magnitude: torch.Tensor | None = None  # DoRA's magnitude vector (out_features)
    base: Any = None  # a quantized base's object (bases.BaseKind.base); None for a dense base
    segments: Any = None  # the multi variant: segments.Segments of x's rows (host ints)
    adapters: Any = None  # the multi variant: segments.MultiAdapters, one per segment

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0] if self.lora_B is not None else self.adapters.out_features
