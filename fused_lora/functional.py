"""The autograd Function and the functional entry point ``fused_lora_linear``.

    y = x Wᵀ + b + scaling · B A dropout(x)

Saved for backward: x, S = dropout(x) Aᵀ (M×r), the dropout seed, and the parameters. No mask and no dropped
copy of x: the backward regenerates the mask from the seed.

Every autograd mode works: ``backward(create_graph=True)`` takes a differentiable backward made of plain ops
(same mask); under torch.func transforms (grad, vmap, jvp) and forward-mode AD the call runs PEFT's plain ops
instead of the Function (same semantics; ``nn.functional.dropout`` draws the mask there).
"""

from __future__ import annotations

import math

import torch

from .backend import backend_ops, resolve_backend, resolve_gemm

WEIGHT_LAYOUTS = ("linear", "conv1d")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def draw_dropout_seed() -> torch.Tensor:
    """A one-element int64 CPU tensor seeding the dropout mask, drawn from PyTorch's default CPU generator.

    Drawing from the global generator makes runs reproducible under ``torch.manual_seed`` and lets
    ``torch.utils.checkpoint`` (which restores RNG state before recomputing) replay the same mask. It
    stays a tensor (no ``.item()``) so ``torch.compile`` traces it without a graph break.
    """
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def _seed_value(seed: torch.Tensor | int | None) -> int:
    if seed is None:
        return 0
    return seed if isinstance(seed, int) else int(seed.item())


def _s_dtype(backend: str, lora_A: torch.Tensor) -> torch.dtype:
    """dtype of S = dropout(x) Aᵀ: fp32 from the kernels' accumulator, the adapters' dtype on the torch path."""
    return torch.float32 if backend == "triton" else lora_A.dtype


def without_autocast(fn, device_type: str, *args):
    """``fn(*args)`` with autocast off: the autograd Functions (LoRA, DoRA, quantized bases) have already chosen the
    dtypes, and the fp32 rank-r GEMMs of fp32 adapters must not be re-cast to half by autocast."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)


def _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm):
    """The backend's forward, autocast off (:func:`without_autocast`)."""
    y, s = without_autocast(backend_ops(backend).forward, x.device.type, x, weight, bias, lora_A, lora_B, scaling,
                            dropout_p, _seed_value(seed), weight_layout, gemm)
    s_dtype = _s_dtype(backend, lora_A)
    return y, (s if s.dtype == s_dtype else s.to(s_dtype))


def _run_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout, backend, gemm,
                  need_dx, need_da, need_db, need_dbias):
    """(dX, dA, dB, dbias fp32), None where not needed; autocast off as in :func:`_run_forward`."""
    grads = without_autocast(backend_ops(backend).backward, dy.device.type, dy, x, weight, lora_A, lora_B, s, scaling,
                             dropout_p, _seed_value(seed), weight_layout, need_dx, need_da, need_db, need_dbias, gemm)
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, torch.float32)
    return tuple(g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, dtypes, strict=True))


# Under torch.compile the two directions are custom ops, so that torch.compile(fullgraph=True) sees one opaque node
# per direction instead of tracing into Triton launches (autotuning, atomics buffers) or breaking the graph. In
# eager mode the Function calls the backends directly: a custom op's dispatch costs tens of microseconds per call
# (issue 14), which small layers on a GPU would wait for.


@torch.library.custom_op("fused_lora::lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str, backend: str, gemm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0],
                                                                 dtype=_s_dtype(backend, lora_A))


@torch.library.custom_op("fused_lora::lora_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None, weight_layout: str,
    backend: str, gemm: str, need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX in x's dtype, dA in A's, dB in B's, dbias fp32); an empty tensor for each one not needed."""
    grads = _run_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout, backend, gemm,
                          need_dx, need_da, need_db, need_dbias)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, weight_layout, backend, gemm,
      need_dx, need_da, need_db, need_dbias):
    empty = dy.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_da else empty,
            lora_B.new_empty(lora_B.shape) if need_db else empty,
            dy.new_empty(lora_B.shape[0], dtype=torch.float32) if need_dbias else empty)


