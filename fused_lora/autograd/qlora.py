"""``QuantLoRAFunction``: the autograd Function of LoRA on a quantized base (bitsandbytes ``Linear4bit`` /
``Linear8bitLt``; ``base_layers``).

    y = base(x) + scaling · B A dropout(x)

Two ways to compute it (the router's GEMM column, ``dispatch.py``):
- ``"composed"`` (either backend, any bitsandbytes base): the base layer's own matmul (exactly what the layer
  computes), then the LoRA branch added in place into its output (``lora_triton.composed_*``, or ``lora_torch``'s on
  the PyTorch path); in backward the base's input gradient (dY · dequantized W, as bitsandbytes' own backward) with
  m ⊙ (dS A) added in place.
- ``"fused"`` (Triton, 4-bit base, x already in the layer's compute dtype): the 4-bit weight dequantized in registers
  inside the base GEMM's K-loop with the rank-r term in its accumulator (``bnb4_triton``): forward 2 launches,
  backward 3, no dequantized copy of W at all.
``"auto"`` times both on the first forward of a shape (``gemm_choice``). Either way the saved activations are x, S
(M×r) and the seed.
"""

from __future__ import annotations

import torch

from ..backends import bnb4_triton, gemm_choice, lora_torch, lora_triton
from ..dropout import seed_value
from ..reference import plain_backward
from .common import as_2d, without_autocast

IMPLEMENTATIONS = {"torch": lora_torch, "triton": lora_triton}


def _key(x2d, lora_A, lora_B):
    return lambda: gemm_choice.key("lora-bnb4", x2d, lora_A, lora_B, "linear")


def _forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed, backend, gemm):
    if gemm == "fused":
        return bnb4_triton.fused_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed)
    return IMPLEMENTATIONS[backend].composed_forward(x2d, base, lora_A, lora_B, scaling, p, seed)


def _backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, backend, gemm, needs):
    if gemm == "fused":
        return bnb4_triton.fused_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)
    return IMPLEMENTATIONS[backend].composed_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)


def run_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed, backend, gemm):
    """(y, S, the GEMM run); ``auto`` resolved here on the first call of a shape."""
    def call(g):
        return without_autocast(_forward, x2d.device.type, x2d, base, bias, lora_A, lora_B, scaling, p, seed,
                                backend, g)

    gemm = gemm_choice.resolve(gemm, _key(x2d, lora_A, lora_B), x2d.device, call)
    return (*call(gemm), gemm)


class QuantLoRAFunction(torch.autograd.Function):
    """Autograd Function of LoRA on a quantized base (``base``: a ``base_layers`` object holding the layer). ``bias`` is
    the base layer's bias, passed as an input so that it gets a gradient when it is trained."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, base, scaling, dropout_p, seed, backend, gemm):
        y, s, gemm = run_forward(as_2d(x), base, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed), backend,
                                 gemm)
        ctx.save_for_backward(x, lora_A, lora_B, s, seed)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.backend, ctx.gemm = base, scaling, dropout_p, backend, gemm
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, s, seed = ctx.saved_tensors
        need_dx, need_dbias, need_da, need_db = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: plain, differentiable ops (the base's dX is linear in dY)
            mask = None
            if ctx.dropout_p > 0:
                mask = IMPLEMENTATIONS[ctx.backend].dropout_mask(seed_value(seed), (x.numel() // x.shape[-1],
                                                                                    x.shape[-1]), ctx.dropout_p,
                                                                 x.device)
            dx, dbias, da, db = plain_backward(dy, x, lora_A, lora_B, ctx.scaling, mask,
                                               lambda d: ctx.base.input_grad(d, d.dtype), ctx.bias_dtype,
                                               (need_dx, need_dbias, need_da, need_db))
            return dx, dbias, da, db, None, None, None, None, None, None
        dx, da, db, dbias = without_autocast(_backward, dy.device.type, as_2d(dy), as_2d(x), ctx.base, lora_A, lora_B,
                                             s, ctx.scaling, ctx.dropout_p, seed_value(seed), ctx.backend, ctx.gemm,
                                             (need_dx, need_da, need_db, need_dbias))
        return (dx.view(x.shape) if need_dx else None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                da.to(lora_A.dtype) if need_da else None, db.to(lora_B.dtype) if need_db else None,
                None, None, None, None, None, None)
