"""The variants the driver runs, each a small spec (in the spirit of PEFT's ``LoraVariant``): what its forward saves,
which gradients its backward returns, its differentiable backward for ``create_graph=True``, what its references need
recomputed, and the shapes its custom ops return under ``torch.compile``. The computations themselves are the passes
each base kind registers for the variant (``fused_lora/bases/``); the driver (``autograd/driver.py``) runs them.

    LoRA   y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ                         saves S = x_d Aᵀ
    DoRA   y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s · (x_d Aᵀ) Bᵀ,   g = m / ‖W + s·B A‖_row (detached)
                                                                  saves S, P = x_d Wᵀ + s·S Bᵀ, the row norms

The Function's inputs are (call, x, weight, bias, lora_A, lora_B, magnitude, seed, base); the passes' gradients come in
the order (dX, dA, dB, dbias[, d magnitude]).
"""

from __future__ import annotations

import torch

from ..backends.dora_torch import weight_norm
from ..call import Call, Operands
from ..reference import dora_ref, plain_backward, weight_nk

# Function input positions (ctx.needs_input_grad)
X, WEIGHT, BIAS, LORA_A, LORA_B, MAGNITUDE = 1, 2, 3, 4, 5, 6


def down(x: torch.Tensor, lora_A: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """S = dropout(x) Aᵀ in the adapters' dtype (fp64 when they are), ``keep`` the boolean keep mask of x's rows: the
    references' S, recomputed from x (the PyTorch path's arithmetic: the mask on x, 1/(1-p) on the M×r product)."""
    x_a = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    if keep is None:
        return x_a @ lora_A.t()
    return (x_a * keep.to(x_a.dtype)) @ lora_A.t() * (1.0 / (1.0 - p))


class Variant:
    """What the driver needs to know of a variant (see the module docstring)."""

    name: str
    grad_names: tuple[str, ...]
    output_names: tuple[str, ...]  # forward's: y, then what backward reads
    row_outputs: frozenset[str]  # outputs whose rows follow x's (checked on sampled rows)
    saves_bias: bool = False  # whether backward(create_graph=True) reads the bias itself (not only its dtype)

    def needs(self, needs_input_grad: tuple[bool, ...]) -> tuple[bool, ...]:
        n = needs_input_grad
        return n[X], n[LORA_A], n[LORA_B], n[BIAS]

    def forward_kwargs(self, needs_input_grad: tuple[bool, ...]) -> dict:
        return {}

    def grad_dtypes(self, t: Operands) -> tuple[torch.dtype, ...]:
        return t.x.dtype, t.lora_A.dtype, t.lora_B.dtype, torch.float32

    def fake_outputs(self, t: Operands, call: Call, kwargs: dict) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def blind(self, t: Operands, outputs: tuple) -> bool:
        """Whether a check of this call cannot see every kernel term: B = 0 zeroes the rank-r term of y, dS, dA and
        dX's masked term (PEFT's default init)."""
        return not bool(t.lora_B.detach().any())

    def state(self, t: Operands) -> tuple:
        """What changes when the optimizer moves B (or the magnitude): a blind check is owed again once it changes."""
        b = t.lora_B
        return (b.data_ptr(), b._version)

    def recomputed(self, t: Operands, call: Call, keep: torch.Tensor | None, saved_got: tuple, fp64: bool) -> tuple:
        """What the PyTorch path's backward reads (the forward's saved tensors) recomputed for the rows of ``t`` (x and
        the adapters already in the reference's dtype)."""
        return (down(t.x, t.lora_A, keep, call.p),)

    def differentiable_backward(self, call: Call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude,
                                mask, needs) -> tuple:
        """``backward(create_graph=True)``: the gradients (dX, dA, dB, dbias[, dmag]) as plain differentiable ops with
        the forward's mask (scaled, fp32, M×K)."""
        raise NotImplementedError


class LoRA(Variant):
    name = "lora"
    grad_names = ("dx", "dA", "dB", "dbias")
    output_names = ("y", "S")
    row_outputs = frozenset({"y", "S"})

    def fake_outputs(self, t, call, kwargs):
        s_dtype = torch.float32 if call.backend == "triton" else t.lora_A.dtype
        M = t.x.shape[0]
        return t.x.new_empty(M, t.out_features), t.x.new_empty(M, t.lora_A.shape[0], dtype=s_dtype)

    def differentiable_backward(self, call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude, mask,
                                needs):
        need_dx, need_da, need_db, need_dbias = needs
        if weight is not None:
            w = weight_nk(weight, call.layout)
            base_dx = lambda d: d @ w.to(d.dtype)  # noqa: E731
        else:  # the base's dX is linear in dY: its plain ops are differentiable
            base_dx = lambda d: base.input_grad(d, d.dtype)  # noqa: E731
        dx, dbias, da, db = plain_backward(dy, x, lora_A, lora_B, call.scaling, mask, base_dx, bias_dtype,
                                           (need_dx, need_dbias, need_da, need_db))
        return dx, da, db, dbias


class DoRA(Variant):
    name = "dora"
    grad_names = ("dx", "dA", "dB", "dbias", "dmag")
    output_names = ("y", "S", "P", "norm")
    row_outputs = frozenset({"y", "S", "P"})
    saves_bias = True

    def needs(self, needs_input_grad):
        return (*super().needs(needs_input_grad), needs_input_grad[MAGNITUDE])

    def forward_kwargs(self, needs_input_grad):
        # P serves only the magnitude's gradient: with the magnitude frozen the passes neither form nor write it
        return {"need_p": needs_input_grad[MAGNITUDE]}

    def grad_dtypes(self, t):
        return (*super().grad_dtypes(t), t.magnitude.dtype)

    def fake_outputs(self, t, call, kwargs):
        s_dtype = torch.float32 if call.backend == "triton" else t.lora_A.dtype
        M, N, R = t.x.shape[0], t.out_features, t.lora_A.shape[0]
        return (t.x.new_empty(M, N), t.x.new_empty(M, R, dtype=s_dtype),
                t.x.new_empty((M, N) if kwargs.get("need_p", True) else (0,), dtype=t.lora_B.dtype),
                t.x.new_empty(N, dtype=torch.float32))

    def blind(self, t, outputs):
        # g = m / ‖W + s·B A‖ is exactly 1 at PEFT's init: the (g − 1) terms vanish until the magnitude moves
        norm = outputs[3]
        return super().blind(t, outputs) or bool((t.magnitude.detach().float() == norm).all())

    def state(self, t):
        m = t.magnitude
        return (*super().state(t), m.data_ptr(), m._version)

    def recomputed(self, t, call, keep, saved_got, fp64):
        # P (M×N) would cost the base GEMM over every row: the backward's reference takes the forward's, which the
        # forward's check compared on its sampled rows; S and the norms are recomputed.
        P = saved_got[1]
        norm = weight_norm(t.weight, t.lora_A, t.lora_B, call.scaling, call.layout)
        return down(t.x, t.lora_A, keep, call.p), (P.double() if fp64 else P), norm

    def differentiable_backward(self, call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude, mask,
                                needs):
        # The saved inputs are the Function's own inputs, so the gradients taken here reach them (and dY): a second
        # derivative is exact.
        y = dora_ref(x, weight, bias, lora_A, lora_B, magnitude, call.scaling, weight_layout=call.layout,
                     dropout_mask=None if mask is None else mask.view(x.shape))
        need_dx, need_da, need_db, need_dbias, need_dmag = needs
        wanted = [(x, need_dx), (lora_A, need_da), (lora_B, need_db), (bias, need_dbias), (magnitude, need_dmag)]
        grads = iter(torch.autograd.grad(y, [t for t, need in wanted if need], dy, create_graph=True))
        return tuple(next(grads) if need else None for _, need in wanted)


LORA, DORA = LoRA(), DoRA()
VARIANTS = {v.name: v for v in (LORA, DORA)}