def plain_backward(ctx, dy, x, lora_A, lora_B, seed, base_dx, needs):
    """The gradients as plain autograd ops, for ``backward(create_graph=True)`` (gradient penalties, Hessian-vector
    products): their own graph reaches x, A, B and dY, so a second derivative is exact. Same mask as the forward
    (the backend's, from the seed); S is recomputed from x and A rather than read from the forward's buffer, which
    is outside the graph. ``base_dx(dY)``: the base layer's input gradient (plain ops); ``needs``: whether dX,
    dbias, dA, dB are wanted. Returns (dX, dbias, dA, dB), None where not wanted. Used by every Function here."""
    need_dx, need_dbias, need_da, need_db = needs
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    x_a = x2d.to(lora_A.dtype)
    mask = None
    if ctx.dropout_p > 0:
        mask = backend_ops(ctx.backend).dropout_mask(_seed_value(seed), tuple(x2d.shape), ctx.dropout_p, x.device)
        x_a = x_a * mask.to(x_a.dtype)
    dy_a = dy2d.to(lora_A.dtype)
    ds = (dy_a @ lora_B) * ctx.scaling
    dx = da = db = dbias = None
    if need_dx:
        lora_dx = ds @ lora_A
        if mask is not None:
            lora_dx = lora_dx * mask.to(lora_dx.dtype)
        dx = (base_dx(dy2d).to(dy2d.dtype) + lora_dx.to(dy2d.dtype)).to(x.dtype).view(x.shape)
    if need_da:
        da = ds.t() @ x_a
    if need_db:
        db = (dy_a.t() @ (x_a @ lora_A.t())) * ctx.scaling
    if need_dbias:
        dbias = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dbias, da, db


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused LoRA linear layer. Use :func:`fused_lora_linear`, which validates
    its inputs and draws the dropout seed, rather than calling ``apply`` directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend, gemm):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y, s = _forward_op(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, weight_layout, backend,
                               gemm)
        else:  # the seed read once, for backward too (a .item() per read)
            ctx.seed_int = _seed_value(seed)
            y, s = _run_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, ctx.seed_int, weight_layout,
                                backend, gemm)
        # x itself, not its 2-D view: an input of the Function stays connected to the graph when a backward with
        # create_graph=True reads it back (a view made in here would not be).
        ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed)
        ctx.scaling, ctx.dropout_p, ctx.weight_layout, ctx.backend = scaling, dropout_p, weight_layout, backend
        ctx.gemm = gemm
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # _unsafe_view, as torch.matmul does for N-D inputs: the output is not an autograd view of the 2-D
        # result, so wrappers that hook module outputs (FSDP2 warns on views) and in-place ops on y work.
        return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], lora_B.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # backward(create_graph=True): a backward that is itself differentiable
            w = weight if ctx.weight_layout == "linear" else weight.t()  # N×K
            dx, dbias, da, db = plain_backward(ctx, dy, x, lora_A, lora_B, seed, lambda d: d @ w.to(d.dtype),
                                               (need_dx, need_dbias, need_da, need_db))
            return dx, None, dbias, da, db, None, None, None, None, None, None
        two_d = x.dim() == 2
        compiling = torch.compiler.is_compiling()
        args = (dy if two_d else dy.reshape(-1, dy.shape[-1]), x if two_d else x.reshape(-1, x.shape[-1]), weight,
                lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed if compiling else ctx.seed_int, ctx.weight_layout,
                ctx.backend, ctx.gemm, need_dx, need_da, need_db, need_dbias)
        dx, da, db, dbias = _backward_op(*args) if compiling else _run_backward(*args)
        if need_dx and not two_d:
            dx = dx.view(x.shape)
        if need_dbias and dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, dbias, da, db, None, None, None, None, None, None


