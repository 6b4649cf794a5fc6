"""The router: for each call, which computation runs it. Its table is built from the registered base kinds
(``fused_lora/bases/``: each kind names the passes it has per variant and path):

| variant | base kind                 | Triton paths (the autograd driver)   | PyTorch path                       |
|---------|---------------------------|--------------------------------------|------------------------------------|
| lora    | dense (nn.Linear, Conv1D) | fused, composed (lora_triton)        | lora_torch (p = 0 and same-dtype   |
|         |                           |                                      | adapters: native autograd ops)     |
| lora    | bnb-4bit                  | fused (bnb4_triton), composed        | lora_torch, composed               |
| lora    | bnb-8bit                  | composed (lora_triton)               | lora_torch, composed               |
| dora    | dense                     | fused (dora_triton)                  | dora_torch                         |
| dora    | bnb-4bit / bnb-8bit       | refused (the kind's ``refusals``: one message for every place that asks) |
| multi   | dense                     | fused, composed (multi_triton)       | multi_torch                        |
| multi   | bnb-4bit                  | fused (multi_bnb4_triton), composed  | multi_torch, composed              |
| multi   | bnb-8bit                  | composed (multi_triton)              | multi_torch, composed              |

``multi``: several LoRA adapters on one base, adapter i on the i-th segment of x's rows (:func:`multi_call`).

Every served cell runs through one autograd Function (``autograd/driver.py``). Per call, in this order:
1. Under torch.func transforms or forward-mode AD (:func:`in_function_transform`): PEFT's plain ops
   (``reference.plain_lora`` / ``plain_dora`` / ``plain_quantized``), which every transform differentiates.
2. The backend (:func:`resolve_backend`): ``FUSED_LORA_BACKEND`` / ``backend=``; ``auto`` takes Triton on CUDA (and on
   CPU under ``TRITON_INTERPRET=1``), except where the GPU cannot run the kernels (``hardware.unfit_reason``: ROCm,
   before sm_75, bf16 on Turing), which take the PyTorch path with one ``FallbackWarning``.
3. The path (:func:`route`): ``FUSED_LORA_GEMM=fused|composed|auto``, narrowed to what the kind has for the variant (a
   path it lacks takes its other one, or the PyTorch path: DoRA's composed). ``auto`` (the default) times the kind's
   paths and the PyTorch path on the first call of a shape and keeps the fastest (``backends/path_choice.py``; no
   fused GEMM on Turing, whose Triton dots run on FMA units). A path's first calls are checked against the PyTorch
   path, and a key that fails moves to the next path (``backends/self_check.py``).
4. The dropout seed (``dropout.seed_tensor``), the call record (``call.Call``, one per route, kept), then the Function
   (or, on the PyTorch backend without dropout, native autograd ops).
"""

from __future__ import annotations

import os

import torch

from . import bases, hardware
from .autograd.driver import FusedLoRAFunction, call_record
from .backends import lora_torch
from .dropout import seed_tensor
from .fallback import warn_fallback
from .kernels.configs import INTERPRET
from .reference import plain_dora, plain_lora, plain_multi, plain_quantized
from .segments import Segments, seed_table

BACKENDS = ("auto", "triton", "torch")
GEMM_MODES = ("auto", "fused", "composed")
ENV_VAR = "FUSED_LORA_BACKEND"
GEMM_ENV_VAR = "FUSED_LORA_GEMM"
# FUSED_LORA_NATIVE=0: never take the PyTorch backend's native-ops shortcut (p = 0, adapters in x's dtype), so every
# call runs the autograd Function: what a test that means the Function sets (on CPU the shortcut is otherwise taken).
NATIVE_ENV_VAR = "FUSED_LORA_NATIVE"
LORA, DORA, MULTI = "lora", "dora", "multi"  # the variants (autograd/variants.py)


def _kind(kind: bases.BaseKind | str) -> bases.BaseKind:
    return kind if isinstance(kind, bases.BaseKind) else bases.get(kind)


