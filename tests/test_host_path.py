"""The host path's work per forward + backward, held as counts: kernel launches, allocations and aten ops
of the Triton path (counted on the host with the kernels stubbed out: bench/host_cost.py), and the aten ops of the
PyTorch path. A count, not a time: an extra op or buffer added to the per-call path fails here, whatever the
machine's load. Update a number only with the reason in the commit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import CUDA
from torch.utils._python_dispatch import TorchDispatchMode

from fused_lora import LoRALinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_cost  # noqa: E402

FUSED = ["lora_down_kernel", "lora_fwd_kernel", "lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel"]
COMPOSED = ["lora_down_kernel", "lora_up_add_kernel", "lora_dy_kernel", "lora_dx_add_kernel", "lora_da_kernel"]


@pytest.fixture(scope="module", autouse=True)
def warm():
    for p in (0.0, 0.1):  # one-time allocations (the cached dummy buffers: outputs not needed, no seed)
        host_cost.triton_path_counts(p=p)


@pytest.mark.parametrize("gemm", ["fused", "composed"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias-trained", "bias-frozen"])
def test_triton_path_counts(gemm, p, bias_grad):
    c = host_cost.triton_path_counts(p=p, gemm=gemm, bias_grad=bias_grad)
    # 2 launches forward, 3 backward, whatever the flags.
    assert c["launches"] == (FUSED if gemm == "fused" else COMPOSED) and c["forward_launches"] == 2
    # S and y forward; dS, dB (zeroed: atomics), dX, dA backward, and dbias (zeroed: atomics) when the bias trains.
    # The composed path's y and dX come from cuBLAS (addmm, mm), which the allocation list does not name. Outputs are
    # allocated with their strides (empty_strided: 1.1 µs a call on the host, empty 1.6).
    fresh = "empty_strided"
    want = ([fresh, fresh] if gemm == "fused" else [fresh]) + [fresh, "zeros"]
    want += ["zeros"] * bias_grad + ([fresh, fresh] if gemm == "fused" else [fresh])
    assert sorted(c["allocations"]) == sorted(want), c["allocations"]
    # Every aten op: the allocations, cuBLAS's base GEMMs (composed), the seed's tensor (dropout), and
    # PyTorch's own detach of each gradient it accumulates.
    base_ops = ["t", "addmm", "t", "t", "mm"] if gemm == "composed" else []
    # the seed made (here from dropout_seed=3) and never read on the host: the kernels read it from device memory, so
    # the Triton path has no host sync and can be captured in a CUDA graph
    seed_ops = ["lift_fresh"] if p > 0 else []
    detach = ["detach"] * (3 + bias_grad)
    assert sorted(c["ops"]) == sorted(c["allocations"] + base_ops + seed_ops + detach), c["ops"]


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# the keep mask from the seed: one draw, four 16-bit lanes a word, compared, converted once to the adapters' dtype
MASK = ["randint", "view", "detach", "view", "ge", "_to_copy"]


@pytest.mark.skipif(CUDA, reason="counts the CPU (PyTorch) path")
@pytest.mark.parametrize(("p", "forward", "backward"), [
    # p = 0, same-dtype adapters: plain autograd ops (base addmm, S = x Aᵀ, the rank-r addmm_), backward by PyTorch's
    # own formulas (no Python): dB, dS, dA, dX products and one add, plus its views and detaches.
    (0.0, ["t", "addmm", "t", "mm", "t", "addmm_"],
     ["t", "mm", "t", "mm", "t", "t", "detach", "t", "mm", "t", "t", "mm", "t", "detach", "t", "mm", "add", "detach"]),
    # p > 0: the Function. Forward: the seed (drawn and read once), the base addmm, the mask, x masked, S with its
    # 1/(1-p), the rank-r addmm_. Backward: dB, dS (1/(1-p) folded in), the mask again, dA on masked x, dS A, dX = dY W
    # with the masked dS A added in one addcmul_.
    (0.1, ["randint", "_local_scalar_dense", "t", "addmm", *MASK, "mul", "t", "mm", "mul_", "t", "addmm_"],
     ["t", "mm", "mul_", "mm", "mul_", *MASK, "t", "mul", "mm", "mm", "mm", "addcmul_", "detach", "detach",
      "detach"]),
])
def test_torch_path_ops(p, forward, backward):
    torch.manual_seed(0)
    layer = LoRALinear(64, 48, r=8, lora_dropout=p, init_lora_weights=False)
    x = torch.randn(4, 64, requires_grad=True)
    dy = torch.randn(4, 48)
    layer(x).backward(dy)  # warm-up: the per-thread Generator is made once
    layer.zero_grad(set_to_none=True)
    x.grad = None
    mode = _Ops()
    with mode:
        y = layer(x)
        n_forward = len(mode.ops)
        y.backward(dy)
    assert mode.ops[:n_forward] == forward
    assert mode.ops[n_forward:] == backward
