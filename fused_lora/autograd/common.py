"""What the autograd Functions share: autocast off around the backends, 2-D views in and N-D outputs back, the dtypes
gradients return in, and the custom-op plumbing for ``torch.compile``."""

from __future__ import annotations

import torch


def without_autocast(fn, device_type: str, *args):
    """``fn(*args)`` with autocast off: the autograd Functions (LoRA, DoRA, quantized bases) have already chosen the
    dtypes, and the fp32 rank-r GEMMs of fp32 adapters must not be re-cast to half by autocast."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """(…, features) as a (tokens, features) view."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def as_input_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 2-D output y in x's leading shape. ``_unsafe_view``, as torch.matmul does for N-D inputs: the output is not
    an autograd view of the 2-D result, so wrappers that hook module outputs (FSDP2 warns on views) and in-place ops on
    y work."""
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def s_dtype(backend: str, lora_A: torch.Tensor) -> torch.dtype:
    """dtype of S = dropout(x) Aᵀ: fp32 from the kernels' accumulator, the adapters' dtype on the torch path."""
    return torch.float32 if backend == "triton" else lora_A.dtype


def cast_grads(grads: tuple, dtypes: tuple) -> tuple:
    """Each gradient in its input's dtype (None stays None)."""
    return tuple(g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, dtypes, strict=True))


# Under torch.compile the two directions of each Function are custom ops (fused_lora::lora_forward, ::lora_backward,
# ::dora_forward, ::dora_backward), so that torch.compile(fullgraph=True) sees one opaque node per direction instead of
# tracing into Triton launches (autotuning, atomics buffers) or breaking the graph. In eager mode the Functions call the
# backends directly: a custom op's dispatch costs tens of microseconds per call (issue 14). A custom op cannot return
# None: gradients not needed travel as empty tensors.


def grads_out(dy: torch.Tensor, grads: tuple) -> tuple:
    """A custom op's return: an empty tensor for each gradient not needed."""
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


def fake_grads(dy: torch.Tensor, wanted: tuple) -> tuple:
    """The fake (meta) outputs of a backward custom op: ``wanted`` holds, per gradient, the (shape, dtype) of the
    gradient or None where it is not needed."""
    return tuple(dy.new_empty(0) if w is None else dy.new_empty(w[0], dtype=w[1]) for w in wanted)
