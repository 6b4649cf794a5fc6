"""``DoRALinearFunction``: the autograd Function of DoRA (weight-decomposed low-rank adaptation; PEFT's
``use_dora=True``) on a dense base.

    y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,     g = magnitude / ‖W + s·B A‖_row

exactly PEFT's semantics (``peft/tuners/lora/dora.py``): the row norm is over in_features per output feature and is
a constant in backward (detached, as PEFT and the paper do); x_d = dropout(x), and x itself when p = 0 or outside
training. With dropout PEFT applies the magnitude correction (g − 1) to the *dropped* input's base product x_d Wᵀ, not
to x Wᵀ: so does this layer.

Saved for backward: x, S = x_d Aᵀ (M×r), P = x_d Wᵀ + s·S Bᵀ (M×N, for the magnitude's gradient; not kept when the
magnitude is frozen), the row norms (N, fp32), the seed, and the parameters. No mask and no dropped copy of x (see
``docs/dora.md``). The backends: ``backends/dora_triton.py`` (kernels ``kernels/dora.py``) and
``backends/dora_torch.py``; ``backward(create_graph=True)`` differentiates ``reference.dora_ref`` with the same mask.
"""

from __future__ import annotations

import torch

from ..backends import dora_torch, dora_triton
from ..dropout import seed_value
from ..reference import dora_ref
from . import paths
from .common import as_2d, as_input_shape, cast_grads, fake_grads, grads_out, s_dtype, without_autocast
from .paths import upcast

IMPLEMENTATIONS = {"torch": dora_torch, "triton": dora_triton}


def _forward_on(path, x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, need_p, keep):
    if path == "torch":
        return dora_torch.forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, need_p,
                                  keep=keep)
    return dora_triton.forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, need_p)


def _backward_on(path, dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, p, seed, weight_layout, needs,
                 keep):
    if path == "torch":
        return dora_torch.backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, p, seed,
                                   weight_layout, *needs, keep=keep)
    return dora_triton.backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, p, seed, weight_layout,
                                *needs)


def run_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, weight_layout, backend, gemm,
                candidates, need_p=True):
    """(y, S, P, the row norms, the path run); on the Triton backend the path is chosen and checked as LoRA's
    (``autograd/paths.py``). ``need_p``: P (M×N, for the magnitude's gradient) formed at all (an empty P when not)."""
    device_type = x.device.type
    if backend == "torch":
        y, s, P, norm = without_autocast(dora_torch.forward, device_type, x, weight, bias, lora_A, lora_B, magnitude,
                                         scaling, p, seed_value(seed), weight_layout, need_p)
        return y, s, P, norm, "torch"
    mask = paths.kernels_mask(seed, x, p)

    def call(path):
        return without_autocast(_forward_on, device_type, path, x, weight, bias, lora_A, lora_B, magnitude, scaling, p,
                                seed, weight_layout, need_p, mask() if path == "torch" else None)

    def ref64():
        return dora_torch.forward(*upcast(x, weight, bias, lora_A, lora_B, magnitude), scaling, p, seed, weight_layout,
                                  need_p, keep=mask())

    (y, s, P, norm), path = paths.forward("dora", x, lora_A, lora_B, weight_layout, weight.shape, gemm, candidates,
                                          call, ref64)
    return y, (s if s.dtype == torch.float32 else s.float()), P, norm, path


def run_backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, p, seed, weight_layout, backend, gemm,
                 candidates, need_dx, need_da, need_db, need_dbias, need_dmag):
    needs = (need_dx, need_da, need_db, need_dbias, need_dmag)
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, torch.float32, magnitude.dtype)
    if backend == "torch":
        grads = without_autocast(dora_torch.backward, dy.device.type, dy, x, weight, lora_A, lora_B, magnitude, s, P,
                                 norm, scaling, p, seed_value(seed), weight_layout, *needs)
        return cast_grads(grads, dtypes)
    mask = paths.kernels_mask(seed, x, p)

    def call(path):
        grads = without_autocast(_backward_on, dy.device.type, path, dy, x, weight, lora_A, lora_B, magnitude, s, P,
                                 norm, scaling, p, seed, weight_layout, needs, mask() if path == "torch" else None)
        return cast_grads(grads, dtypes)

    def ref64():
        x64, w64, a64, b64, m64, dy64 = upcast(x, weight, lora_A, lora_B, magnitude, dy)
        _, s64, p64, norm64 = dora_torch.forward(x64, w64, None, a64, b64, m64, scaling, p, seed, weight_layout,
                                               keep=mask())
        return dora_torch.backward(dy64, x64, w64, a64, b64, m64, s64, p64, norm64, scaling, p, seed, weight_layout,
                                   *needs, keep=mask())

    return paths.backward("dora", x, lora_A, lora_B, weight_layout, weight.shape, gemm, candidates, call, ref64)


