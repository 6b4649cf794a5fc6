"""Several LoRA adapters on one bitsandbytes base (kernels/multi_lora_4bit.py, backends/multi_bnb4_triton.py, and the
composed paths of multi_triton / multi_torch over the 4-bit and 8-bit kinds' base objects): against fp64 on the layer's
dequantized W with the tests' rule, and each adapter's share of the fused 4-bit GEMMs equal to the single-adapter
launchers' (bnb4_triton) on x_i alone. bitsandbytes quantizes on CPU (a Linear4bit built by hand: no CPU inference
repack, NOTES on bitsandbytes)."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, DEVICE
from test_multi_kernels import Case, _check, _same, adapters_of, build, masks, references

from fused_lora import bases
from fused_lora.autograd.driver import call_record
from fused_lora.backends import multi_torch, multi_triton
from fused_lora.call import Operands
from fused_lora.kernels.configs import INTERPRET
from fused_lora.segments import bias_grads

bnb = pytest.importorskip("bitsandbytes")


def _bnb_base(bits: int, K: int, N: int, compute_dtype: torch.dtype):
    from torch import nn

    torch.manual_seed(K + N)
    dense = nn.Linear(K, N)
    if bits == 4:
        layer = bnb.nn.Linear4bit(K, N, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    return bases.base_of(layer.to(DEVICE))[1]


# (bits, path, x dtype, K): K a multiple of the blocksize (the fused 4-bit GEMMs' aligned scale loads) or not (their
# per-element scales; the composed path on GPUs, the interpreter runs both).
QUANT_CASES = [(4, "triton-fused", torch.float32, 64), (4, "triton-fused", torch.bfloat16, 70),
               (4, "triton-composed", torch.bfloat16, 64), (4, "torch", torch.float32, 64),
               (8, "triton-composed", torch.float32, 64), (8, "torch", torch.float32, 64)]


@pytest.mark.parametrize(("bits", "path", "dtype", "K"), QUANT_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_quantized_base_against_fp64(bits, path, dtype, K):
    from fused_lora.backends import multi_bnb4_triton

    case = Case((9, 0, 40), (3, 16, 1), (0.2, 0.0, 0.0), dtype, "linear", "own", K=K, N=33)
    base = _bnb_base(bits, K, case.N, dtype)
    d = build(case, seed=bits)
    d["bias"] = base.layer.bias
    d["weight"] = base.dequantized().to(dtype)  # the references' W: the layer's own, dequantized
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    args = (adapters, segments, d["seeds"])
    if path == "triton-fused":
        y, s = multi_bnb4_triton.fused_forward(d["x"], base, base.layer.bias, *args)
        grads = multi_bnb4_triton.fused_backward(d["dy"], d["x"], base, *args, s, True, True, True, True)
    else:
        module = multi_torch if path == "torch" else multi_triton
        y, s = module.composed_forward(d["x"], base, *args)
        grads = module.composed_backward(d["dy"], d["x"], base, *args, s, True, True, True, True)
    dx, das, dbs, dbias = grads
    base_grad, own_grads = bias_grads(dbias, adapters)
    ref, same = references(d, case, masks(path, case, d["seeds"]))
    assert y.dtype == dtype and dx.dtype == dtype
    _check("y", y, same["y"], ref["y"], dtype)
    _check("dx", dx, same["dx"], ref["dx"], dtype)
    for i in range(adapters.n):
        _check(f"dA[{i}]", das[i], same["dA"][i], ref["dA"][i], torch.float32)
        _check(f"dB[{i}]", dbs[i], same["dB"][i], ref["dB"][i], torch.float32)
    _check("own bias[1]", own_grads[1], same["own"][1], ref["own"][1], torch.float32)
    _check("dbias", base_grad, same["dbias"], ref["dbias"], torch.float32)


def test_4bit_fused_each_adapter_alone():
    """The fused 4-bit GEMMs: segment i's y and dX rows equal bnb4_triton's single-adapter launchers on x_i alone."""
    from fused_lora.backends import bnb4_triton, multi_bnb4_triton

    case = Case((5, 0, 37), (1, 8, 16), (0.3, 0.0, 0.1), torch.float32, "linear", "own", K=64, N=19)
    base = _bnb_base(4, case.K, case.N, torch.float32)
    d = build(case, seed=4)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    y, s = multi_bnb4_triton.fused_forward(d["x"], base, base.layer.bias, adapters, segments, d["seeds"])
    dx = multi_bnb4_triton.fused_backward(d["dy"], d["x"], base, adapters, segments, d["seeds"], s, True, False, False,
                                          False)[0]
    exact = INTERPRET and not CUDA
    for i, n in enumerate(case.lengths):
        if n == 0:
            continue
        rows = segments.rows_of(i)
        bias_i = d["own"][i] if d["own"][i] is not None else base.layer.bias
        call = call_record("lora", bases.get("bnb-4bit"), "linear", d["scalings"][i], case.ps[i], "triton", "fused",
                           ("fused", "composed", "torch"))
        t = Operands(d["x"][rows], None, bias_i, d["A"][i], d["B"][i], None, base)
        y_i, s_i = bnb4_triton.fused_forward(t, call, d["seeds"][i])
        dx_i = bnb4_triton.fused_backward(t, call, (s_i,), d["dy"][rows], (True, False, False, False), d["seeds"][i])[0]
        _same(f"y[{i}]", y[rows], y_i, exact)
        _same(f"dx[{i}]", dx[rows], dx_i, exact)