def refusal(variant: str, kind: bases.BaseKind | str) -> str | None:
    """Why fused_lora does not compute ``variant`` on a base of ``kind`` (one message for every place that asks), or
    None when the kind serves it."""
    return _kind(kind).refusal(variant)


def check_supported(variant: str, kind: bases.BaseKind | str, where: str) -> None:
    """Raises the table's refusal for ``variant`` on ``kind``, naming ``where``."""
    why = refusal(variant, kind)
    if why is not None:
        raise TypeError(f"{where}: {why}")


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'torch' for a call on ``device`` computing in ``dtype``."""
    name, why = _backend(requested, device, dtype)
    if why is not None:
        warn_fallback(why)
    return name


def _backend(requested: str | None, device: torch.device, dtype: torch.dtype | None) -> tuple[str, str | None]:
    """(the backend, why it is the PyTorch path when the GPU cannot run the kernels: said once, by the caller)."""
    if requested is None and device.type == "cpu" and not INTERPRET and ENV_VAR not in os.environ:
        return "torch", None  # the CPU path of every call without a GPU: decided before anything else (host cost)
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend=" if requested is not None else f"{ENV_VAR}="
        raise ValueError(f"fused_lora: {source}{choice!r} is not a backend; choose one of {BACKENDS}")
    if choice == "auto":
        if device.type != "cuda" and not INTERPRET:
            return "torch", None
        reason = hardware.unfit_reason(device, dtype)
        if reason is not None:
            return "torch", f"{reason}: running the PyTorch path"
        return "triton", None
    if choice == "triton" and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"fused_lora: the Triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing fused_lora to run the kernels on CPU through Triton's interpreter, or use "
            "backend='torch'"
        )
    return choice, None


def resolve_gemm(device: torch.device) -> str:
    """``FUSED_LORA_GEMM`` for the Triton backend on ``device``: 'fused' (Triton base GEMM with the rank-r term folded
    in), 'composed' (cuBLAS or the quantized layer's base GEMM plus in-place rank-r kernels) or 'auto' (the default:
    the row's paths and the PyTorch path timed on first use per shape, ``backends/gemm_choice.py``; on CPU, under the
    interpreter, there is no clock: 'fused')."""
    choice = os.environ.get(GEMM_ENV_VAR, "auto")
    if choice not in GEMM_MODES:
        raise ValueError(f"fused_lora: {GEMM_ENV_VAR}={choice!r}; choose one of {GEMM_MODES}")
    if choice == "auto" and hardware.device_capability(device) is None:
        return "fused"
    return choice


def route(variant: str, kind: bases.BaseKind | str, device: torch.device, dtype: torch.dtype | None,
          backend: str | None = None, *, fused_ok: bool = True) -> tuple[str, str, tuple[str, ...]]:
    """(backend, path, candidates) for one call: the kind's paths for ``variant``, the device and the settings. The
    path is one of the kind's Triton paths, ``"auto"`` (timed on the first call of a shape among ``candidates``: the
    kind's paths and the PyTorch path), or ``"torch"`` on the PyTorch backend. ``fused_ok=False``: this call's inputs
    rule the fused path out (a 4-bit base whose x is not in the compute dtype, say)."""
    name, path, candidates, why = _route(variant, _kind(kind), device, dtype, backend, fused_ok)
    if why is not None:
        warn_fallback(why)
    return name, path, candidates


def _route(variant, kind, device, dtype, backend, fused_ok) -> tuple[str, str, tuple[str, ...], str | None]:
    name, why = _backend(backend, device, dtype)
    if name == "torch":
        return "torch", "torch", ("torch",), why
    paths = kind.paths(variant)
    setting = resolve_gemm(device)
    if not fused_ok or (setting == "auto" and hardware.fma_dots(device)):
        # Turing: Triton compiles tl.dot to FMA instructions (no HMMA, stack spills in every GEMM config:
        # bench/results/compile/sm_75-*), while cuBLAS uses its tensor cores: the fused GEMM is not a candidate.
        paths = tuple(p for p in paths if p != "fused")
    if not paths or (setting not in ("auto", *paths) and variant == DORA):
        # DoRA has no composed kernels: cuBLAS through the PyTorch path
        return "torch", "torch", ("torch",), (f"{device} runs LoRA's composed path (cuBLAS base GEMM); DoRA has no "
                                              "composed kernels: running the PyTorch path")
    candidates = (*paths, "torch")
    if setting == "auto" or setting in paths:
        return "triton", setting, candidates, None
    return "triton", paths[0], candidates, None


_calls: dict[tuple, object] = {}  # a route's inputs and settings → its call record (routes that fell back: not kept)


def call_for(variant: str, kind: bases.BaseKind, layout: str, scaling: float, p: float, device: torch.device,
             dtype: torch.dtype | None, backend: str | None, fused_ok: bool = True, *,
             scalings: tuple[float, ...] = (), ps: tuple[float, ...] = ()):
    """The call record for one call: :func:`route` and the record, kept per route and settings (the environment
    variables and the device's capability are part of the lookup: a change routes again). This runs on every call.
    ``scalings``/``ps``: the multi variant's per-adapter values."""
    env = os.environ
    index = (variant, kind.name, layout, scaling, p, device, dtype, backend, fused_ok, env.get(ENV_VAR),
             env.get(GEMM_ENV_VAR), hardware.device_capability(device), scalings, ps)
    call = _calls.get(index)
    if call is None:
        name, path, candidates, why = _route(variant, kind, device, dtype, backend, fused_ok)
        call = call_record(variant, kind, layout, scaling, p, name, path, candidates, scalings, ps)
        if why is not None:
            warn_fallback(why)  # said once per reason: such a route is routed (and said) again on each call
        elif not torch.compiler.is_compiling():
            if len(_calls) > 4096:  # scalings and dropout rates of many layers, shapes: bounded all the same
                _calls.clear()
            _calls[index] = call
    return call


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


# ------------------------------------------------------------------------------------------------- the entry points


def lora_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, p: float, weight_layout: str,
              dropout_seed: int | torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """LoRA on a dense base, inputs checked: ``p`` is the dropout applied (0 outside training), autocast already
    applied to x, W and b."""
    if p == 1.0:
        # nn.Dropout(p=1), PEFT's meaning: the branch sees x·0, contributes 0 (NaN where x is not finite) and its
        # adapters get zero gradients. Scaling by 0 computes exactly that without a mask of all zeros.
        p, scaling = 0.0, 0.0
    if in_function_transform((x, weight, bias, lora_A, lora_B)):
        return plain_lora(x, weight, bias, lora_A, lora_B, scaling, p, weight_layout)
    call = call_for(LORA, bases.get(bases.DENSE), weight_layout, scaling, p, x.device, x.dtype, backend)
    if call.backend == "torch" and p == 0 and lora_A.dtype == x.dtype and os.environ.get(NATIVE_ENV_VAR) != "0":
        # Without dropout and with adapters in x's dtype, PyTorch's own autograd over the same ops saves what the
        # Function would and runs its backward in C++ (fewer Python layers: small layers wait on the host). fp32
        # adapters on a half x would make autograd keep an fp32 copy of x: those take the Function.
        return lora_torch.native_forward(x, weight, bias, lora_A, lora_B, scaling, weight_layout)
    return FusedLoRAFunction.apply(call, x, weight, bias, lora_A, lora_B, None, seed_tensor(p, dropout_seed, x.device),
                                   None)


def dora_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, weight_layout: str,
              dropout_seed: int | torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """DoRA on a dense base, inputs checked (as :func:`lora_call`)."""
    if in_function_transform((x, weight, bias, lora_A, lora_B, magnitude)):
        return plain_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, weight_layout)
    call = call_for(DORA, bases.get(bases.DENSE), weight_layout, scaling, p, x.device, x.dtype, backend)
    return FusedLoRAFunction.apply(call, x, weight, bias, lora_A, lora_B, magnitude,
                                   seed_tensor(p, dropout_seed, x.device), None)


