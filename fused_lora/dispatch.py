"""The router: for each call, which computation runs it. One table, read top to bottom:

| variant | base kind | Function (autograd/)   | PyTorch path (backends/)     | Triton GEMMs (backends/)           |
|---------|-----------|------------------------|------------------------------|------------------------------------|
| LoRA    | dense     | LoRALinearFunction     | lora_torch (p = 0 and same-  | fused, composed (lora_triton)      |
|         |           |                        | dtype adapters: native ops)  |                                    |
| LoRA    | bnb-4bit  | QuantLoRAFunction      | lora_torch, composed         | fused (bnb4_triton), composed      |
| LoRA    | bnb-8bit  | QuantLoRAFunction      | lora_torch, composed         | composed (lora_triton)             |
| DoRA    | dense     | DoRALinearFunction     | dora_torch                   | fused (dora_triton)                |
| DoRA    | bnb-*     | refused (:func:`refusal`: one message for the module, the injector and fused_lora.peft)  |

Per call, in this order:
1. Under torch.func transforms or forward-mode AD (:func:`in_function_transform`): PEFT's plain ops
   (``reference.plain_lora`` / ``plain_dora`` / ``plain_quantized``), which every transform differentiates.
2. The backend (:func:`resolve_backend`): ``FUSED_LORA_BACKEND`` / ``backend=``; ``auto`` takes Triton on CUDA (and on
   CPU under ``TRITON_INTERPRET=1``), except where the GPU cannot run the kernels (``hardware.unfit_reason``: ROCm,
   before sm_75, bf16 on Turing), which take the PyTorch path with one ``FallbackWarning``.
3. The path (:func:`route`): ``FUSED_LORA_GEMM=fused|composed|auto``, narrowed to what the table's row has (a GEMM
   the row lacks takes the row's other one, or the PyTorch path: DoRA's composed). ``auto`` (the default) times the
   row's GEMMs and the PyTorch path on the first forward of a shape and keeps the fastest (``backends/gemm_choice.py``;
   no fused GEMM on Turing, whose Triton dots run on FMA units). A path's first forward and backward are checked
   against the PyTorch path, and a key that fails moves to the next path (``backends/self_check.py``).
4. The dropout seed (``dropout.seed_tensor``), then the Function (or native ops) with that route.

Decided at run time, in one place each: a kernel that cannot be built or launched (``backends/kernel_fallback.py``),
and ``auto``'s timing (``backends/gemm_choice.py``, also inside torch.compile's custom ops).
"""

from __future__ import annotations

import os

import torch

from . import hardware
from .autograd.dora import DoRALinearFunction
from .autograd.lora import LoRALinearFunction
from .autograd.qlora import QuantLoRAFunction
from .backends import lora_torch
from .base_layers import BNB_4BIT, BNB_8BIT, DENSE, quant_state_of, quantized_base, quantized_kind
from .dropout import seed_tensor
from .fallback import warn_fallback
from .kernels.configs import INTERPRET
from .reference import plain_dora, plain_lora, plain_quantized

BACKENDS = ("auto", "triton", "torch")
GEMM_MODES = ("auto", "fused", "composed")
ENV_VAR = "FUSED_LORA_BACKEND"
GEMM_ENV_VAR = "FUSED_LORA_GEMM"
# FUSED_LORA_NATIVE=0: never take the PyTorch backend's native-ops shortcut (p = 0, adapters in x's dtype), so every
# call runs the autograd Function: what a test that means the Function sets (on CPU the shortcut is otherwise taken).
NATIVE_ENV_VAR = "FUSED_LORA_NATIVE"
LORA, DORA = "LoRA", "DoRA"

# The table's last column: the GEMMs the Triton backend has for a (variant, base kind); the PyTorch path serves every
# pair that is not refused.
TRITON_GEMMS: dict[tuple[str, str], tuple[str, ...]] = {
    (LORA, DENSE): ("fused", "composed"),
    (LORA, BNB_4BIT): ("fused", "composed"),
    (LORA, BNB_8BIT): ("composed",),
    (DORA, DENSE): ("fused",),
}
_REFUSED = {
    (DORA, BNB_4BIT): "use_dora=True on a bitsandbytes Linear4bit (a quantized base)",
    (DORA, BNB_8BIT): "use_dora=True on a bitsandbytes Linear8bitLt (a quantized base)",
}


def refusal(variant: str, base: str) -> str | None:
    """Why fused_lora does not compute ``variant`` on a ``base`` layer (one message for every place that asks), or
    None when the table has a row for it."""
    why = _REFUSED.get((variant, base))
    if why is None:
        return None
    return (f"{why}: fused_lora runs DoRA (weight-decomposed LoRA) on floating-point nn.Linear / Conv1D bases only. "
            "Use plain LoRA on this layer, or PEFT for DoRA on a quantized base")


