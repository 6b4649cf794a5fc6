"""PEFT's computations in plain PyTorch: the references every path is tested against, and the plain-op paths.

    LoRA  y = x Wᵀ + b + s · (m ⊙ x) Aᵀ Bᵀ                                         (lora_linear_ref)
    DoRA  y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, g = m / ‖W + s·B A‖   (dora_ref)

Written with eager autograd ops and no tricks, so their gradients are the ground truth (in fp64 with
``upcast=torch.float64``). The ``plain_*`` functions are PEFT's forward op for op: the router runs them under
torch.func transforms and forward-mode AD, which an autograd Function with custom ops does not support;
``plain_backward`` is the differentiable backward the Functions run for ``backward(create_graph=True)``.
"""

from __future__ import annotations

import torch


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_layout: str = "linear",
    *,
    dropout_mask: torch.Tensor | None = None,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference LoRA linear layer, same signature as :func:`fused_lora.fused_lora_linear`.

    ``dropout_mask`` is the *scaled* keep mask (values 0 or 1/(1-p)) of x's shape; pass the mask a
    backend used (``fused_lora.dropout_mask``) to compare gradients exactly. Without it, dropout is drawn
    with ``torch.nn.functional.dropout`` when ``training and dropout_p > 0``.

    ``upcast`` computes everything in that dtype (fp64 for the ground truth, fp32 for a "what an fp32
    framework would do" reference) and returns the result in that dtype. Without it the computation
    follows PEFT's dtype rules: the base GEMM in x's dtype, the LoRA branch in the adapters' dtype,
    the output in x's dtype.
    """
    out_dtype = x.dtype
    if upcast is not None:
        x, weight, lora_A, lora_B = (t.to(upcast) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(upcast) if bias is not None else None
        out_dtype = upcast
    w = weight if weight_layout == "linear" else weight.t()
    base = torch.nn.functional.linear(x, w.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    xa = x.to(lora_A.dtype)
    if dropout_mask is not None:
        xa = xa * dropout_mask.to(xa.dtype)
    elif training and dropout_p > 0:
        xa = torch.nn.functional.dropout(xa, dropout_p, training=True)
    lora = (xa @ lora_A.t()) @ lora_B.t()
    return (base + (lora * scaling).to(base.dtype)).to(out_dtype)


def weight_nk(weight: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """W as out×in (a view for Conv1D's in×out weight)."""
    return weight if weight_layout == "linear" else weight.t()


def dora_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_layout: str = "linear",
    *,
    dropout_mask: torch.Tensor | None = None,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """PEFT's DoRA layer (``peft.tuners.lora.variants.DoraLinearVariant.forward`` and ``dora.DoraLinearLayer``), op for
    op, as eager autograd ops: the definition the backends are tested against (in fp64 with ``upcast=torch.float64``).

    PEFT's dtype rules without ``upcast``: the base layer in x's dtype; x cast to the adapters' dtype, W too for the
    norm and for x_d Wᵀ; the norm ‖W + s·B A‖ in the adapters' dtype and detached; without dropout (p = 0 or not
    training) the base product is the base layer's output minus its bias, with dropout it is x_d Wᵀ computed again
    (PEFT applies the magnitude correction to the dropped input's base product). ``dropout_mask``: the scaled keep mask
    (0 or 1/(1-p)) a backend used (``fused_lora.dropout_mask``); it takes the dropout branch.
    """
    out_dtype = x.dtype
    if upcast is not None:
        x, weight, lora_A, lora_B, magnitude = (t.to(upcast) for t in (x, weight, lora_A, lora_B, magnitude))
        bias = bias.to(upcast) if bias is not None else None
        out_dtype = upcast
    w = weight_nk(weight, weight_layout)
    result = torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    x_a = x.to(lora_A.dtype)
    w_a = w.to(x_a.dtype)
    lora_weight = (lora_B @ lora_A).to(x_a.dtype)
    weight_norm = torch.linalg.norm(w_a + scaling * lora_weight.detach(), dim=1).to(w_a.dtype).detach()
    g = (magnitude / weight_norm).view(1, -1)
    if dropout_mask is not None or (training and dropout_p > 0):
        if dropout_mask is not None:
            x_a = x_a * dropout_mask.to(x_a.dtype)
        else:
            x_a = torch.nn.functional.dropout(x_a, dropout_p, training=True)
        base_result = torch.nn.functional.linear(x_a, w_a)
    else:
        base_result = result - bias if bias is not None else result
    lora_result = (x_a @ lora_A.t()) @ lora_B.t()
    result_dora = (g - 1) * base_result + g * lora_result * scaling
    return (result + result_dora).to(result.dtype).to(out_dtype)


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_layout: str) -> torch.Tensor:
    """‖W + s·B A‖ per output row as PEFT's ``DoraLinearLayer.update_layer`` computes the initial magnitude: in the
    weight's dtype (B A rounded to it first, the norm rounded to it), so a fresh layer's ``lora_magnitude_vector``
    equals PEFT's bit for bit (‖W‖ per row with PEFT's zero-initialized B)."""
    w = weight_nk(weight, weight_layout)
    lora_weight = (lora_B.float() @ lora_A.float()).to(w.dtype)
    return torch.linalg.norm(w + scaling * lora_weight, dim=1).to(w.dtype)


# ----------------------------------------------------------------------------------- plain-op paths (PEFT's forward)


def plain_lora(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout) -> torch.Tensor:
    """PEFT's computation, op for op (``result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling``,
    then back to the result's dtype): differentiable by every autograd mode and transform. Dropout is
    ``nn.functional.dropout``, so torch.func.vmap asks for ``randomness=`` exactly as it does with PEFT."""
    w = weight_nk(weight, weight_layout)
    result = torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    x_a = x.to(lora_A.dtype)
    if p > 0:
        x_a = torch.nn.functional.dropout(x_a, p, training=True)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x_a, lora_A), lora_B) * scaling
    return (result + lora).to(result.dtype)


