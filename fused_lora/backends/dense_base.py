"""The dense base as the paths compute it: ``nn.Linear`` (weight N×K, "linear") or GPT-2's ``Conv1D`` (weight K×N,
"conv1d") through cuBLAS in x's dtype. The composed path runs it and adds the rank-r term in place; the quantized kinds'
base objects (``fused_lora/bases/``) have the same two methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class DenseBase:
    """``forward(x)`` = x Wᵀ + b in x's dtype; ``input_grad(dY, x_dtype)`` = dY W (the weight is frozen)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str

    compute_dtype = None

    def _w_t(self) -> torch.Tensor:  # Wᵀ, K×N, as a view
        return self.weight.t() if self.layout == "linear" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_t = self._w_t()
        return torch.addmm(self.bias.to(x.dtype), x, w_t) if self.bias is not None else x @ w_t

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return (dy @ self._w_t().t()).to(x_dtype)

    def dequantized(self) -> torch.Tensor:
        """W as out × in."""
        return self._w_t().t()