def in_function_transform(tensors) -> bool:
    """Whether a call runs under torch.func (grad, vmap, jvp, functional_call per-sample gradients) or with
    forward-mode AD tangents: what an autograd Function with custom ops does not support, and PEFT's plain ops do."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside grad/vmap/jvp (one C call)
        return True
    if torch.autograd.forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): any input with a tangent?
        return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _plain_ops(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout) -> torch.Tensor:
    """PEFT's computation, op for op (``result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling``,
    then back to the result's dtype): differentiable by every autograd mode and transform. Dropout is
    ``nn.functional.dropout``, so torch.func.vmap asks for ``randomness=`` exactly as it does with PEFT."""
    w = weight if weight_layout == "linear" else weight.t()
    result = torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    x_a = x.to(lora_A.dtype)
    if p > 0:
        x_a = torch.nn.functional.dropout(x_a, p, training=True)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x_a, lora_A), lora_B) * scaling
    return (result + lora).to(result.dtype)


def _is_number(value) -> bool:
    """Not None, a string or a bool (the usual wrong values); numbers, numpy and 0-d tensors pass."""
    return value is not None and not isinstance(value, (str, bytes, bool))


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, weight_layout) -> None:
    where = "fused_lora_linear"
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"{where}: weight_layout={weight_layout!r}; use 'linear' (nn.Linear, weight out×in) "
                         "or 'conv1d' (transformers Conv1D, weight in×out)")
    if not x.dtype.is_floating_point or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: x has dtype {x.dtype}; it must be float32, float16 or bfloat16 "
                        "(token ids go through an embedding first)")
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have at least one dimension (…, in_features), got a scalar")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{where}: weight, lora_A and lora_B must be 2-D; got shapes {tuple(weight.shape)}, "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n_out, n_in = weight.shape if weight_layout == "linear" else weight.shape[::-1]
    layout_words = "out×in" if weight_layout == "linear" else "in×out"
    if n_in < 1 or n_out < 1:
        raise ValueError(f"{where}: the weight {tuple(weight.shape)} ({weight_layout} layout, {layout_words}) has "
                         f"in_features={n_in}, out_features={n_out}; a LoRA layer needs both >= 1")
    if x.shape[-1] != n_in:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)} but the weight {tuple(weight.shape)} "
                         f"({weight_layout} layout, {layout_words}) expects in_features={n_in} as x's last dim")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"{where}: lora_A {tuple(lora_A.shape)} has rank r=0; the rank must be >= 1 (lora_A is "
                         "r×in_features, lora_B out_features×r)")
    if lora_A.shape != (r, n_in) or lora_B.shape != (n_out, r):
        raise ValueError(f"{where}: lora_A must be r×in_features and lora_B out_features×r; got lora_A "
                         f"{tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} for in_features={n_in}, "
                         f"out_features={n_out}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"{where}: bias has shape {tuple(bias.shape)}; expected ({n_out},)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{where}: x is {x.dtype} but the weight is {weight.dtype}; cast the input or the "
                        "layer (module.to(dtype)), or run under torch.autocast")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{where}: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share one dtype, "
                        f"either x's ({x.dtype}) or float32")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{where}: bias is {bias.dtype}; it must be x's dtype ({x.dtype}) or float32")
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{where}: all tensors must be on one device; got {listing}. Move the input or the "
                         "layer (module.to(device)) so they match")
    for name, value in (("dropout_p", dropout_p), ("scaling", scaling)):
        if not _is_number(value):
            raise TypeError(f"{where}: {name}={value!r} must be a number")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{where}: dropout_p={dropout_p!r} must be in [0, 1]")
    if not math.isfinite(scaling):
        raise ValueError(f"{where}: scaling={scaling!r} must be a finite number")
    if weight.requires_grad:
        raise ValueError(f"{where}: the base weight {tuple(weight.shape)} requires grad; this layer trains only "
                         "the adapters (and optionally the bias). Freeze it with weight.requires_grad_(False); "
                         "full fine-tuning is not this layer's job")


def _check_magnitude(magnitude, lora_A, lora_B) -> None:
    where = "fused_lora_linear"
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"{where}: magnitude must be a tensor (DoRA's lora_magnitude_vector), got "
                        f"{type(magnitude).__name__}")
    n_out = lora_B.shape[0]
    if magnitude.shape != (n_out,):
        raise ValueError(f"{where}: magnitude has shape {tuple(magnitude.shape)}; DoRA's magnitude is one value per "
                         f"output feature: ({n_out},)")
    if magnitude.dtype not in (lora_A.dtype, torch.float32):
        raise TypeError(f"{where}: magnitude is {magnitude.dtype}; it must be the adapters' dtype ({lora_A.dtype}) or "
                        "float32")
    if magnitude.device != lora_A.device:
        raise ValueError(f"{where}: magnitude is on {magnitude.device} but the adapters are on {lora_A.device}")


def _autocast_inputs(x, weight, bias):
    """Under ``torch.autocast`` the base GEMM runs in the autocast dtype, as ``nn.Linear``'s does: x, W and
    b are cast (a frozen weight is cast every call, exactly as autocast does for nn.Linear). The adapters
    keep their dtype: fp32 adapters (PEFT's default on a half base) are computed in fp32, which the kernels
    take natively, and their gradients arrive in fp32."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return x, weight, bias  # 'meta' and others: no autocast state to ask
    if not torch.is_autocast_enabled(device_type) or not x.dtype.is_floating_point:
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in _FLOAT_DTYPES:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def fused_lora_linear(
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
    dropout_seed: int | None = None,
    backend: str | None = None,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ`` with a frozen ``weight``; DoRA when ``magnitude`` is
    given.

    Args:
        x: (..., in_features); any leading dims, may be non-contiguous or have zero rows.
        weight: out×in (``weight_layout="linear"``) or in×out (``"conv1d"``, GPT-2's Conv1D); frozen.
        bias: (out_features,) or None; it gets a gradient when it requires grad.
        lora_A: r×in; lora_B: out×r (PEFT's orientation); x's dtype or float32.
        scaling: alpha/r (or alpha/sqrt(r) for rsLoRA).
        dropout_p: dropout on the LoRA branch only, applied when ``training``; in [0, 1] (1: the branch
            contributes nothing and its adapters get zero gradients, as with ``nn.Dropout(p=1)`` in PEFT).
        dropout_seed: seed of the dropout mask (see :func:`dropout_mask`); drawn from PyTorch's default
            generator when None.
        backend: "auto" (default), "triton" or "torch"; overrides ``FUSED_LORA_BACKEND``.
        magnitude: (out_features,), DoRA's ``lora_magnitude_vector`` (the adapters' dtype or float32): then
            ``y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ scaling · (x_d Aᵀ) Bᵀ`` with g = magnitude / ‖W + scaling·B A‖
            per output row (detached), PEFT's DoRA (``fused_lora.dora``, ``docs/dora.md``).
    Returns:
        (..., out_features) in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, weight_layout)
    if magnitude is not None:
        from .dora import dora_call

        _check_magnitude(magnitude, lora_A, lora_B)
        return dora_call(x, weight, bias, lora_A, lora_B, magnitude, float(scaling),
                         float(dropout_p) if training else 0.0, weight_layout, dropout_seed, backend)
    return lora_call(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p) if training else 0.0,
                     weight_layout, dropout_seed, backend)


def lora_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, p: float, weight_layout: str, dropout_seed: int | None = None,
              backend: str | None = None) -> torch.Tensor:
    """:func:`fused_lora_linear` after its input checks (``LoRALinear`` makes its own, cheaper ones): ``p`` is the
    dropout applied (0 outside training), autocast already applied to x, W and b."""
    if p == 1.0:
        # nn.Dropout(p=1), PEFT's meaning: the branch sees x·0, contributes 0 (NaN where x is not finite) and its
        # adapters get zero gradients. Scaling by 0 computes exactly that without a mask of all zeros.
        p, scaling = 0.0, 0.0
    if in_function_transform((x, weight, bias, lora_A, lora_B)):
        return _plain_ops(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout)
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "torch" and p == 0 and lora_A.dtype == x.dtype:
        # Without dropout and with adapters in x's dtype, PyTorch's own autograd over the same three ops saves what
        # the Function would (x and S; the frozen W's GEMM saves nothing more) and runs its backward in C++: no
        # Python Function, the host cost of small layers (issue 14). fp32 adapters on a half x would make autograd
        # keep an fp32 copy of x: those take the Function.
        return _native_ops(x, weight, bias, lora_A, lora_B, scaling, weight_layout)
    seed = None
    if p > 0:
        seed = draw_dropout_seed() if dropout_seed is None else torch.tensor([int(dropout_seed)])
    gemm = resolve_gemm(x.device) if name == "triton" else "fused"
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout, name, gemm)


def _native_ops(x, weight, bias, lora_A, lora_B, scaling, weight_layout) -> torch.Tensor:
    """The PyTorch path without dropout, as plain autograd ops: ``torch_ops.forward``'s arithmetic (the base GEMM,
    S = x Aᵀ, the rank-r update added in place), N-D inputs through a 2-D view and back without a view (as
    torch.matmul)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y, _ = backend_ops("torch").forward(x2d, weight, bias, lora_A, lora_B, scaling, 0.0, 0, weight_layout)
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def dropout_mask(
    seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu", backend: str | None = None
) -> torch.Tensor:
    """The scaled keep mask (fp32; 0 or 1/(1-p)) a backend applies to a 2-D (tokens×in_features) input
    for ``seed``. Feed it to ``lora_linear_ref(..., dropout_mask=...)`` to reproduce a dropout run."""
    device = torch.device(device)
    return backend_ops(resolve_backend(backend, device)).dropout_mask(seed, tuple(shape), p, device)
