"""LoRA on the PyTorch backend: same semantics as the Triton kernels, for CPU tensors (and anywhere a user forces it,
or a kernel cannot run).

Like the kernels it keeps no M×K tensor beside x for backward: the dropout mask is regenerated from a
seeded ``torch.Generator`` (``dropout.keep_mask``) in backward (once, shared by dX and dA) instead of saving the mask or
the dropped copy of x as PEFT does. The base GEMM and the rank-r update are chained with in-place
``addmm_`` so y is written once when the adapters share x's dtype. The base is any base object (a dense weight, or a
quantized kind's: ``fused_lora/bases/``): ``forward``/``backward`` are the dense case, inlined (its host cost is what
small layers pay on CPU); ``native_forward`` is the dense case without dropout as plain autograd ops. The passes take
the call record and the call's tensors (``fused_lora.call``).
"""

from __future__ import annotations

import torch

from ..bases import Pass
from ..call import Call, Operands, Seed
from ..dropout import keep_mask
from .dense_base import DenseBase


def scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · (a @ b). (An addmm of a cached zero with beta=0 is one op instead of two, 2.6 µs against 4.2 at 4×64
    on one thread, but at M = 1 MKL sums it by another route with twice the rounding error: 3e-4 against 1.4e-4
    at 1×4096×4, enough to fail test_adversarial.test_very_wide; accuracy first.)"""
    return (a @ b).mul_(alpha)


def _keep_as(keep: torch.Tensor | None, seed: int, x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 keep mask in ``dtype`` (this backend's for ``seed``, or the given boolean one). Products then take x ·
    keep, not torch.where(keep, x, 0): a NaN/Inf at a dropped element stays NaN (NaN·0), as in the reference, the
    kernels and nn.Dropout. Converted once: a bool operand is converted inside every product that takes it (x·bool
    cost 2× x·float at 2048×1024, 2 threads), and the backward uses the mask twice."""
    if keep is None:
        keep = keep_mask(seed, tuple(x.shape), p, x.device)
    return keep.to(dtype)


def down(x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None):
    """S = dropout(x) Aᵀ in the adapters' dtype, and x in the adapters' dtype (for the caller's own use)."""
    x_a = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    if p == 0:
        return torch.nn.functional.linear(x_a, lora_A), x_a
    # (keep ⊙ x) Aᵀ / (1-p): the 1/(1-p) goes on the M×r result, not on an M×K tensor.
    return scaled_mm(x_a * _keep_as(keep, seed, x, p, x_a.dtype), lora_A.t(), 1.0 / (1.0 - p)), x_a


def add_up(y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y += scaling · S Bᵀ in place; fp32 adapters on a half base: computed in fp32, rounded once (as PEFT)."""
    if lora_B.dtype == y.dtype:
        return y.addmm_(s, lora_B.t(), alpha=scaling)
    return y.add_(scaled_mm(s, lora_B.t(), scaling).to(y.dtype))


def composed_forward(t: Operands, call: Call, seed: Seed, keep: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) + scaling · dropout(x) Aᵀ Bᵀ for any base object (``t.base``: its ``forward`` is the layer's own; a
    dense base when None). Returns (y M×N in the base's output dtype, S = dropout(x) Aᵀ M×r in the adapters' dtype).
    ``keep``: a boolean keep mask to use instead of this backend's own (the kernels' mask, when this path runs on the
    Triton backend)."""
    base = t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)
    s, _ = down(t.x, t.lora_A, call.p, seed, keep)
    return add_up(base.forward(t.x), s, t.lora_B, call.scaling), s


