"""DoRA (weight-decomposed low-rank adaptation; PEFT's ``use_dora=True``): the autograd Function and the entry point
``fused_lora_linear(..., magnitude=m)`` goes through.

    y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,     g = magnitude / ‖W + s·B A‖_row

exactly PEFT's semantics (``peft/tuners/lora/dora.py``): the row norm is over in_features per output feature and is
a constant in backward (detached, as PEFT and the paper do); x_d = dropout(x), and x itself when p = 0 or outside
training. With dropout PEFT applies the magnitude correction (g − 1) to the *dropped* input's base product x_d Wᵀ, not
to x Wᵀ: so does this layer.

Saved for backward: x, S = x_d Aᵀ (M×r), P = x_d Wᵀ + s·S Bᵀ (M×N, for the magnitude's gradient), the squared row
norms (N), the seed, and the parameters. No mask and no dropped copy of x (see ``docs/dora.md``).

The module's path: ``LoRALinear(use_dora=True)`` → ``dora_call`` → :class:`DoRALinearFunction` → ``dora_ops``
(Triton launchers) or ``dora_torch`` (PyTorch path) → ``kernels/dora.py``.
"""

from __future__ import annotations

import torch

from . import dora_torch
from .backend import resolve_backend, resolve_gemm, warn_fallback
from .functional import _s_dtype, _seed_value, draw_dropout_seed, in_function_transform, without_autocast


def _ops(backend: str):
    if backend == "triton":
        from . import dora_ops

        return dora_ops
    return dora_torch


def _run_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, backend):
    y, s, P, sq = without_autocast(_ops(backend).forward, x.device.type, x, weight, bias, lora_A, lora_B, magnitude,
                               scaling, p, _seed_value(seed), weight_layout)
    s_dtype = _s_dtype(backend, lora_A)
    return y, (s if s.dtype == s_dtype else s.to(s_dtype)), P, sq


def _run_backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, sq, scaling, p, seed, weight_layout, backend,
                  need_dx, need_da, need_db, need_dbias, need_dmag):
    grads = without_autocast(_ops(backend).backward, dy.device.type, dy, x, weight, lora_A, lora_B, magnitude, s, P, sq,
                         scaling, p, _seed_value(seed), weight_layout, need_dx, need_da, need_db, need_dbias,
                         need_dmag)
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, torch.float32, magnitude.dtype)
    return tuple(g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, dtypes, strict=True))


# Custom ops for torch.compile (one opaque node per direction, as the LoRA Function's); eager calls skip the dispatch.
@torch.library.custom_op("fused_lora::dora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    magnitude: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend):
    M, N, R = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    return (x.new_empty(M, N), x.new_empty(M, R, dtype=_s_dtype(backend, lora_A)),
            x.new_empty(M, N, dtype=lora_B.dtype), x.new_empty(N, dtype=torch.float32))


@torch.library.custom_op("fused_lora::dora_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    magnitude: torch.Tensor, s: torch.Tensor, P: torch.Tensor, sq: torch.Tensor, scaling: float, dropout_p: float,
    seed: torch.Tensor | None, weight_layout: str, backend: str, need_dx: bool, need_da: bool, need_db: bool,
    need_dbias: bool, need_dmag: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _run_backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, sq, scaling, dropout_p, seed, weight_layout,
                          backend, need_dx, need_da, need_db, need_dbias, need_dmag)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, s, P, sq, scaling, dropout_p, seed, weight_layout, backend,
      need_dx, need_da, need_db, need_dbias, need_dmag):
    empty = dy.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_da else empty,
            lora_B.new_empty(lora_B.shape) if need_db else empty,
            dy.new_empty(lora_B.shape[0], dtype=torch.float32) if need_dbias else empty,
            magnitude.new_empty(magnitude.shape) if need_dmag else empty)


def _mask_for(backend: str, seed, shape, p: float, device) -> torch.Tensor | None:
    """The scaled mask the forward used (for the differentiable backward): zeros at p = 1."""
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    from .backend import backend_ops

    return backend_ops(backend).dropout_mask(_seed_value(seed), tuple(shape), p, device)


class DoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused DoRA layer. Use ``fused_lora_linear(..., magnitude=m)`` (checked inputs, seed
    drawn) rather than ``apply``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        run = _forward_op if torch.compiler.is_compiling() else _run_forward
        y, s, P, sq = run(x2d, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout,
                          backend)
        # P serves only the magnitude's gradient: a frozen magnitude keeps no M×N tensor
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, s, P if ctx.needs_input_grad[5] else
                              P.new_empty(0), sq, seed)
        ctx.scaling, ctx.dropout_p, ctx.weight_layout, ctx.backend = scaling, dropout_p, weight_layout, backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], lora_B.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, magnitude, s, P, sq, seed = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # backward(create_graph=True): recompute with differentiable plain ops, same mask
            # The saved inputs are the Function's own inputs, so the gradients taken here reach them (and dY): a
            # second derivative is exact.
            mask = _mask_for(ctx.backend, seed, (x.numel() // x.shape[-1], x.shape[-1]), ctx.dropout_p, x.device)
            y = dora_torch.dora_ref(x, weight, bias, lora_A, lora_B, magnitude, ctx.scaling,
                                           weight_layout=ctx.weight_layout,
                                           dropout_mask=None if mask is None else mask.view(x.shape))
            wanted = list(zip((x, bias, lora_A, lora_B, magnitude), (need_dx, need_dbias, need_da, need_db, need_dmag),
                              strict=True))
            grads = iter(torch.autograd.grad(y, [t for t, need in wanted if need], dy, create_graph=True))
            dx, dbias, da, db, dmag = (next(grads) if need else None for _, need in wanted)
            return dx, None, dbias, da, db, dmag, None, None, None, None, None
        two_d = x.dim() == 2
        args = (dy if two_d else dy.reshape(-1, dy.shape[-1]), x if two_d else x.reshape(-1, x.shape[-1]), weight,
                lora_A, lora_B, magnitude, s, P, sq, ctx.scaling, ctx.dropout_p, seed, ctx.weight_layout, ctx.backend,
                need_dx, need_da, need_db, need_dbias, need_dmag)
        if torch.compiler.is_compiling():
            dx, da, db, dbias, dmag = _backward_op(*args)
        else:
            dx, da, db, dbias, dmag = _run_backward(*args)
        if need_dx and not two_d:
            dx = dx.view(x.shape)
        if need_dbias and dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
        return (dx if need_dx else None, None, dbias if need_dbias else None, da if need_da else None,
                db if need_db else None, dmag if need_dmag else None, None, None, None, None, None)


def _plain_ops(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, weight_layout) -> torch.Tensor:
    """PEFT's DoRA forward op for op, for torch.func transforms and forward-mode AD (dropout by nn.functional)."""
    return dora_torch.dora_ref(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, p > 0, weight_layout)


def dora_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, weight_layout: str,
              dropout_seed: int | None = None, backend: str | None = None) -> torch.Tensor:
    """``fused_lora_linear(..., magnitude=m)`` after its input checks: ``p`` is the dropout applied (0 outside
    training), autocast already applied to x, W and b."""
    if in_function_transform((x, weight, bias, lora_A, lora_B, magnitude)):
        return _plain_ops(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, weight_layout)
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "triton" and resolve_gemm(x.device) == "composed":
        # Turing: the DoRA kernels are fused-GEMM only (Triton's dots are FMA there); cuBLAS through the PyTorch path.
        warn_fallback(f"{x.device} runs LoRA's composed path (cuBLAS base GEMM); DoRA has no composed kernels: running "
                      "the PyTorch path")
        name = "torch"
    seed = None
    if p > 0:
        seed = draw_dropout_seed() if dropout_seed is None else torch.tensor([int(dropout_seed)])
    return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, name)


@torch.no_grad()
def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_layout: str) -> torch.Tensor:
    """‖W + s·B A‖ per output row as PEFT's ``DoraLinearLayer.update_layer`` computes the initial magnitude: in the
    weight's dtype (B A rounded to it first, the norm rounded to it), so a fresh layer's ``lora_magnitude_vector``
    equals PEFT's bit for bit (‖W‖ per row with PEFT's zero-initialized B)."""
    w = dora_torch._w_nk(weight, weight_layout)
    lora_weight = (lora_B.float() @ lora_A.float()).to(w.dtype)
    return torch.linalg.norm(w + scaling * lora_weight, dim=1).to(w.dtype)