def check_supported(variant: str, base: str, where: str) -> None:
    """Raises the table's refusal for ``variant`` on ``base``, naming ``where``."""
    why = refusal(variant, base)
    if why is not None:
        raise TypeError(f"{where}: {why}")


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'torch' for a call on ``device`` computing in ``dtype``."""
    if requested is None and device.type == "cpu" and not INTERPRET and ENV_VAR not in os.environ:
        return "torch"  # the CPU path of every call without a GPU: decided before anything else (host cost)
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend=" if requested is not None else f"{ENV_VAR}="
        raise ValueError(f"fused_lora: {source}{choice!r} is not a backend; choose one of {BACKENDS}")
    if choice == "auto":
        if device.type != "cuda" and not INTERPRET:
            return "torch"
        reason = hardware.unfit_reason(device, dtype)
        if reason is not None:
            warn_fallback(f"{reason}: running the PyTorch path")
            return "torch"
        return "triton"
    if choice == "triton" and device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"fused_lora: the Triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing fused_lora to run the kernels on CPU through Triton's interpreter, or use "
            "backend='torch'"
        )
    return choice


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


def route(variant: str, base: str, device: torch.device, dtype: torch.dtype | None,
          backend: str | None = None, *, fused_ok: bool = True) -> tuple[str, str, str]:
    """(backend, path, candidates) for one call: the table's row for (``variant``, ``base``), the device and the
    settings. The path is one of the row's GEMMs, ``"auto"`` (timed on the first forward of a shape among the
    comma-separated ``candidates``: the row's GEMMs and the PyTorch path), or ``"torch"`` on the PyTorch backend.
    ``fused_ok=False``: this call's inputs rule the fused GEMM out (a 4-bit base whose x is not in the compute dtype,
    or whose K is not a multiple of the blocksize on a GPU)."""
    name = resolve_backend(backend, device, dtype)
    if name == "torch":
        return "torch", "torch", "torch"
    gemms = TRITON_GEMMS[(variant, base)]
    setting = resolve_gemm(device)
    if not fused_ok or (setting == "auto" and hardware.fma_dots(device)):
        # Turing: Triton compiles tl.dot to FMA instructions (no HMMA, stack spills in every GEMM config:
        # bench/results/compile/sm_75-*), while cuBLAS uses its tensor cores: the fused GEMM is not a candidate.
        gemms = tuple(g for g in gemms if g != "fused")
    if not gemms or (setting not in ("auto", *gemms) and variant == DORA):
        # DoRA's row has no composed kernels: cuBLAS through the PyTorch path
        warn_fallback(f"{device} runs LoRA's composed path (cuBLAS base GEMM); DoRA has no composed kernels: running "
                      "the PyTorch path")
        return "torch", "torch", "torch"
    candidates = ",".join((*gemms, "torch"))
    if setting == "auto" or setting in gemms:
        return "triton", setting, candidates
    return "triton", gemms[0], candidates


def fused_4bit_fits(x: torch.Tensor, layer: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
    """Whether the fused 4-bit GEMM can serve a call on a ``Linear4bit``: it reads x in the layer's compute dtype, and
    on a GPU a K (in_features) that is not a multiple of the blocksize (no projection of GPT-2 or Gemma) takes
    bitsandbytes' matmul: the kernels' per-element scale gathers spilled or passed 99 KiB of shared memory on several
    GPUs (kernels/configs.py). The interpreter runs them."""
    return x.dtype == compute_dtype and not (x.device.type == "cuda"
                                             and x.shape[-1] % quant_state_of(layer).blocksize)


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
    name, path, candidates = route(LORA, DENSE, x.device, x.dtype, backend)
    if name == "torch" and p == 0 and lora_A.dtype == x.dtype and os.environ.get(NATIVE_ENV_VAR) != "0":
        # Without dropout and with adapters in x's dtype, PyTorch's own autograd over the same ops saves what the
        # Function would and runs its backward in C++ (issue 14). fp32 adapters on a half x would make autograd keep an
        # fp32 copy of x: those take the Function.
        return lora_torch.native_forward(x, weight, bias, lora_A, lora_B, scaling, weight_layout)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed_tensor(p, dropout_seed, x.device),
                                    weight_layout, name, path, candidates)


def dora_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, p: float, weight_layout: str,
              dropout_seed: int | torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """DoRA on a dense base, inputs checked (as :func:`lora_call`)."""
    if in_function_transform((x, weight, bias, lora_A, lora_B, magnitude)):
        return plain_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, weight_layout)
    name, path, candidates = route(DORA, DENSE, x.device, x.dtype, backend)
    return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, p,
                                    seed_tensor(p, dropout_seed, x.device), weight_layout, name, path, candidates)


def quantized_call(x: torch.Tensor, layer: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, p: float, dropout_seed: int | torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """LoRA on a bitsandbytes base ``layer`` (frozen): ``layer(x) + scaling · (dropout(x) Aᵀ) Bᵀ``; ``p`` is the
    dropout applied."""
    if p == 1.0:  # as in lora_call: nn.Dropout(p=1) drops the whole branch
        p, scaling = 0.0, 0.0
    bias = layer.bias
    if in_function_transform((x, lora_A, lora_B, bias)):
        return plain_quantized(x, layer, lora_A, lora_B, scaling, p)
    kind = quantized_kind(layer)
    base = quantized_base(layer)
    compute = getattr(base, "compute_dtype", x.dtype)
    fused_ok = kind == BNB_4BIT and fused_4bit_fits(x, layer, compute)
    name, path, candidates = route(LORA, kind, x.device, compute, backend, fused_ok=fused_ok)
    seed = seed_tensor(p, dropout_seed, x.device)
    return QuantLoRAFunction.apply(x, bias, lora_A, lora_B, base, scaling, p, seed, name, path, candidates)