def forward(t: Operands, call: Call, seed: Seed, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`composed_forward` on a dense weight (either layout), inlined: this is the CPU path of every call, and
    its host cost is what small layers pay."""
    x, weight, bias = t.x, t.weight, t.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if call.layout == "linear":
        y = torch.nn.functional.linear(x, weight, bias)
    else:
        y = x @ weight if bias is None else torch.addmm(bias, x, weight)
    s, _ = down(x, t.lora_A, call.p, seed, keep)
    return add_up(y, s, t.lora_B, call.scaling), s


def branch_backward(dy, x, lora_A, lora_B, s, scaling, p, seed, need_dx, need_da, need_db, need_dbias, keep):
    """(dS A or None, the 0/1 keep mask or None, dA, dB, dbias): the LoRA branch's share of the gradients, the mask
    regenerated once. The 1/(1-p) of dropout is folded into dS (M×r), not applied to an M×K tensor; the mask is
    applied to dS A where it is added into dX (:func:`add_masked`). Shared with the multi-adapter path, per segment."""
    da = db = dbias = lora_dx = keep_f = None
    dy_lora = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
    if need_db:
        db = scaled_mm(dy_lora.t(), s if s.dtype == lora_B.dtype else s.to(lora_B.dtype), scaling)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    if not (need_dx or need_da):
        return lora_dx, keep_f, da, db, dbias
    ds = scaled_mm(dy_lora, lora_B, scaling if p == 0 else scaling / (1.0 - p))
    if p > 0:
        keep_f = _keep_as(keep, seed, x, p, lora_A.dtype)
    if need_da:
        x_a = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
        da = ds.t() @ (x_a if keep_f is None else x_a * keep_f)
    if need_dx:
        lora_dx = ds @ lora_A
    return lora_dx, keep_f, da, db, dbias


def add_masked(dx: torch.Tensor, lora_dx: torch.Tensor, keep_f: torch.Tensor | None) -> torch.Tensor:
    """dX += m ⊙ (dS A) in place: one fused multiply-add over M×K when the dtypes agree (addcmul_: one pass where
    multiply then add took two); fp32 adapters on a half dX: masked in fp32, rounded once."""
    if keep_f is None:
        return dx.add_(lora_dx if lora_dx.dtype == dx.dtype else lora_dx.to(dx.dtype))
    if lora_dx.dtype == dx.dtype:
        return dx.addcmul_(lora_dx, keep_f)
    return dx.add_((lora_dx * keep_f).to(dx.dtype))


def composed_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """Returns (dX, dA, dB, dbias), None where not needed: dX is the base's input gradient with m ⊙ (dS A) added in
    place. The mask is regenerated once, for dA and dX (or ``keep`` is used, as in :func:`composed_forward`)."""
    lora_dx, keep_f, da, db, dbias = branch_backward(dy, t.x, t.lora_A, t.lora_B, saved[0], call.scaling, call.p, seed,
                                                     *needs, keep)
    dx = None
    if needs[0]:
        base = t.base if t.base is not None else DenseBase(t.weight, t.bias, call.layout)
        dx = add_masked(base.input_grad(dy, t.x.dtype), lora_dx, keep_f)
    return dx, da, db, dbias


def backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """:func:`composed_backward` on a dense weight (either layout). dX = dY W, then m ⊙ (dS A) added in place (one
    addmm with dS A as its input was an op cheaper, but summed differently: 3× PyTorch's error at M = 1, K = 4096,
    test_adversarial.test_very_wide)."""
    lora_dx, keep_f, da, db, dbias = branch_backward(dy, t.x, t.lora_A, t.lora_B, saved[0], call.scaling, call.p, seed,
                                                     *needs, keep)
    dx = None
    if needs[0]:
        weight = t.weight
        dx = add_masked(dy @ (weight if call.layout == "linear" else weight.t()), lora_dx, keep_f)  # W is N×K
        if dx.dtype != t.x.dtype:
            dx = dx.to(t.x.dtype)
    return dx, da, db, dbias


DENSE = Pass(forward, backward)  # the dense kind's PyTorch path
COMPOSED = Pass(composed_forward, composed_backward)  # any base object's PyTorch path


def native_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, weight_layout: str) -> torch.Tensor:
    """The dense layer without dropout as plain autograd ops (no Function): :func:`forward`'s arithmetic (the base
    GEMM, S = x Aᵀ, the rank-r update added in place), N-D inputs through a 2-D view and back without a view (as
    torch.matmul). With adapters in x's dtype, PyTorch's own autograd saves what the Function would (x and S; the
    frozen W's GEMM saves nothing more) and runs its backward in C++: no Python Function, the host cost of small
    layers."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y, _ = _native_call(x2d, weight, bias, lora_A, lora_B, scaling, weight_layout)
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def _native_call(x, weight, bias, lora_A, lora_B, scaling, layout):
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = torch.nn.functional.linear(x, weight, bias) if layout == "linear" else (
        x @ weight if bias is None else torch.addmm(bias, x, weight))
    s = torch.nn.functional.linear(x if x.dtype == lora_A.dtype else x.to(lora_A.dtype), lora_A)
    return add_up(y, s, lora_B, scaling), s
