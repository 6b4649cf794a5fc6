"""Input checks with errors that name the call, the shapes or dtypes, and what to do; and autocast's casts.

Run by ``fused_lora_linear`` on every call and by the modules when their cheap per-call comparison finds something
that does not fit (only for the message): the paths themselves assume checked inputs.
"""

from __future__ import annotations

import math

import torch

WEIGHT_LAYOUTS = ("linear", "conv1d")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ShapeError(ValueError, RuntimeError):
    """Tensors whose shapes do not fit together. Both a ``ValueError`` (what fused_lora's checks have always raised)
    and a ``RuntimeError`` (what PyTorch's matmul, and so PEFT's layer, raises for the same input)."""


def is_number(value) -> bool:
    """Not None, a string or a bool (the usual wrong values); numbers, numpy and 0-d tensors pass."""
    return value is not None and not isinstance(value, (str, bytes, bool))


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, weight_layout) -> None:
    where = "fused_lora_linear"
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"{where}: weight_layout={weight_layout!r}; use 'linear' (nn.Linear, weight out×in) "
                         "or 'conv1d' (transformers Conv1D, weight in×out)")
    if not x.dtype.is_floating_point or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: x has dtype {x.dtype}; it must be float32, float16 or bfloat16 "
                        "(token ids go through an embedding first)")
    if x.dim() < 1:
        raise ShapeError(f"{where}: x must have at least one dimension (…, in_features), got a scalar")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ShapeError(f"{where}: weight, lora_A and lora_B must be 2-D; got shapes {tuple(weight.shape)}, "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n_out, n_in = weight.shape if weight_layout == "linear" else weight.shape[::-1]
    layout_words = "out×in" if weight_layout == "linear" else "in×out"
    if n_in < 1 or n_out < 1:
        raise ShapeError(f"{where}: the weight {tuple(weight.shape)} ({weight_layout} layout, {layout_words}) has "
                         f"in_features={n_in}, out_features={n_out}; a LoRA layer needs both >= 1")
    if x.shape[-1] != n_in:
        raise ShapeError(f"{where}: x has shape {tuple(x.shape)} but the weight {tuple(weight.shape)} "
                         f"({weight_layout} layout, {layout_words}) expects in_features={n_in} as x's last dim")
    r = lora_A.shape[0]
    if r < 1:
        raise ShapeError(f"{where}: lora_A {tuple(lora_A.shape)} has rank r=0; the rank must be >= 1 (lora_A is "
                         "r×in_features, lora_B out_features×r)")
    if lora_A.shape != (r, n_in) or lora_B.shape != (n_out, r):
        raise ShapeError(f"{where}: lora_A must be r×in_features and lora_B out_features×r; got lora_A "
                         f"{tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} for in_features={n_in}, "
                         f"out_features={n_out}")
    if bias is not None and bias.shape != (n_out,):
        raise ShapeError(f"{where}: bias has shape {tuple(bias.shape)}; expected ({n_out},)")
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
        if not is_number(value):
            raise TypeError(f"{where}: {name}={value!r} must be a number")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{where}: dropout_p={dropout_p!r} must be in [0, 1]")
    if not math.isfinite(scaling):
        raise ValueError(f"{where}: scaling={scaling!r} must be a finite number")
    if weight.requires_grad:
        raise ValueError(f"{where}: the base weight {tuple(weight.shape)} requires grad; this layer trains only "
                         "the adapters (and optionally the bias). Freeze it with weight.requires_grad_(False); "
                         "full fine-tuning is not this layer's job")


def check_magnitude(magnitude, lora_A, lora_B) -> None:
    where = "fused_lora_linear"
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"{where}: magnitude must be a tensor (DoRA's lora_magnitude_vector), got "
                        f"{type(magnitude).__name__}")
    n_out = lora_B.shape[0]
    if magnitude.shape != (n_out,):
        raise ShapeError(f"{where}: magnitude has shape {tuple(magnitude.shape)}; DoRA's magnitude is one value per "
                         f"output feature: ({n_out},)")
    if magnitude.dtype not in (lora_A.dtype, torch.float32):
        raise TypeError(f"{where}: magnitude is {magnitude.dtype}; it must be the adapters' dtype ({lora_A.dtype}) or "
                        "float32")
    if magnitude.device != lora_A.device:
        raise ValueError(f"{where}: magnitude is on {magnitude.device} but the adapters are on {lora_A.device}")


def autocast_inputs(x, weight, bias):
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
    if dtype not in FLOAT_DTYPES:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)
