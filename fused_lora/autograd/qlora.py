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
``"auto"`` times them and the PyTorch path on the first forward of a shape (``gemm_choice``), and a path's first
forward and backward are checked against the PyTorch path (``backends/self_check.py``). Either way the saved
activations are x, S (M×r) and the seed.
"""

from __future__ import annotations

import torch

from ..backends import bnb4_triton, lora_torch, lora_triton
from ..base_layers import DenseBase
from ..dropout import seed_value
from ..reference import plain_backward
from . import paths
from .common import as_2d, without_autocast
from .paths import upcast

IMPLEMENTATIONS = {"torch": lora_torch, "triton": lora_triton}


def _forward_on(path, x2d, base, bias, lora_A, lora_B, scaling, p, seed, keep):
    if path == "fused":
        return bnb4_triton.fused_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed)
    if path == "torch":
        return lora_torch.composed_forward(x2d, base, lora_A, lora_B, scaling, p, seed, keep=keep)
    return lora_triton.composed_forward(x2d, base, lora_A, lora_B, scaling, p, seed)


def _backward_on(path, dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, needs, keep):
    if path == "fused":
        return bnb4_triton.fused_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)
    if path == "torch":
        return lora_torch.composed_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs, keep=keep)
    return lora_triton.composed_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, *needs)


def _dense64(base, bias):
    """The base as an fp64 dense layer on its dequantized weight: the self-check's ground truth."""
    return DenseBase(base.dequantized().double(), None if bias is None else bias.double(), "linear")


def run_forward(x2d, base, bias, lora_A, lora_B, scaling, p, seed, backend, gemm, candidates):
    """(y, S, the path run); ``auto`` resolved here on the first call of a shape, the path checked on its first call
    (``autograd/paths.py``)."""
    device_type = x2d.device.type
    if backend == "torch":
        y, s = without_autocast(lora_torch.composed_forward, device_type, x2d, base, lora_A, lora_B, scaling, p, seed)
        return y, s, "torch"
    mask = paths.kernels_mask(seed, x2d, p)

    def call(path):
        return without_autocast(_forward_on, device_type, path, x2d, base, bias, lora_A, lora_B, scaling, p, seed,
                                mask() if path == "torch" else None)

    def ref64():
        x64, a64, b64 = upcast(x2d, lora_A, lora_B)
        return lora_torch.composed_forward(x64, _dense64(base, bias), a64, b64, scaling, p, seed, keep=mask())

    (y, s), path = paths.forward(f"lora-{base.kind}", x2d, lora_A, lora_B, "linear", base.layer.weight.shape, gemm,
                                 candidates, call, ref64)
    return y, s, path


def run_backward(dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed, backend, gemm, candidates, needs):
    """(dX, dA, dB, dbias), None where not needed."""
    device_type = dy2d.device.type
    if backend == "torch":
        return without_autocast(lora_torch.composed_backward, device_type, dy2d, x2d, base, lora_A, lora_B, s,
                                scaling, p, seed, *needs)
    mask = paths.kernels_mask(seed, x2d, p)

    def call(path):
        return without_autocast(_backward_on, device_type, path, dy2d, x2d, base, lora_A, lora_B, s, scaling, p, seed,
                                needs, mask() if path == "torch" else None)

    def ref64():
        x64, a64, b64, dy64 = upcast(x2d, lora_A, lora_B, dy2d)
        dense = _dense64(base, None)
        _, s64 = lora_torch.composed_forward(x64, dense, a64, b64, scaling, p, seed, keep=mask())
        return lora_torch.composed_backward(dy64, x64, dense, a64, b64, s64, scaling, p, seed, *needs, keep=mask())

    return paths.backward(f"lora-{base.kind}", x2d, lora_A, lora_B, "linear", base.layer.weight.shape, gemm,
                          candidates, call, ref64)


class QuantLoRAFunction(torch.autograd.Function):
    """Autograd Function of LoRA on a quantized base (``base``: a ``base_layers`` object holding the layer). ``bias`` is
    the base layer's bias, passed as an input so that it gets a gradient when it is trained. ``gemm``: the router's
    path (``"auto"``: timed among ``candidates``)."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, base, scaling, dropout_p, seed, backend, gemm, candidates):
        seed_arg = seed_value(seed) if backend == "torch" else seed  # the Triton path keeps it in device memory
        y, s, path = run_forward(as_2d(x), base, bias, lora_A, lora_B, scaling, dropout_p, seed_arg, backend, gemm,
                                 candidates)
        ctx.save_for_backward(x, lora_A, lora_B, s, seed)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.backend, ctx.gemm = base, scaling, dropout_p, backend, path
        ctx.seed_arg, ctx.candidates = seed_arg, candidates
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, s, seed = ctx.saved_tensors
        need_dx, need_dbias, need_da, need_db = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: plain, differentiable ops (the base's dX is linear in dY)
            mask = None
            if ctx.dropout_p > 0:
                mask = IMPLEMENTATIONS[ctx.backend].dropout_mask(ctx.seed_arg, (x.numel() // x.shape[-1],
                                                                                x.shape[-1]), ctx.dropout_p, x.device)
            dx, dbias, da, db = plain_backward(dy, x, lora_A, lora_B, ctx.scaling, mask,
                                               lambda d: ctx.base.input_grad(d, d.dtype), ctx.bias_dtype,
                                               (need_dx, need_dbias, need_da, need_db))
            return dx, dbias, da, db, None, None, None, None, None, None, None
        dx, da, db, dbias = run_backward(as_2d(dy), as_2d(x), ctx.base, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p,
                                         ctx.seed_arg, ctx.backend, ctx.gemm, ctx.candidates,
                                         (need_dx, need_da, need_db, need_dbias))
        return (dx.view(x.shape) if need_dx else None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                da.to(lora_A.dtype) if need_da else None, db.to(lora_B.dtype) if need_db else None,
                None, None, None, None, None, None, None)
