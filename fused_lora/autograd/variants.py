"""The variants the driver runs, each a small spec (in the spirit of PEFT's ``LoraVariant``): what its forward saves,
which gradients its backward returns, its differentiable backward for ``create_graph=True``, what its references need
recomputed, and the shapes its custom ops return under ``torch.compile``. The computations themselves are the passes
each base kind registers for the variant (``fused_lora/bases/``); the driver (``autograd/driver.py``) runs them.

    LoRA   y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ                         saves S = x_d Aᵀ
    DoRA   y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s · (x_d Aᵀ) Bᵀ,   g = m / ‖W + s·B A‖_row (detached)
                                                                  saves S, P = x_d Wᵀ + s·S Bᵀ, the row norms
    Multi  y_i = x_i Wᵀ + b(_i) + s_i · (x_i,d A_iᵀ) B_iᵀ  on segment i of x's rows, adapter i's own mask and seed
                                                                  saves the packed S_i (``segments.Segments``)

The Function's inputs are (call, x, weight, bias, lora_A, lora_B, magnitude, seed, base, *extra); the passes' gradients
come in the order (dX, dA, dB, dbias[, d magnitude]). ``extra`` is what a variant has beyond those (the multi variant:
the batch's Segments, then every A_i, every B_i, every own bias or None; ``lora_A``/``lora_B`` are None), and the
variant's hooks below say how it enters the operands, the key, the masks, the checks, the custom ops and the gradients.
"""

from __future__ import annotations

import torch

from ..backends import masks, multi_check, multi_triton
from ..backends.dora_torch import weight_norm
from ..call import Call, Operands
from ..dropout import seed_value
from ..reference import dora_ref, plain_backward, weight_nk
from ..segments import MultiAdapters, Segments, seed_ints

