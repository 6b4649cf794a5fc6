"""What the layer keeps for backward: x, S (M×r) and the parameters; no mask, no dropped copy of x."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE

from fused_lora import fused_lora_linear


def saved_storages(fn):
    """Unique storages saved for backward while running ``fn`` → {data_ptr: nbytes}."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return storages, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_are_x_plus_s_plus_parameters(backend, p):
    M, K, N, r = 96, 80, 64, 8
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    w, b = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE, requires_grad=True)
    lora_A = torch.randn(r, K, device=DEVICE, requires_grad=True)
    lora_B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    storages, y = saved_storages(lambda: fused_lora_linear(x, w, b, lora_A, lora_B, 1.0, p, backend=backend))
    params = {t.untyped_storage().data_ptr() for t in (w, lora_A, lora_B)}
    activations = {ptr: n for ptr, n in storages.items() if ptr not in params}
    s_bytes, seed_bytes = M * r * 4, 8  # S is fp32 at most; the seed is one int64
    assert x.untyped_storage().data_ptr() in activations, "x itself (not a copy) should be saved"
    assert sum(activations.values()) <= x.untyped_storage().nbytes() + s_bytes + seed_bytes, activations
    y.sum().backward()  # and the saved set suffices for backward


def test_q_k_v_sharing_one_input_save_it_once():
    # Three adapted projections reading the same hidden states keep one copy of it between them.
    M, K, N, r = 64, 48, 48, 4
    x = torch.randn(M, K, requires_grad=True)
    layers = [(torch.randn(N, K), torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True))
              for _ in range(3)]

    def qkv():
        return [fused_lora_linear(x, w, None, a, b, 1.0, 0.1, backend="torch") for w, a, b in layers]

    storages, _ = saved_storages(qkv)
    params = {t.untyped_storage().data_ptr() for layer in layers for t in layer}
    activations = {ptr: n for ptr, n in storages.items() if ptr not in params}
    assert sum(activations.values()) <= x.untyped_storage().nbytes() + 3 * (M * r * 4 + 8)
