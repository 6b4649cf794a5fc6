"""QLoRA kernels (kernels/lora_4bit.py, fused_lora/backends/bnb4_triton.py) against bitsandbytes itself, through
Triton's interpreter on CPU (bitsandbytes >= 0.47 quantizes and dequantizes 4-bit weights on CPU).

- dequantization: ``dequantize`` (Triton) and ``dequantize_ref`` (PyTorch) give bitsandbytes' W bit for bit, over
  NF4/FP4, double quantization or not, every blocksize, W dtypes fp32/fp16/bf16 and shapes whose rows split bytes
  and quantization blocks (odd K, N = 1, K = 1);
- the GEMMs: y = x Wᵀ + b + s·S Bᵀ and dX = dY W + m ⊙ (dS A) against an fp64 reference built on bitsandbytes'
  dequantized W, with the dense tests' rule (error ≤ 2× PyTorch's same-dtype error + a small atol);
- memory: the forward and dX launchers create no tensor of W's size (no dequantized copy).

The reference W is bitsandbytes' device-independent dequantize_4bit implementation (``backends/default/ops.py``,
what ``bitsandbytes.functional.dequantize_4bit`` runs on CPU for odd K and blocksize >= 2048, and what its CUDA
kernel computes), with the nested absmax from ``functional.dequantize_blockwise`` exactly as ``dequantize_4bit``
computes it. ``functional.dequantize_4bit`` itself is compared too where its native CPU kernel runs (even K) and is
right: bitsandbytes 0.50.2's AVX512 CPU kernel reads the wrong scale for some rows when a quantization block spans
two rows of W (e.g. N×K = 3×96 or 16×32 with blocksize 64: values off by up to 2.5× of the right scale), and
returns +0.0 for FP4's -0.0 code; blocks that start every row (K a multiple of blocksize) are read right.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import assert_within_torch_error, atol_for, reference_pair
from torch.utils._python_dispatch import TorchDispatchMode

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from fused_lora import dropout_mask  # noqa: E402
from fused_lora.backends import bnb4_triton, lora_triton  # noqa: E402
from fused_lora.backends.bnb4_triton import Packed4bit  # noqa: E402

# bitsandbytes' blocksizes are the powers of two 32…4096; only the shift amount differs between them in the kernels.
# 32 and 64 give 5 and 3 scale slots per row of a 128-wide tile, 4096 spans whole test matrices.
BLOCKSIZES = [32, 64, 128, 256, 4096]
W_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): a byte and a block straddle rows (K = 70, 45 odd), one row, one column, and rows that start blocks.
SHAPES = [(33, 70), (1, 45), (37, 1), (4, 128)]


def quantized(N, K, quant_type="nf4", nested=True, blocksize=64, w_dtype=torch.bfloat16, storage=torch.uint8, seed=0):
    """A bitsandbytes Params4bit holding a random N×K weight of ``w_dtype`` (quantized on CPU, as on .to(device))."""
    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K**-0.5).to(w_dtype)
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                             compress_statistics=nested, quant_storage=storage).to("cpu")


def bnb_dequantized(weight) -> torch.Tensor:
    """W as bitsandbytes' device-independent dequantize_4bit computes it (module docstring)."""
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:  # functional.dequantize_4bit's own steps
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes torch.compiles it; eager is the same arithmetic
        return _dequantize_4bit_compute(weight.data.reshape(-1).view(torch.uint8), absmax, state.code,
                                        state.blocksize, state.shape, state.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_for_bit(quant_type, nested, w_dtype):
    for blocksize in BLOCKSIZES:
        for N, K in SHAPES:
            weight = quantized(N, K, quant_type, nested, blocksize, w_dtype, seed=N + K + blocksize)
            packed = Packed4bit.from_params(weight)
            want = bnb_dequantized(weight)
            case = f"{quant_type} nested={nested} blocksize={blocksize} {N}×{K} {w_dtype}"
            results = {"dequantize": bnb4_triton.dequantize(packed), "ref": bnb4_triton.dequantize_ref(packed),
                       "dequantize forward tiles": bnb4_triton.dequantize(packed, forward_tiles=True)}
            for name, got in results.items():
                assert got.dtype == w_dtype and got.shape == (N, K), (name, case)
                assert torch.equal(bits(got), bits(want)), f"{name}: {case}"
            if K % 2 or K % blocksize == 0:  # the public function, where its CPU kernel is right (module docstring)
                with torch.compiler.set_stance("force_eager"):  # K odd: bitsandbytes' torch.compiled path
                    public = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                assert torch.equal(bnb4_triton.dequantize(packed), public), case


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_viewed_as_bytes(storage):
    # Params4bit(quant_storage=...) keeps the packed bytes in another dtype; from_params views them as uint8.
    weight = quantized(24, 40, "fp4", True, 64, torch.float16, storage=storage)
    assert weight.data.dtype == storage
    packed = Packed4bit.from_params(weight)
    assert packed.data.dtype == torch.uint8 and packed.data.data_ptr() == weight.data.data_ptr()
    assert torch.equal(bits(bnb4_triton.dequantize(packed)), bits(bnb_dequantized(weight)))


# (x dtype, quant-state dtype, adapter dtype): QLoRA's usual bf16 compute with fp32 adapters (PEFT's default), half
# adapters, a W dtype other than x's (rounded to W's dtype, then x's), fp32 end to end.
DTYPE_CASES = [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
]
# (quant_type, nested, blocksize, M, N, K, r, p, bias, x layout): odd sizes everywhere; K a multiple of the blocksize
# (the kernels' ALIGNED path: scales per row of W) or not (bytes and blocks straddle rows: scales per element).
GEMM_CASES = [
    ("nf4", True, 64, 37, 33, 128, 12, 0.2, True, "contiguous"),
    ("nf4", True, 64, 21, 17, 70, 5, 0.1, False, "contiguous"),
    ("fp4", False, 128, 19, 40, 45, 8, 0.0, False, "transposed"),
    ("nf4", False, 32, 5, 1, 96, 16, 0.3, True, "sliced"),
    ("fp4", True, 256, 33, 65, 1, 4, 0.0, True, "contiguous"),
]


def _x(M, K, dtype, layout, gen):
    if layout == "transposed":  # column-major: stride (1, M)
        return torch.randn(K, M, generator=gen).to(dtype).t()
    if layout == "sliced":  # every other column of a wider tensor: stride (2K, 2)
        return torch.randn(M, 2 * K, generator=gen).to(dtype)[:, ::2]
    return torch.randn(M, K, generator=gen).to(dtype)


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"{c[0]}-{'nested' if c[1] else 'plain'}-bs{c[2]}-K{c[5]}")
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=lambda d: "/".join(str(t).split(".")[1] for t in d))
def test_forward_and_dx_match_bitsandbytes(case, dtypes):
    quant_type, nested, blocksize, M, N, K, r, p, has_bias, layout = case
    x_dtype, w_dtype, adapter_dtype = dtypes
    scaling, seed = 2.0, 1234
    gen = torch.Generator().manual_seed(M * N + K)
    weight = quantized(N, K, quant_type, nested, blocksize, w_dtype, seed=K)
    packed = Packed4bit.from_params(weight)
    x = _x(M, K, x_dtype, layout, gen)
    bias = torch.randn(N, generator=gen).to(x_dtype) if has_bias else None
    lora_A = (torch.randn(r, K, generator=gen) * K**-0.5).to(adapter_dtype)
    lora_B = (torch.randn(N, r, generator=gen) * r**-0.5).to(adapter_dtype)
    dy = torch.randn(M, N, generator=gen).to(x_dtype)

    # The kernels' pipeline: S and dS from the dense path's launchers, the base GEMMs from the 4-bit ones.
    s = lora_triton.lora_down(x, lora_A, seed, p)
    y = bnb4_triton.forward_4bit(x, packed, bias, s, lora_B, scaling)
    ds = lora_triton.lora_dy_pass(dy, lora_B, s, scaling, True, False, False)[0]
    dx = bnb4_triton.dx_4bit(dy, packed, ds, lora_A, seed, p, x_dtype)

    # bitsandbytes' matmul_4bit: W dequantized to the quant state's dtype, then cast to x's.
    w_x = bnb_dequantized(weight).to(x_dtype)
    mask = dropout_mask(seed, (M, K), p, x.device, backend="triton") if p > 0 else None
    ref, same = reference_pair(x.detach().requires_grad_(), w_x, bias, lora_A, lora_B, scaling, "linear", mask, dy)
    assert y.dtype == x_dtype and dx.dtype == x_dtype
    assert_within_torch_error("y", y, same["y"], ref["y"], atol_for(x_dtype, ref["y"].abs().max().item()))
    assert_within_torch_error("dx", dx, same["dx"], ref["dx"], atol_for(x_dtype, ref["dx"].abs().max().item()))


