"""Launchers: torch tensors in, Triton kernels launched, torch tensors out.

All functions take 2-D views (x: M×K, dY: M×N) whose strides the kernels follow, and the weight in
either layout ("linear": N×K, "conv1d": K×N) read through strides, never transposed or copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kernels, torch_ops
from .kernels import INTERPRET

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype operands of ``dtype`` are cast to before ``tl.dot``.

    Under the interpreter, bf16 (and fp16) dots are computed in fp32: Triton's interpreter stores bf16
    as uint16 and its dot/add/mul act on the bit patterns (triton#11584, closed unfixed; a bf16 dot gives
    ~1e11 here on triton 3.9). Loads, stores and casts are right, and the product of two half values is
    exact in fp32, so upcasting the operands gives what a GPU tensor core computes (half inputs, fp32
    accumulation). ``tests/test_interpreter_bf16.py`` checks both the bug and this workaround.
    """
    if INTERPRET:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's switch: TF32 when ``torch.backends.cuda.matmul.allow_tf32``, else 3xTF32
    (``kernels/precision.py``: about fp32 accuracy on tensor cores; IEEE fp32 dots ran on the FMA units and
    spilled, bench/compile_report.py). The interpreter computes every fp32 dot exactly and accepts both
    names, so the CPU tests run the same split code the GPU does. Half operands ignore the precision."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _weight_strides(weight: torch.Tensor, weight_layout: str) -> tuple[int, int]:
    """(stride along K, stride along N) of the weight in its own layout."""
    if weight_layout == "linear":  # N×K
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)  # conv1d: K×N


def _block_r(r: int, adapter_dtype: torch.dtype) -> int:
    # tl.dot needs every dimension >= 16; ranks above the chunk are looped over (GEMM kernels) or spread
    # over programs (skinny kernels) in chunks of 64, which keeps the fp32 accumulators small. fp32 adapters
    # take chunks of 16: their 3xTF32 dots hold split operands, and 32-rank chunks spilled 8-88 B per thread,
    # 64-rank ones 80-8288 B (bench/compile_report.py, sm_80/sm_90). The price: the skinny kernels read
    # x or dY once per 16 ranks instead of once per 64 (open: measure on a GPU).
    if adapter_dtype == torch.float32:
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


def _m_bucket(m: int) -> int:
    # Autotune key: one tuning per power-of-two token count instead of one per distinct M.
    return triton.next_power_of_2(max(m, 1))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_factor(programs: int, max_split: int, device: torch.device) -> int:
    """How many slices to split a reduction into so that ~2 programs run per SM."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(2 * _num_sms(device), max(programs, 1))
    return max(1, min(want, max_split, 32))


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """S = dropout(x) Aᵀ in fp32 (M×r)."""
    M, K = x.shape
    R = lora_A.shape[0]
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    block_r = _block_r(R, lora_A.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))
    kernels.lora_down_kernel[grid](
        x, lora_A, s, M, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype),
        BLOCK_R=block_r,
    )
    return s


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, weight_layout: str,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N)."""
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernels.lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, s, lora_B, y,
        M, N, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), stride_wk, stride_wn, s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype),
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype), BLOCK_R=_block_r(R, lora_B.dtype),
    )
    return y


def lora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
    need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N), each None when not needed."""
    M, N = dy.shape
    R = lora_B.shape[1]
    block_r = _block_r(R, lora_B.dtype)
    m_programs = triton.cdiv(M, 64) * triton.cdiv(R, block_r)
    if split_n is None:
        split_n = _split_factor(m_programs, triton.cdiv(N, 128), dy.device)
    zeros = lambda *shape: torch.zeros(shape, device=dy.device, dtype=torch.float32)
    ds = (zeros(M, R) if split_n > 1 else torch.empty((M, R), device=dy.device)) if need_ds else zeros(1, 1)
    db = zeros(N, R) if need_db else zeros(1, 1)
    dbias = zeros(N) if need_dbias else zeros(1)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r), split_n)
    kernels.lora_dy_kernel[grid](
        dy, lora_B, s, ds, db, dbias, M, N, R, _m_bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1), db.stride(0), db.stride(1),
        scaling,
        SPLIT_N=split_n, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype), BLOCK_R=block_r,
    )
    return (ds if need_ds else None), (db if need_db else None), (dbias if need_dbias else None)


def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
    weight_layout: str, seed: int, p: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``)."""
    M, N = dy.shape
    R, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
    kernels.lora_dx_kernel[grid](
        dy, weight, ds, lora_A, dx, M, N, K, R, _m_bucket(M),
        dy.stride(0), dy.stride(1), stride_wk, stride_wn, ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype), BLOCK_R=_block_r(R, lora_A.dtype),
    )
    return dx


def lora_da(
    ds: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float,
    split_m: int | None = None,
) -> torch.Tensor:
    """dA = dSᵀ (m ⊙ x) in fp32 (r×K)."""
    M, K = x.shape
    R = lora_A.shape[0]
    block_r = _block_r(R, lora_A.dtype)
    if split_m is None:
        split_m = _split_factor(triton.cdiv(K, 64) * triton.cdiv(R, block_r), triton.cdiv(M, 128), x.device)
    alloc = torch.zeros if split_m > 1 else torch.empty
    da = alloc((R, K), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, block_r), split_m)
    kernels.lora_da_kernel[grid](
        ds, x, da, M, K, R, _m_bucket(M),
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1),
        seed, p, 1.0 / (1.0 - p),
        SPLIT_M=split_m, HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype),
        LORA_PREC=dot_precision(lora_A.dtype), BLOCK_R=block_r,
    )
    return da


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The scaled keep mask (fp32, 0 or 1/(1-p)) the kernels use for ``seed``; M×K."""
    M, K = shape
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out
    block = 32
    grid = (triton.cdiv(M, block), triton.cdiv(K, block))
    kernels.dropout_mask_kernel[grid](out, M, K, out.stride(0), out.stride(1), seed, p, 1.0 / (1.0 - p),
                                      BLOCK_M=block, BLOCK_K=block)
    return out


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two launches. Returns (y M×N in x's dtype, S M×r fp32)."""
    if x.numel() == 0 or lora_B.shape[0] == 0:  # a grid with a zero dimension is not a launch
        return torch_ops.forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout)
    s = lora_down(x, lora_A, seed, p)
    return lora_forward(x, weight, bias, s, lora_B, scaling, weight_layout), s


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """At most three launches. Returns (dX, dA fp32, dB fp32, dbias fp32), None where not needed."""
    if x.numel() == 0 or dy.numel() == 0:
        return torch_ops.backward(dy, x, weight, lora_A, lora_B, s, scaling, p, seed, weight_layout,
                                  need_dx, need_da, need_db, need_dbias)
    need_ds = need_dx or need_da
    dx = da = None
    ds, db, dbias = lora_dy_pass(dy, lora_B, s, scaling, need_ds, need_db, need_dbias)
    if need_dx:
        dx = lora_dx(dy, weight, ds, lora_A, weight_layout, seed, p, x.dtype)
    if need_da:
        da = lora_da(ds, x, lora_A, seed, p)
    return dx, da, db, dbias
