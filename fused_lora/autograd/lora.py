"""``LoRALinearFunction``: the autograd Function of LoRA on a dense base (nn.Linear / Conv1D weight).

    y = x Wᵀ + b + scaling · B A dropout(x)

Saved for backward: x, S = dropout(x) Aᵀ (M×r), the dropout seed, and the parameters. No mask and no dropped copy of
x: the backward regenerates the mask from the seed. The route (backend: "torch" / "triton"; GEMM: "fused" /
"composed" / "auto") comes from the router (``dispatch.py``); ``auto`` is resolved at the first forward of a shape by
``gemm_choice``. ``backward(create_graph=True)`` takes a differentiable backward made of plain ops
(``reference.plain_backward``, same mask).
"""

from __future__ import annotations

import torch

from ..backends import lora_torch, lora_triton
from ..dropout import seed_value
from ..reference import plain_backward
from . import paths
from .common import as_2d, as_input_shape, cast_grads, fake_grads, grads_out, s_dtype, without_autocast
from .paths import upcast

IMPLEMENTATIONS = {"torch": lora_torch, "triton": lora_triton}


def _forward_on(path, x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout, keep):
    if path == "torch":
        return lora_torch.forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout, keep=keep)
    return lora_triton.forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout, path)


def _backward_on(path, dy, x, weight, lora_A, lora_B, s, scaling, p, seed, weight_layout, needs, keep):
    if path == "torch":
        return lora_torch.backward(dy, x, weight, lora_A, lora_B, s, scaling, p, seed, weight_layout, *needs,
                                   keep=keep)
    return lora_triton.backward(dy, x, weight, lora_A, lora_B, s, scaling, p, seed, weight_layout, *needs, path)


def run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm, candidates):
    """(y, S in its dtype, the path run), autocast off (``without_autocast``). The PyTorch backend draws its own mask
    (from the seed read on the host); within the Triton backend every path applies the kernels' (``autograd/paths.py``),
    whose seed stays in device memory."""
    device_type = x.device.type
    if backend == "torch":
        y, s = without_autocast(lora_torch.forward, device_type, x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                seed_value(seed), weight_layout)
        return y, s, "torch"
    mask = paths.kernels_mask(seed, x, dropout_p)

    def call(path):
        return without_autocast(_forward_on, device_type, path, x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                seed, weight_layout, mask() if path == "torch" else None)

    def ref64():
        x64, w64, b64, a64, b64_ = upcast(x, weight, bias, lora_A, lora_B)
        return lora_torch.forward(x64, w64, b64, a64, b64_, scaling, dropout_p, seed, weight_layout, keep=mask())

    (y, s), path = paths.forward("lora", x, lora_A, lora_B, weight_layout, weight.shape, gemm, candidates, call, ref64)
    return y, (s if s.dtype == torch.float32 else s.float()), path


def run_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout, backend, gemm, candidates,
                 need_dx, need_da, need_db, need_dbias):
    """(dX, dA, dB, dbias fp32), None where not needed; autocast off as in :func:`run_forward`. ``gemm``: the path the
    forward ran (or ``auto`` under torch.compile: the kept choice)."""
    needs = (need_dx, need_da, need_db, need_dbias)
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, torch.float32)
    if backend == "torch":
        grads = without_autocast(lora_torch.backward, dy.device.type, dy, x, weight, lora_A, lora_B, s, scaling,
                                 dropout_p, seed_value(seed), weight_layout, *needs)
        return cast_grads(grads, dtypes)
    mask = paths.kernels_mask(seed, x, dropout_p)

    def call(path):
        grads = without_autocast(_backward_on, dy.device.type, path, dy, x, weight, lora_A, lora_B, s, scaling,
                                 dropout_p, seed, weight_layout, needs, mask() if path == "torch" else None)
        return cast_grads(grads, dtypes)

    def ref64():
        x64, w64, a64, b64, dy64 = upcast(x, weight, lora_A, lora_B, dy)
        _, s64 = lora_torch.forward(x64, w64, None, a64, b64, scaling, dropout_p, seed, weight_layout, keep=mask())
        return lora_torch.backward(dy64, x64, w64, a64, b64, s64, scaling, dropout_p, seed, weight_layout, *needs,
                                   keep=mask())

    return paths.backward("lora", x, lora_A, lora_B, weight_layout, weight.shape, gemm, candidates, call, ref64)


@torch.library.custom_op("fused_lora::lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str, backend: str, gemm: str,
    candidates: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm,
                       candidates)[:2]


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm, candidates):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0],
                                                                 dtype=s_dtype(backend, lora_A))


@torch.library.custom_op("fused_lora::lora_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str,
    backend: str, gemm: str, candidates: str, need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX in x's dtype, dA in A's, dB in B's, dbias fp32); an empty tensor for each one not needed."""
    return grads_out(dy, run_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout,
                                      backend, gemm, candidates, need_dx, need_da, need_db, need_dbias))


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout, backend, gemm, candidates,
      need_dx, need_da, need_db, need_dbias):
    return fake_grads(dy, ((x.shape, x.dtype) if need_dx else None, (lora_A.shape, lora_A.dtype) if need_da else None,
                           (lora_B.shape, lora_B.dtype) if need_db else None,
                           ((lora_B.shape[0],), torch.float32) if need_dbias else None))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused LoRA linear layer. Use :func:`fused_lora.fused_lora_linear`, which validates
    its inputs, routes the call and draws the dropout seed, rather than calling ``apply`` directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm,
                candidates):
        x2d = as_2d(x)
        if torch.compiler.is_compiling():
            y, s = _forward_op(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend,
                               gemm, candidates)
        else:  # the path run kept for backward; the PyTorch path's seed read on the host once, for backward too
            ctx.seed_arg = seed_value(seed) if backend == "torch" else seed
            y, s, gemm = run_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, ctx.seed_arg,
                                     weight_layout, backend, gemm, candidates)
        # x itself, not its 2-D view: an input of the Function stays connected to the graph when a backward with
        # create_graph=True reads it back (a view made in here would not be).
        ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed)
        ctx.scaling, ctx.dropout_p, ctx.weight_layout, ctx.backend = scaling, dropout_p, weight_layout, backend
        ctx.gemm, ctx.candidates = gemm, candidates
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return as_input_shape(y, x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # backward(create_graph=True): a backward that is itself differentiable
            w = weight if ctx.weight_layout == "linear" else weight.t()  # N×K
            mask = None
            if ctx.dropout_p > 0:
                mask = IMPLEMENTATIONS[ctx.backend].dropout_mask(seed_value(seed), (x.numel() // x.shape[-1],
                                                                                    x.shape[-1]), ctx.dropout_p,
                                                                 x.device)
            dx, dbias, da, db = plain_backward(dy, x, lora_A, lora_B, ctx.scaling, mask, lambda d: d @ w.to(d.dtype),
                                               ctx.bias_dtype, (need_dx, need_dbias, need_da, need_db))
            return dx, None, dbias, da, db, None, None, None, None, None, None, None
        compiling = torch.compiler.is_compiling()
        args = (as_2d(dy), as_2d(x), weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p,
                seed if compiling else ctx.seed_arg, ctx.weight_layout, ctx.backend, ctx.gemm, ctx.candidates, need_dx,
                need_da, need_db, need_dbias)
        dx, da, db, dbias = _backward_op(*args) if compiling else run_backward(*args)
        if need_dx and x.dim() != 2:
            dx = dx.view(x.shape)
        if need_dbias and dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, dbias, da, db, None, None, None, None, None, None, None