@torch.library.custom_op("fused_lora::dora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    magnitude: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str,
    backend: str, gemm: str, candidates: str, need_p: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend,
                       gemm, candidates, need_p)[:4]


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend, gemm, candidates,
      need_p):
    M, N, R = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    return (x.new_empty(M, N), x.new_empty(M, R, dtype=s_dtype(backend, lora_A)),
            x.new_empty((M, N) if need_p else (0,), dtype=lora_B.dtype), x.new_empty(N, dtype=torch.float32))


@torch.library.custom_op("fused_lora::dora_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    magnitude: torch.Tensor, s: torch.Tensor, P: torch.Tensor, norm: torch.Tensor, scaling: float, dropout_p: float,
    seed: torch.Tensor | None, weight_layout: str, backend: str, gemm: str, candidates: str, need_dx: bool,
    need_da: bool, need_db: bool, need_dbias: bool, need_dmag: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return grads_out(dy, run_backward(dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, dropout_p, seed,
                                      weight_layout, backend, gemm, candidates, need_dx, need_da, need_db, need_dbias,
                                      need_dmag))


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, s, P, norm, scaling, dropout_p, seed, weight_layout, backend, gemm,
      candidates, need_dx, need_da, need_db, need_dbias, need_dmag):
    return fake_grads(dy, ((x.shape, x.dtype) if need_dx else None, (lora_A.shape, lora_A.dtype) if need_da else None,
                           (lora_B.shape, lora_B.dtype) if need_db else None,
                           ((lora_B.shape[0],), torch.float32) if need_dbias else None,
                           (magnitude.shape, magnitude.dtype) if need_dmag else None))


def _mask_for(backend: str, seed, shape, p: float, device) -> torch.Tensor | None:
    """The scaled mask the forward used (for the differentiable backward): zeros at p = 1."""
    if p == 0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return IMPLEMENTATIONS[backend].dropout_mask(seed_value(seed), tuple(shape), p, device)


class DoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused DoRA layer. Use ``fused_lora_linear(..., magnitude=m)`` (checked inputs, routed,
    seed drawn) rather than ``apply``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend,
                gemm, candidates):
        # P serves only the magnitude's gradient: with the magnitude frozen the backends neither form nor write it
        args = (as_2d(x), weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_layout, backend,
                gemm, candidates, ctx.needs_input_grad[5])
        if torch.compiler.is_compiling():
            y, s, P, norm = _forward_op(*args)
        else:  # the path run kept for backward
            y, s, P, norm, gemm = run_forward(*args)
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, s, P, norm, seed)
        ctx.scaling, ctx.dropout_p, ctx.weight_layout, ctx.backend = scaling, dropout_p, weight_layout, backend
        ctx.gemm, ctx.candidates = gemm, candidates
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return as_input_shape(y, x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, magnitude, s, P, norm, seed = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # backward(create_graph=True): recompute with differentiable plain ops, same mask
            # The saved inputs are the Function's own inputs, so the gradients taken here reach them (and dY): a
            # second derivative is exact.
            mask = _mask_for(ctx.backend, seed, (x.numel() // x.shape[-1], x.shape[-1]), ctx.dropout_p, x.device)
            y = dora_ref(x, weight, bias, lora_A, lora_B, magnitude, ctx.scaling, weight_layout=ctx.weight_layout,
                         dropout_mask=None if mask is None else mask.view(x.shape))
            wanted = list(zip((x, bias, lora_A, lora_B, magnitude), (need_dx, need_dbias, need_da, need_db, need_dmag),
                              strict=True))
            grads = iter(torch.autograd.grad(y, [t for t, need in wanted if need], dy, create_graph=True))
            dx, dbias, da, db, dmag = (next(grads) if need else None for _, need in wanted)
            return dx, None, dbias, da, db, dmag, None, None, None, None, None, None, None
        args = (as_2d(dy), as_2d(x), weight, lora_A, lora_B, magnitude, s, P, norm, ctx.scaling, ctx.dropout_p, seed,
                ctx.weight_layout, ctx.backend, ctx.gemm, ctx.candidates, need_dx, need_da, need_db, need_dbias,
                need_dmag)
        run = _backward_op if torch.compiler.is_compiling() else run_backward
        dx, da, db, dbias, dmag = run(*args)
        if need_dx and x.dim() != 2:
            dx = dx.view(x.shape)
        if need_dbias and dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
        return (dx if need_dx else None, None, dbias if need_dbias else None, da if need_da else None,
                db if need_db else None, dmag if need_dmag else None, None, None, None, None, None, None, None)