def test_empty_and_mismatched_inputs():
    packed = Packed4bit.from_params(quantized(8, 6))
    lora_B, lora_A = torch.zeros(8, 2), torch.zeros(2, 6)
    assert bnb4_triton.forward_4bit(torch.zeros(0, 6), packed, None, torch.zeros(0, 2), lora_B, 1.0).shape == (0, 8)
    dx = bnb4_triton.dx_4bit(torch.zeros(0, 8), packed, torch.zeros(0, 2), lora_A, 0, 0.0, torch.float32)
    assert dx.shape == (0, 6)
    with pytest.raises(ValueError, match="do not fit"):
        bnb4_triton.forward_4bit(torch.zeros(3, 7), packed, None, torch.zeros(3, 2), lora_B, 1.0)
    with pytest.raises(ValueError, match="not quantized"):
        Packed4bit.from_params(bnb.nn.Params4bit(torch.randn(4, 4), requires_grad=False))
    with pytest.raises(ValueError, match="power of two"):
        Packed4bit(**{**{f: getattr(packed, f) for f in packed.__dataclass_fields__}, "blocksize": 48})


class _Allocations(TorchDispatchMode):
    """Numels of every tensor an aten op returns while active (allocations, casts, copies, views alike)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_no_dequantized_copy_of_w():
    # x, y, dY, dX, S and the adapters are all far smaller than W here, so a tensor of N·K elements or more can only
    # be a dense W. dequantize() must show one (the check sees what it claims to), forward_4bit and dx_4bit none.
    M, N, K, r = 6, 96, 80, 4
    packed = Packed4bit.from_params(quantized(N, K, "nf4", True, 64, torch.bfloat16))
    x, dy = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(M, N, dtype=torch.bfloat16)
    lora_A, lora_B = torch.randn(r, K), torch.randn(N, r)
    s, ds = torch.randn(M, r), torch.randn(M, r)
    calls = {
        "forward_4bit": lambda: bnb4_triton.forward_4bit(x, packed, None, s, lora_B, 2.0),
        "dx_4bit": lambda: bnb4_triton.dx_4bit(dy, packed, ds, lora_A, 7, 0.1, torch.bfloat16),
        "dequantize": lambda: bnb4_triton.dequantize(packed),
    }
    for name, call in calls.items():
        with _Allocations() as seen:
            call()
        assert seen.numels, name  # the mode saw the launcher's own allocations
        w_sized = [n for n in seen.numels if n >= N * K]
        assert bool(w_sized) == (name == "dequantize"), (name, seen.numels)


def test_imports_without_bitsandbytes():
    # bitsandbytes is optional: fused_lora and its 4-bit launchers import with it absent.
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import fused_lora, fused_lora.backends.bnb4_triton; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
