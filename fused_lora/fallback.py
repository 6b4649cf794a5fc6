"""``FallbackWarning``: a call runs a slower path than the fused kernels, said once per reason per process."""

from __future__ import annotations

import warnings


class FallbackWarning(UserWarning):
    """A call runs a slower path than the fused kernels (the reason is in the message). Silence it by choosing the
    path yourself (``FUSED_LORA_BACKEND=torch``), or with
    ``warnings.filterwarnings("ignore", category=fused_lora.FallbackWarning)``."""


_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """One warning per reason per process."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fused_lora: {reason}. Silence: set FUSED_LORA_BACKEND=torch to choose the PyTorch path yourself, "
                  "or filter fused_lora.FallbackWarning", FallbackWarning, stacklevel=4)