# Function input positions (ctx.needs_input_grad)
X, WEIGHT, BIAS, LORA_A, LORA_B, MAGNITUDE = 1, 2, 3, 4, 5, 6
EXTRA = 9  # the first of a variant's own inputs (after the seed and the base object)


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
    # a check of its own (a module with compare_forward / compare_backward, as backends/multi_check.py), or None: the
    # driver's, which compares the variant's row outputs on sampled rows and its reductions in chunks of rows
    own_check = None

    # --- the operands, the key, the masks (LoRA's and DoRA's: the Function's fixed inputs)

    def operands(self, call: Call, x: torch.Tensor, weight, bias, lora_A, lora_B, magnitude, base,
                 extra: tuple) -> Operands:
        """The call's operands from the Function's inputs (x already 2-D)."""
        return Operands(x, weight, bias, lora_A, lora_B, magnitude, base)

    def key_dims(self, t: Operands) -> tuple:
        """What of the adapters enters the path table's key (hashable): (adapter dtype, N, rank)."""
        return t.lora_A.dtype, t.out_features, t.lora_A.shape[0]

    def key_text(self, call: Call, dims: tuple) -> str:
        """The key's text for :meth:`key_dims`' rank part."""
        return f"R{dims[2]}"

    def adapter_shapes(self, t: Operands) -> dict:
        return {"lora_A": list(t.lora_A.shape), "lora_B": list(t.lora_B.shape)}

    def kernels_keep(self, call: Call, t: Operands, seed) -> torch.Tensor | None:
        """The kernels' keep mask of the call (for the PyTorch path standing in on the Triton backend)."""
        x = t.x
        return masks.keep("triton", seed, tuple(x.shape), call.p, x.device)

    def timing_needs(self, t: Operands) -> tuple[bool, ...]:
        """The gradients ``auto`` times a backward with."""
        return True, True, True, t.bias is not None

    def host_seed(self, seed):
        """The seed as the PyTorch backend's Generators take it (read on the host once per call)."""
        return seed_value(seed)

    def cast_grads(self, grads: tuple, t: Operands) -> tuple:
        """The passes' gradients in their inputs' dtypes (dbias stays fp32: the Function casts it)."""
        return tuple(g if g is None or g.dtype == dt else g.to(dt)
                     for g, dt in zip(grads, self.grad_dtypes(t), strict=True))

    # --- the Function's own inputs and gradients

    def graph_backward(self, call: Call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude, seed,
                       seed_arg, extra: tuple, needs: tuple[bool, ...]) -> tuple:
        """``backward(create_graph=True)``: :meth:`differentiable_backward` with the forward's mask."""
        mask = masks.scaled(call.backend, seed if call.backend == "triton" else seed_arg,
                            (x.numel() // x.shape[-1], x.shape[-1]), call.p, x.device)
        return self.differentiable_backward(call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude,
                                            mask, needs)

    def function_grads(self, grads: tuple, x: torch.Tensor, bias_dtype, extra: tuple) -> tuple:
        """The Function's gradients, one per input (call, x, weight, bias, lora_A, lora_B, magnitude, seed, base,
        *extra), from the passes' (dX, dA, dB, dbias[, d magnitude])."""
        dx, da, db, dbias = grads[:4]
        dmag = grads[4] if len(grads) > 4 else None
        if dx is not None and dx.shape != x.shape:
            dx = dx.view(x.shape)
        if dbias is not None and dbias.dtype != bias_dtype:
            dbias = dbias.to(bias_dtype)
        return None, dx, None, dbias, da, db, dmag, None, None

    # --- torch.compile's custom ops: what a variant's own inputs travel as (lists of tensors and of plain values)

    def op_extras(self, extra: tuple) -> tuple[list, list, list]:
        """(adapter tensors, optional tensors, ints) for the custom ops' schema."""
        return [], [], []

    def from_op_extras(self, tensors: list, optional: list, ints: list) -> tuple:
        return ()

    def flat_grads(self, grads: tuple, dy: torch.Tensor) -> list[torch.Tensor]:
        """The gradients as the backward op returns them: a flat list, an empty tensor for each one not needed."""
        return [dy.new_empty(0) if g is None else g for g in grads]

    def nested_grads(self, flat: list, needs: tuple[bool, ...], extra: tuple) -> tuple:
        return tuple(g if need else None for g, need in zip(flat, needs, strict=True))

    def fake_grads(self, dy, t: Operands, needs: tuple[bool, ...]) -> list[torch.Tensor]:
        x = t.x
        magnitude = t.magnitude
        shapes = [x.shape, t.lora_A.shape, t.lora_B.shape, (t.lora_B.shape[0],),
                  None if magnitude is None else magnitude.shape]
        return [dy.new_empty(0) if not need else dy.new_empty(shape, dtype=dtype)
                for need, shape, dtype in zip(needs, shapes, self.grad_dtypes(t), strict=False)]

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


class Multi(Variant):
    """Several LoRA adapters on one frozen base, adapter i on the i-th segment of x's rows (``fused_lora.segments``),
    each computing exactly what it computes alone on its rows (its mask: the single-adapter one of x_i alone with
    seed_i). Its own inputs (``extra``): the batch's Segments (host ints), then A_0 … A_{n−1}, B_0 … B_{n−1}, and each
    adapter's own bias or None; the call record holds the scalings and applied dropouts; the seed is one int64 per
    adapter. Saved for backward: x, the parameters, the per-adapter seeds and the packed S (Σ len_i·r_i), nothing M×K.
    The passes return (dX, [dA_i], [dB_i], the per-segment bias sums (n, N) fp32); the base bias's gradient is the sum
    over the segments without an own bias (``segments.bias_grads``). Its check is ``backends/multi_check.py``."""

    name = "multi"
    grad_names = ("dx", "dA", "dB", "dbias")
    output_names = ("y", "S")
    row_outputs = frozenset({"y"})
    own_check = multi_check

    @staticmethod
    def unpack(extra: tuple) -> tuple[Segments, tuple, tuple, tuple]:
        """(segments, the A_i, the B_i, the own biases) of the Function's ``extra`` inputs."""
        segments = extra[0]
        n = segments.n
        return segments, extra[1:1 + n], extra[1 + n:1 + 2 * n], extra[1 + 2 * n:1 + 3 * n]

    def operands(self, call, x, weight, bias, lora_A, lora_B, magnitude, base, extra):
        segments, As, Bs, owns = self.unpack(extra)
        adapters = MultiAdapters(As, Bs, call.scalings, call.ps, owns)
        return Operands(x, weight, bias, None, None, None, base, segments, adapters)

    def needs(self, needs_input_grad):
        n = (len(needs_input_grad) - EXTRA - 1) // 3
        own = needs_input_grad[EXTRA + 1 + 2 * n:]
        return (needs_input_grad[X], any(needs_input_grad[EXTRA + 1:EXTRA + 1 + n]),
                any(needs_input_grad[EXTRA + 1 + n:EXTRA + 1 + 2 * n]), needs_input_grad[BIAS] or any(own))

    def key_dims(self, t):
        ad = t.adapters
        return ad.dtype, ad.out_features, ad.ranks, tuple(b is not None for b in ad.biases)

    def key_text(self, call, dims):
        ranks, owns = dims[2], dims[3]
        text = f"n{len(ranks)}|R{'.'.join(map(str, ranks))}"
        if call.p > 0:
            text += "|drop:" + "".join("1" if p > 0 else "0" for p in call.ps)
        if any(owns):
            text += "|own:" + "".join("1" if o else "0" for o in owns)
        return text

    def adapter_shapes(self, t):
        ad = t.adapters
        return {"lora_A": [list(a.shape) for a in ad.lora_A], "lora_B": [list(b.shape) for b in ad.lora_B],
                "segments": list(t.segments.lengths)}

    def kernels_keep(self, call, t, seed):
        return multi_triton.kernel_keeps(t.segments, t.adapters, seed, t.x)

    def timing_needs(self, t):
        return True, True, True, t.bias is not None or t.adapters.has_own_bias

    def host_seed(self, seed):
        return None if seed is None else seed_ints(seed, seed.numel())

    def grad_dtypes(self, t):
        return t.x.dtype, t.adapters.dtype, t.adapters.dtype, torch.float32

    def cast_grads(self, grads, t):
        dx, das, dbs, dbias = grads
        dt = t.adapters.dtype
        if dx is not None and dx.dtype != t.x.dtype:
            dx = dx.to(t.x.dtype)
        cast = (lambda gs: None if gs is None else [g if g.dtype == dt else g.to(dt) for g in gs])  # noqa: E731
        return dx, cast(das), cast(dbs), dbias

    def fake_outputs(self, t, call, kwargs):
        s_dtype = torch.float32 if call.backend == "triton" else t.adapters.dtype
        return (t.x.new_empty(t.x.shape[0], t.out_features),
                t.x.new_empty(t.segments.s_numel, dtype=s_dtype))

    def blind(self, t, outputs):
        """B_i = 0 (PEFT's default init) of an adapter with rows hides its rank-r terms, dS_i, dA_i and its share of
        dX: checked again once the B's change. (An adapter without rows in the checked batch runs no kernel term of
        its own: the segment-indexed kernels are the same for every segment, and its results are exact zeros.)"""
        ad, seg = t.adapters, t.segments
        return any(n > 0 and not bool(b.detach().any()) for n, b in zip(seg.lengths, ad.lora_B, strict=True))

    def state(self, t):
        return tuple(v for b in t.adapters.lora_B for v in (b.data_ptr(), b._version))

    def graph_backward(self, call, base, dy, x, weight, bias, bias_dtype, lora_A, lora_B, magnitude, seed, seed_arg,
                       extra, needs):
        """Per segment, LoRA's differentiable backward (plain ops, the segment's forward mask), on its rows."""
        segments, As, Bs, owns = self.unpack(extra)
        need_dx, need_da, need_db, need_dbias = needs
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        if weight is not None:
            w = weight_nk(weight, call.layout)
            base_dx = lambda d: d @ w.to(d.dtype)  # noqa: E731
        else:
            base_dx = lambda d: base.input_grad(d, d.dtype)  # noqa: E731
        dxs, das, dbs, dbias = [], [], [], []
        for i in range(segments.n):
            rows = segments.rows_of(i)
            x_i, dy_i = x2d[rows], dy2d[rows]
            p = call.ps[i]
            if p == 0:
                mask = None
            elif call.backend == "triton":
                mask = masks.scaled("triton", seed[i:i + 1], tuple(x_i.shape), p, x.device)
            else:
                mask = masks.scaled("torch", seed_arg[i], tuple(x_i.shape), p, x.device)
            dx_i, dbias_i, da, db = plain_backward(dy_i, x_i, As[i], Bs[i], call.scalings[i], mask, base_dx,
                                                   torch.float32, (need_dx, need_dbias, need_da, need_db))
            dxs.append(dx_i)
            das.append(da)
            dbs.append(db)
            dbias.append(dbias_i)
        dx = torch.cat(dxs).view(x.shape) if need_dx else None
        return (dx, das if need_da else None, dbs if need_db else None,
                torch.stack(dbias) if need_dbias else None)

    def function_grads(self, grads, x, bias_dtype, extra):
        segments, As, Bs, owns = self.unpack(extra)
        dx, das, dbs, dbias = grads
        if dx is not None and dx.shape != x.shape:
            dx = dx.view(x.shape)
        base_grad, own_grads = None, [None] * segments.n
        if dbias is not None:
            has_own = [b is not None for b in owns]
            base_rows = [i for i, o in enumerate(has_own) if not o]
            if bias_dtype is not None:
                base_grad = (dbias[base_rows].sum(0) if base_rows else dbias.new_zeros(dbias.shape[1])).to(bias_dtype)
            own_grads = [dbias[i].to(owns[i].dtype) if o else None for i, o in enumerate(has_own)]
        # an adapter without rows in this batch took no part: no gradient (None, as for an unused parameter), so an
        # optimizer leaves it as a run without that batch would (AdamW skips a parameter whose grad is None)
        rows = segments.lengths
        das = [g if n else None for g, n in zip(das, rows, strict=True)] if das is not None else [None] * segments.n
        dbs = [g if n else None for g, n in zip(dbs, rows, strict=True)] if dbs is not None else [None] * segments.n
        own_grads = [g if n else None for g, n in zip(own_grads, rows, strict=True)]
        return (None, dx, None, base_grad, None, None, None, None, None, None, *das, *dbs, *own_grads)

    def op_extras(self, extra):
        segments, As, Bs, owns = self.unpack(extra)
        return [*As, *Bs], list(owns), list(segments.lengths)

    def from_op_extras(self, tensors, optional, ints):
        n = len(ints)
        As, Bs = tensors[:n], tensors[n:]
        return (Segments(tuple(ints), tuple(a.shape[0] for a in As)), *As, *Bs, *optional)

    def flat_grads(self, grads, dy):
        dx, das, dbs, dbias = grads
        empty = dy.new_empty(0)
        # the kernels' dA_i / dB_i are views of one dA_cat / dB_cat: a custom op's outputs may not alias each other
        own = (lambda gs: [g.clone() if g._base is not None else g for g in gs or []])  # noqa: E731
        return [empty if dx is None else dx, *own(das), *own(dbs), empty if dbias is None else dbias]

    def nested_grads(self, flat, needs, extra):
        n = extra[0].n
        need_dx, need_da, need_db, need_dbias = needs
        it = iter(flat)
        dx = next(it)
        das = [next(it) for _ in range(n)] if need_da else None
        dbs = [next(it) for _ in range(n)] if need_db else None
        dbias = next(it)
        return dx if need_dx else None, das, dbs, dbias if need_dbias else None

    def fake_grads(self, dy, t, needs):
        need_dx, need_da, need_db, need_dbias = needs
        ad = t.adapters
        empty = dy.new_empty(0)
        return [dy.new_empty(t.x.shape, dtype=t.x.dtype) if need_dx else empty,
                *([dy.new_empty(a.shape, dtype=ad.dtype) for a in ad.lora_A] if need_da else []),
                *([dy.new_empty(b.shape, dtype=ad.dtype) for b in ad.lora_B] if need_db else []),
                dy.new_empty((ad.n, ad.out_features), dtype=torch.float32) if need_dbias else empty]


LORA, DORA, MULTI = LoRA(), DoRA(), Multi()
VARIANTS = {v.name: v for v in (LORA, DORA, MULTI)}
