"""What the device a call runs on can do: compute capability, ROCm, TF32 switches, SM count, name.

Each is read once per device (a plain dict, not functools.cache: torch.compile traces these lookups and warns about
cache wrappers) and is asked by the router (which backend) and the launchers (which precision, how many splits).
"""

from __future__ import annotations

import torch

_capabilities: dict[torch.device, tuple[int, int]] = {}
_names: dict[torch.device, str] = {}
_sm_counts: dict[torch.device, int] = {}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    if device not in _capabilities:
        _capabilities[device] = torch.cuda.get_device_capability(device)
    return _capabilities[device]


def device_arch(device: torch.device) -> int:
    """Compute capability as one number (sm_90 → 90); 0 off CUDA (the interpreter)."""
    capability = device_capability(device)
    return 0 if capability is None else 10 * capability[0] + capability[1]


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" on CUDA, the device type elsewhere."""
    name = _names.get(device)
    if name is None:
        name = _names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name


def is_rocm() -> bool:
    return torch.version.hip is not None


def fma_dots(device: torch.device) -> bool:
    """GPUs before Ampere (Turing): Triton lowers ``tl.dot`` to FMA instructions there, no tensor cores."""
    capability = device_capability(device)
    return capability is not None and capability < (8, 0)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def tf32_enabled() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32 on CUDA.

    The new API (torch >= 2.9: ``torch.backends.fp32_precision`` / ``...cuda.matmul.fp32_precision``, which
    ``TrainingArguments(tf32=True)`` sets) is read first; once it is set, reading the legacy ``allow_tf32`` raises
    ("mix of the legacy and new APIs"), so the legacy flag is read only while the new one says "none"."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # legacy flag set, then the new API reset to "none": PyTorch refuses to say; IEEE is safe
        return False


def unfit_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why the Triton kernels must not run on ``device`` computing in ``dtype`` (the router then takes the PyTorch
    path), or None."""
    capability = device_capability(device)
    if capability is None:  # not a GPU
        return None
    if is_rocm():
        return f"{device} is a ROCm device; the Triton kernels are built and checked for NVIDIA GPUs only"
    if capability < (7, 5):
        return (f"{device} has compute capability {capability[0]}.{capability[1]}; the kernels need 7.5 or newer "
                "(T4 and later)")
    if capability < (8, 0) and dtype == torch.bfloat16:
        return (f"{device} (compute capability {capability[0]}.{capability[1]}) has no bf16 tensor cores; use "
                "float16 on this GPU for the fused kernels")
    return None


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False on a CPU-only build of torch, which cannot)."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a CPU-only build: its CUDA bindings are stubs that raise
        return False
