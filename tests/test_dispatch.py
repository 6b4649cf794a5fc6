"""The router's choices (fused_lora/dispatch.py)."""

from __future__ import annotations

import pytest
import torch

from fused_lora import fused_lora_linear


@pytest.mark.parametrize("native", [None, "0"])
def test_native_shortcut_can_be_switched_off(monkeypatch, native):
    """p = 0 with adapters in x's dtype on the PyTorch backend takes native autograd ops unless FUSED_LORA_NATIVE=0,
    which makes the call run the autograd Function (what a test that means the Function sets)."""
    if native is None:
        monkeypatch.delenv("FUSED_LORA_NATIVE", raising=False)
    else:
        monkeypatch.setenv("FUSED_LORA_NATIVE", native)
    x = torch.randn(3, 8, requires_grad=True)
    w, A, B = torch.randn(5, 8), torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = fused_lora_linear(x, w, None, A, B, 2.0, 0.0, backend="torch")
    ran_function = "Function" in type(y.grad_fn).__name__
    assert ran_function == (native == "0"), type(y.grad_fn).__name__