def quantized_call(x: torch.Tensor, layer: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, p: float, dropout_seed: int | torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """LoRA on a quantized base ``layer`` (frozen; a registered base kind): ``layer(x) + scaling · (dropout(x) Aᵀ)
    Bᵀ``; ``p`` is the dropout applied. The layer's bias is an input of the Function (it gets a gradient when it is
    trained)."""
    if p == 1.0:  # as in lora_call: nn.Dropout(p=1) drops the whole branch
        p, scaling = 0.0, 0.0
    bias = layer.bias
    if in_function_transform((x, lora_A, lora_B, bias)):
        return plain_quantized(x, layer, lora_A, lora_B, scaling, p)
    kind, base = bases.base_of(layer)
    compute = base.compute_dtype or x.dtype
    fused_ok = kind.fused_fits(x, base) if kind.fused_fits is not None else True
    call = call_for(LORA, kind, "linear", scaling, p, x.device, compute, backend, fused_ok)
    return FusedLoRAFunction.apply(call, x, None, bias, lora_A, lora_B, None, seed_tensor(p, dropout_seed, x.device),
                                   base)


def multi_call(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               lora_As: tuple[torch.Tensor, ...], lora_Bs: tuple[torch.Tensor, ...], scalings: tuple[float, ...],
               ps: tuple[float, ...], segments: Segments, weight_layout: str = "linear", *,
               biases: tuple[torch.Tensor | None, ...] | None = None,
               dropout_seeds: torch.Tensor | list[int] | None = None, backend: str | None = None,
               layer: torch.nn.Module | None = None) -> torch.Tensor:
    """Several LoRA adapters on one frozen base: adapter i (``lora_As[i]`` r_i×K, ``lora_Bs[i]`` N×r_i, ``scalings[i]``,
    the applied dropout ``ps[i]``, its own bias ``biases[i]`` or None) on segment i of x's rows (``segments``: host
    ints, x's leading dims flattened). The base is a dense ``weight`` (``weight_layout``) with ``bias``, or a quantized
    ``layer`` (a registered base kind; ``weight`` None, ``bias`` the layer's). ``dropout_seeds``: one per adapter (ints
    or an int64 tensor), drawn from PyTorch's generator of x's device when None. Autocast already applied."""
    n = segments.n
    scalings = tuple(0.0 if p == 1.0 else float(s) for s, p in zip(scalings, ps, strict=True))
    ps = tuple(0.0 if p == 1.0 else float(p) for p in ps)  # nn.Dropout(p=1): the branch contributes nothing
    owns = tuple(biases) if biases else (None,) * n
    if in_function_transform((x, weight, bias, *lora_As, *lora_Bs, *owns)):
        return plain_multi(x, weight, bias, lora_As, lora_Bs, scalings, ps, segments.lengths, weight_layout, owns,
                           layer)
    base = None
    if layer is not None:
        kind, base = bases.base_of(layer)
        compute = base.compute_dtype or x.dtype
        fused_ok = kind.fused_fits(x, base) if kind.fused_fits is not None else True
        weight_layout = "linear"
    else:
        kind, compute, fused_ok = bases.get(bases.DENSE), x.dtype, True
    check_supported(MULTI, kind, "fused_lora multi-adapter")
    p = max(ps, default=0.0)
    call = call_for(MULTI, kind, weight_layout, 0.0, p, x.device, compute, backend, fused_ok, scalings=scalings, ps=ps)
    seeds = None
    if p > 0:
        seeds = (torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64, device=x.device) if dropout_seeds is None
                 else seed_table(dropout_seeds, n, x.device))
    return FusedLoRAFunction.apply(call, x, weight, bias, None, None, None, seeds, base, segments, *lora_As, *lora_Bs,
                                   *owns)
