"""The five implementations of one LoRA linear layer that every benchmark measures side by side.

    base     the frozen base layer alone, ``F.linear(x, W, b)``: the floor no LoRA layer can beat
    naive    eager PyTorch LoRA, ``x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``
    peft     PEFT's own LoRA layer (``peft.tuners.lora.Linear``, built by ``get_peft_model``)
    compile  ``torch.compile`` of ``naive``
    fused    ``fused_lora.fused_lora_linear`` (Triton kernels on CUDA, the PyTorch path on CPU)

All five read the same tensors: one frozen W and b, one pair of adapters A (r×K) and B (N×r), both
random (B is *not* zero-initialised, so the LoRA branch does real work and a wrong provider shows up
in the cross-check), and the same inputs. ``make_case`` builds them; ``build`` returns a provider's
forward callable and the tensors its backward differentiates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROVIDERS = ("base", "naive", "peft", "compile", "fused")


@dataclass(frozen=True)
class LayerShape:
    """One benchmark case: tokens M, in_features K, out_features N, rank r, dropout p."""

    M: int
    K: int
    N: int
    r: int
    p: float
    bias: bool = True
    label: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerCase:
    """The shared tensors of one case (one device and dtype)."""

    shape: LayerShape
    xs: list[torch.Tensor]  # input sets, rotated between calls when they fit in cache
    dy: torch.Tensor
    weight: torch.Tensor  # N×K, frozen
    bias: torch.Tensor | None  # N, frozen
    lora_A: torch.Tensor  # r×K, trainable
    lora_B: torch.Tensor  # N×r, trainable
    scaling: float


def make_case(shape: LayerShape, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype | None = None,
              n_inputs: int = 1, seed: int = 0) -> LayerCase:
    """Random tensors for ``shape`` (never zeros: zeros hide wrong indexing and run faster on some hardware).

    ``adapter_dtype`` defaults to ``dtype`` (every provider computes the LoRA branch in the base dtype); pass
    float32 to measure PEFT's default for half-precision bases (``autocast_adapter_dtype=True``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    M, K, N, r = shape.M, shape.K, shape.N, shape.r

    def rand(*size: int, dt: torch.dtype = dtype, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).to(device=device, dtype=dt)

    # Scales like a trained layer's: unit-variance activations, W and A ~ 1/sqrt(K), B ~ 1/sqrt(r).
    xs = [rand(M, K).requires_grad_(True) for _ in range(max(1, n_inputs))]
    return LayerCase(
        shape=shape,
        xs=xs,
        dy=rand(M, N),
        weight=rand(N, K, std=1 / math.sqrt(K)),
        bias=rand(N, std=0.1) if shape.bias else None,
        lora_A=rand(r, K, dt=adapter_dtype, std=1 / math.sqrt(K)).requires_grad_(True),
        lora_B=rand(N, r, dt=adapter_dtype, std=1 / math.sqrt(r)).requires_grad_(True),
        scaling=2.0,  # lora_alpha = 2r, the common choice
    )


@dataclass
class Provider:
    """A provider bound to one case: ``forward(x)`` and the leaves ``backward`` differentiates for x."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]  # trainable leaves besides x (the adapters; empty for ``base``)
    frozen: list[torch.Tensor]  # frozen parameters (W, b): excluded from "saved activation" bytes
    note: str = ""

    def grad_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.params]


def _naive_fn(p: float):
    def naive(x, weight, bias, lora_A, lora_B, scaling):
        x_d = F.dropout(x, p, training=True) if p > 0 else x
        return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_d.to(lora_A.dtype), lora_A), lora_B).to(
            x.dtype)

    return naive


def _peft_layer(case: LayerCase) -> nn.Module:
    """PEFT's LoRA layer around an ``nn.Linear`` that shares W and b, with A and B copied in.

    Built through ``get_peft_model`` on a one-layer module rather than ``peft.tuners.lora.Linear(...)``
    directly: that constructor's signature changed between PEFT releases (0.21 takes a ``config``), the
    public entry point did not. The returned module is PEFT's ``lora.Linear`` itself, called directly,
    so PeftModel's wrapper adds no overhead to the layer numbers.
    """
    from peft import LoraConfig, get_peft_model

    N, K = case.weight.shape
    linear = nn.Linear(K, N, bias=case.bias is not None, device=case.weight.device, dtype=case.weight.dtype)
    linear.weight = nn.Parameter(case.weight, requires_grad=False)
    if case.bias is not None:
        linear.bias = nn.Parameter(case.bias, requires_grad=False)

    class OneLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    r = case.shape.r
    config = LoraConfig(r=r, lora_alpha=case.scaling * r, lora_dropout=case.shape.p, target_modules=["proj"])
    model = get_peft_model(OneLayer(), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        a.to(case.lora_A.dtype)
        b.to(case.lora_B.dtype)
        a.weight.copy_(case.lora_A)
        b.weight.copy_(case.lora_B)
    if not math.isclose(layer.scaling["default"], case.scaling):
        raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {case.scaling}")
    layer.train()
    return layer


def build(name: str, case: LayerCase, backend: str | None = None, fresh_compile: bool = True) -> Provider:
    """Provider ``name`` for ``case``. ``backend`` forces fused-lora's backend ("torch"/"triton").
    ``fresh_compile=False`` keeps dynamo's cache, so a shape compiled before is not compiled again."""
    p, s = case.shape.p, case.scaling
    W, b, A, B = case.weight, case.bias, case.lora_A, case.lora_B
    frozen = [t for t in (W, b) if t is not None]
    if name == "base":
        return Provider(name, lambda x: F.linear(x, W, b), [], frozen)
    if name == "naive":
        fn = _naive_fn(p)
        return Provider(name, lambda x: fn(x, W, b, A, B, s), [A, B], frozen)
    if name == "compile":
        # A fresh dynamo cache per case: the cache is keyed on the code object, and hitting its recompile
        # limit (8 shapes) silently falls back to eager, which would make "compile" measure "naive".
        if fresh_compile:
            torch._dynamo.reset()
        # Donated buffers let the compiled backward reuse saved tensors' memory, which forbids
        # retain_graph=True: the backward-only timing calls backward on one graph repeatedly.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        fn = torch.compile(_naive_fn(p), dynamic=False, fullgraph=True)
        return Provider(name, lambda x: fn(x, W, b, A, B, s), [A, B], frozen, note="inductor, dynamic=False")
    if name == "peft":
        layer = _peft_layer(case)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return Provider(name, layer, params, frozen)
    if name == "fused":
        from fused_lora import fused_lora_linear, resolve_backend

        chosen = resolve_backend(backend, W.device)
        return Provider(name, lambda x: fused_lora_linear(x, W, b, A, B, s, p, backend=chosen), [A, B], frozen,
                        note=f"backend={chosen}")
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