def plain_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, weight_layout) -> torch.Tensor:
    """PEFT's DoRA forward op for op (dropout by nn.functional)."""
    return dora_ref(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, p > 0, weight_layout)


def plain_quantized(x, layer, lora_A, lora_B, scaling, p) -> torch.Tensor:
    """PEFT's bitsandbytes LoRA forward, op for op (``peft.tuners.lora.bnb``)."""
    result = layer(x)
    x_a = x.to(lora_A.dtype)
    if p > 0:
        x_a = torch.nn.functional.dropout(x_a, p, training=True)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x_a, lora_A), lora_B) * scaling
    return result + lora.to(result.dtype)


def plain_backward(dy, x, lora_A, lora_B, scaling, mask, base_dx, bias_dtype, needs):
    """The LoRA gradients as plain autograd ops, for ``backward(create_graph=True)`` (gradient penalties,
    Hessian-vector products): their own graph reaches x, A, B and dY, so a second derivative is exact. ``mask``: the
    scaled keep mask the forward used (M×K, or None without dropout); S is recomputed from x and A rather than read from
    the forward's buffer, which is outside the graph. ``base_dx(dY)``: the base layer's input gradient (plain ops);
    ``needs``: whether dX, dbias, dA, dB are wanted. Returns (dX, dbias, dA, dB), None where not wanted."""
    need_dx, need_dbias, need_da, need_db = needs
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    x_a = x2d.to(lora_A.dtype)
    if mask is not None:
        x_a = x_a * mask.to(x_a.dtype)
    dy_a = dy2d.to(lora_A.dtype)
    ds = (dy_a @ lora_B) * scaling
    dx = da = db = dbias = None
    if need_dx:
        lora_dx = ds @ lora_A
        if mask is not None:
            lora_dx = lora_dx * mask.to(lora_dx.dtype)
        dx = (base_dx(dy2d).to(dy2d.dtype) + lora_dx.to(dy2d.dtype)).to(x.dtype).view(x.shape)
    if need_da:
        da = ds.t() @ x_a
    if need_db:
        db = (dy_a.t() @ (x_a @ lora_A.t())) * scaling
    if need_dbias:
        dbias = dy2d.sum(0, dtype=torch.float32).to(bias_dtype)
    return dx, dbias, da, db


# ------------------------------------------------------------------------- several adapters on one base (segments)


def multi_lora_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scalings: list[float],
    lengths: list[int],
    weight_layout: str = "linear",
    *,
    biases: list[torch.Tensor | None] | None = None,
    dropout_masks: list[torch.Tensor | None] | None = None,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """Several adapters on one base, by definition: x's rows (M×K) in contiguous segments of ``lengths``, segment i
    through :func:`lora_linear_ref` with adapter i (``lora_As[i]``, ``lora_Bs[i]``, ``scalings[i]``), its own bias
    ``biases[i]`` in place of ``bias`` when given, and its scaled keep mask ``dropout_masks[i]`` (len_i×K, values 0 or
    1/(1-p); None: no dropout); the segments' outputs concatenated. Eager autograd ops, so the gradients of x, every
    A_i, B_i and bias are the ground truth (in fp64 with ``upcast=torch.float64``). Dtype rules as
    :func:`lora_linear_ref`."""
    n = len(lengths)
    if not (len(lora_As) == len(lora_Bs) == len(scalings) == n) or sum(lengths) != x.shape[0]:
        raise ValueError(f"multi_lora_ref: {n} segments (lengths summing to {sum(lengths)}) for {len(lora_As)} "
                         f"adapters and {x.shape[0]} rows")
    outs, start = [], 0
    for i, length in enumerate(lengths):
        own = biases[i] if biases is not None and biases[i] is not None else bias
        mask = dropout_masks[i] if dropout_masks is not None else None
        outs.append(lora_linear_ref(x[start:start + length], weight, own, lora_As[i], lora_Bs[i], scalings[i],
                                    weight_layout=weight_layout, dropout_mask=mask, upcast=upcast))
        start += length
    return torch.cat(outs)


def plain_multi(x, weight, bias, lora_As, lora_Bs, scalings, ps, lengths, weight_layout, biases, layer=None):
    """Several adapters, PEFT's forward op for op on each segment of x's rows (``plain_lora`` on a dense base,
    ``plain_quantized`` on a quantized ``layer``, whose own bias an adapter's own replaces): under torch.func."""
    x2d = x.reshape(-1, x.shape[-1])
    outs, start = [], 0
    for i, length in enumerate(lengths):
        x_i = x2d[start:start + length]
        own = biases[i] if biases is not None else None
        if layer is None:
            outs.append(plain_lora(x_i, weight, own if own is not None else bias, lora_As[i], lora_Bs[i], scalings[i],
                                   ps[i], weight_layout))
        else:
            y_i = plain_quantized(x_i, layer, lora_As[i], lora_Bs[i], scalings[i], ps[i])
            if own is not None:
                y_i = y_i + (own - (layer.bias if layer.bias is not None else 0)).to(y_i.dtype)
            outs.append(y_i)
        start += length
    y = torch.cat(outs)
    return y.view(*x.shape[:-1], y.shape[-1])
