"""Launchers: torch tensors in, Triton kernels launched, torch tensors out.

All functions take 2-D views (x: M×K, dY: M×N) whose strides the kernels follow, and the weight in
either layout ("linear": N×K, "conv1d": K×N) read through strides, never transposed or copied.

Two ways to run the layer (``gemm``):
- ``"fused"``: the base GEMM is a Triton kernel with the rank-r term folded into its accumulator (forward 2
  launches, backward 3).
- ``"composed"``: the base GEMM is cuBLAS (``torch.addmm``/``mm``), and the rank-r term is added in place into
  its output by a small kernel (forward: cuBLAS + 2 launches; backward: cuBLAS + 3). Turing GPUs take it
  (Triton lowers ``tl.dot`` to FMA there, no tensor cores: ``backend.py``), and it is the base for layers
  whose weight is not a dense matrix.

Every launch runs on the tensors' device and that device's current stream (``_on``), never on whatever
device happens to be current: a model spread over two GPUs runs each layer where it lives.

A kernel that cannot be built or launched on the device (``KERNEL_FAILURES``: out of shared memory or
registers, a ptxas or compiler error) does not stop the run: the call is computed by the PyTorch path with
the kernels' own dropout mask (so forward and backward still agree), once-per-reason warning
(``backend.warn_fallback``), and that signature is not tried again in this process.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import AutotunerError, OutOfResources, PTXASError

from . import backend, gemm_choice, kernels, torch_ops
from .base_ops import DenseBase
from .kernels import INTERPRET
from .kernels.configs import m_bucket

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
GEMMS = ("fused", "composed")
# What a GPU can raise while building or launching a kernel that it cannot run. Not InterpreterError: under
# TRITON_INTERPRET=1 a kernel bug must fail the tests, not be hidden by the fallback.
KERNEL_FAILURES = (OutOfResources, PTXASError, CompilationError, AutotunerError)
# (device, what) signatures whose kernels failed once: computed by the PyTorch path from then on.
_failed: set[tuple] = set()


def _on(device: torch.device):
    """Launches inside go to ``device`` and its current stream (Triton launches on the *current* device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _unused(device: torch.device) -> torch.Tensor:
    """One fp32 element per device passed for outputs a launch does not need (never read or written by the
    kernel, whose flag switches that code off): nothing allocated or zero-filled per call."""
    return torch.zeros(1, device=device, dtype=torch.float32)


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


def dot_precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    """fp32 dots follow PyTorch's switch: TF32 when it allows TF32 (``tf32_enabled``), else 3xTF32
    (``kernels/precision.py``: about fp32 accuracy on tensor cores; IEEE fp32 dots ran on the FMA units and
    spilled, bench/compile_report.py). GPUs before Ampere have no TF32 and Triton lowers their dots to FMA
    (``backend.py``): plain IEEE there. The interpreter computes every fp32 dot exactly and accepts both names,
    so the CPU tests run the same split code the GPU does. Half operands ignore the precision."""
    capability = backend.device_capability(device) if device is not None else None
    if capability is not None and capability < (8, 0):
        return "ieee"
    if dtype == torch.float32 and not tf32_enabled():
        return "tf32x3"
    return "tf32"


def _weight_strides(weight: torch.Tensor, weight_layout: str) -> tuple[int, int]:
    """(stride along K, stride along N) of the weight in its own layout."""
    if weight_layout == "linear":  # N×K
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)  # conv1d: K×N


def _fma_dots(device: torch.device) -> bool:
    """GPUs before Ampere (Turing): Triton lowers tl.dot to FMA instructions there (backend.py), and 64-rank chunks
    spilled 1.8-2.9 KB of stack per thread in every fp16 config of the rank-r kernels on sm_75 (compile report,
    triton 3.6/3.9): their chunks stay at 16."""
    capability = backend.device_capability(device)
    return capability is not None and capability < (8, 0)


def _block_r(r: int, adapter_dtype: torch.dtype, device: torch.device | None = None) -> int:
    """Rank chunk of the kernels that loop over the rank inside one program (the GEMMs' rank-r term, the in-place
    adds). tl.dot needs every dimension >= 16; chunks of up to 64 keep the fp32 accumulators small. fp32 adapters
    take chunks of 16 there: their 3xTF32 dots hold split operands beside a 128×128 accumulator, and 32-rank chunks
    spilled 8-88 B per thread, 64-rank ones 80-8288 B (bench/compile_report.py, sm_80/sm_90); looping costs them
    nothing, the tiles they read are tiny. 16 on Turing (``_fma_dots``)."""
    if adapter_dtype == torch.float32 or (device is not None and _fma_dots(device)):
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


def _skinny_block_r(r: int, device: torch.device | None = None) -> int:
    """Rank chunk of the skinny kernels (S = x Aᵀ, the dY pass, dA), whose grid spreads chunks over programs: each
    chunk re-reads x or dY and regenerates the mask. Up to 64 for every adapter dtype: with fp32 adapters 64-rank
    chunks compile without spills in the skinny configs (kernels/configs.py; issue 14), so r <= 64 reads x or dY
    once (16-rank chunks read them r/16 times: 4× at r = 64, bench/traffic_model.py). 16 on Turing
    (``_fma_dots``)."""
    if device is not None and _fma_dots(device):
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_factor(programs: int, max_split: int, device: torch.device, cap: int = 32) -> int:
    """How many slices to split a reduction into so that ~2 programs run per SM."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(2 * _num_sms(device), max(programs, 1))
    return max(1, min(want, max_split, cap))


# Element offsets a kernel may form, tile overhang included (masked lanes past the last row or column of a
# tile still compute their offsets): the largest tile edge is 256.
_INT32_REACH = 2**31 - 1
_TILE_OVERHANG = 256


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a launch over these tensors needs 64-bit offsets (``kernels/indexing.py``): some tensor spans 2³¹
    elements or more from its first element, counting the tiles' overhang."""
    for t in tensors:
        reach = sum((size - 1 + _TILE_OVERHANG) * abs(stride) for size, stride in zip(t.shape, t.stride(),
                                                                                          strict=True))
        if reach > _INT32_REACH:
            return True
    return False


def _drop_args(seed: int, p: float) -> tuple[int, float, float]:
    return seed, p, (1.0 / (1.0 - p) if p < 1.0 else 0.0)


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float, split_k: int | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ in fp32 (M×r). ``split_k`` slices of K (default: enough to fill the GPU when the row tiles
    alone do not), summed in a fixed order."""
    M, K = x.shape
    R = lora_A.shape[0]
    block_r = _skinny_block_r(R, x.device)
    if split_k is None:
        split_k = _split_factor(triton.cdiv(M, 64) * triton.cdiv(R, block_r), triton.cdiv(K, 256), x.device, cap=8)
    out = torch.empty((split_k, M, R) if split_k > 1 else (M, R), device=x.device, dtype=torch.float32)
    stride_ss = out.stride(0) if split_k > 1 else 0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r), split_k)
    kernels.lora_down_kernel[grid](
        x, lora_A, out, M, K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(-2), out.stride(-1), stride_ss,
        *_drop_args(seed, p),
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, x.device),
        WIDE=wide_offsets(x, lora_A, out), BLOCK_R=block_r,
    )
    return out.sum(0) if split_k > 1 else out


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, weight_layout: str,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N), one Triton GEMM."""
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    bias_arg = bias if bias is not None else _unused(x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernels.lora_fwd_kernel[grid](
        x, weight, bias_arg, s, lora_B, y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), stride_wk, stride_wn, s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), bias_arg.stride(0),
        scaling,
        HAS_BIAS=bias is not None, BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, x.device),
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, x.device),
        WIDE=wide_offsets(x, weight, bias_arg, s, lora_B, y), BLOCK_R=_block_r(R, lora_B.dtype),
    )
    return y


def lora_up_add(y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y += scaling · S Bᵀ in place (y: the base layer's M×N output); returns y."""
    M, N = y.shape
    R = lora_B.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    kernels.lora_up_add_kernel[grid](
        y, s, lora_B, M, N, R, m_bucket(M),
        y.stride(0), y.stride(1), s.stride(0), s.stride(1), lora_B.stride(0), lora_B.stride(1),
        scaling,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, y.device),
        WIDE=wide_offsets(y, s, lora_B), BLOCK_R=_block_r(R, lora_B.dtype, y.device),
    )
    return y


def lora_dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
    need_ds: bool, need_db: bool, need_dbias: bool, split_n: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over dY: (dS fp32 M×r, dB fp32 N×r, dbias fp32 N), each None when not needed."""
    M, N = dy.shape
    R = lora_B.shape[1]
    block_r = _skinny_block_r(R, dy.device)
    m_programs = triton.cdiv(M, 64) * triton.cdiv(R, block_r)
    if split_n is None:
        split_n = _split_factor(m_programs, triton.cdiv(N, 128), dy.device)
    f32 = {"device": dy.device, "dtype": torch.float32}
    unused = _unused(dy.device)
    ds = (torch.zeros((M, R), **f32) if split_n > 1 else torch.empty((M, R), **f32)) if need_ds else unused
    db = torch.zeros((N, R), **f32) if need_db else unused
    dbias = torch.zeros((N,), **f32) if need_dbias else unused
    ds_strides = (ds.stride(0), ds.stride(1)) if need_ds else (1, 1)
    db_strides = (db.stride(0), db.stride(1)) if need_db else (1, 1)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r), split_n)
    kernels.lora_dy_kernel[grid](
        dy, lora_B, s, ds, db, dbias, M, N, R, m_bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        *ds_strides, *db_strides,
        scaling,
        DS_ATOMIC=split_n > 1, HAS_DBIAS=need_dbias, NEED_DS=need_ds, NEED_DB=need_db,
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, dy.device),
        WIDE=wide_offsets(dy, lora_B, s, ds, db), BLOCK_R=block_r,
    )
    return (ds if need_ds else None), (db if need_db else None), (dbias if need_dbias else None)


def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor,
    weight_layout: str, seed: int, p: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``), one Triton GEMM."""
    M, N = dy.shape
    R, K = lora_A.shape
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
    kernels.lora_dx_kernel[grid](
        dy, weight, ds, lora_A, dx, M, N, K, R, m_bucket(M),
        dy.stride(0), dy.stride(1), stride_wk, stride_wn, ds.stride(0), ds.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        *_drop_args(seed, p),
        HAS_DROPOUT=p > 0, BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dy.device),
        WIDE=wide_offsets(dy, weight, ds, lora_A, dx), BLOCK_R=_block_r(R, lora_A.dtype),
    )
    return dx


def lora_dx_add(dx: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dX += m ⊙ (dS A) in place (dX: the base layer's input gradient, M×K); returns dX."""
    M, K = dx.shape
    R = lora_A.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]))
    kernels.lora_dx_add_kernel[grid](
        dx, ds, lora_A, M, K, R, m_bucket(M),
        dx.stride(0), dx.stride(1), ds.stride(0), ds.stride(1), lora_A.stride(0), lora_A.stride(1),
        *_drop_args(seed, p),
        HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dx.device),
        WIDE=wide_offsets(dx, ds, lora_A), BLOCK_R=_block_r(R, lora_A.dtype, dx.device),
    )
    return dx


def lora_da(
    ds: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float,
    split_m: int | None = None,
) -> torch.Tensor:
    """dA = dSᵀ (m ⊙ x) in fp32 (r×K)."""
    M, K = x.shape
    R = lora_A.shape[0]
    block_r = _skinny_block_r(R, x.device)
    if split_m is None:
        split_m = _split_factor(triton.cdiv(K, 64) * triton.cdiv(R, block_r), triton.cdiv(M, 128), x.device)
    alloc = torch.zeros if split_m > 1 else torch.empty
    da = alloc((R, K), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, block_r), split_m)
    kernels.lora_da_kernel[grid](
        ds, x, da, M, K, R, m_bucket(M),
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1),
        *_drop_args(seed, p),
        DA_ATOMIC=split_m > 1, HAS_DROPOUT=p > 0, LORA_DOT=dot_dtype(lora_A.dtype),
        LORA_PREC=dot_precision(lora_A.dtype, x.device), WIDE=wide_offsets(ds, x, da), BLOCK_R=block_r,
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
    with _on(device):
        kernels.dropout_mask_kernel[grid](out, M, K, out.stride(0), out.stride(1), *_drop_args(seed, p),
                                          WIDE=wide_offsets(out), BLOCK_M=block, BLOCK_K=block)
    return out


def _kernel_keep(seed: int, x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The kernels' boolean keep mask for x (None without dropout), for the PyTorch fallback."""
    if p == 0:
        return None
    try:
        return dropout_mask(seed, tuple(x.shape), p, x.device) > 0
    except KERNEL_FAILURES as err:
        raise RuntimeError(
            f"fused_lora: the Triton kernels cannot run on {x.device} (even the dropout-mask kernel failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Run the PyTorch path: "
            "FUSED_LORA_BACKEND=torch (or backend='torch')") from err


def _signature(device: torch.device, what: str, *tensors: torch.Tensor | None, **flags) -> tuple:
    return (device, what, *(None if t is None else (t.dtype, t.stride()) for t in tensors), *sorted(flags.items()))


def _failed_before(key: tuple) -> bool:
    return key in _failed


def _record_failure(key: tuple, what: str, err: Exception) -> None:
    _failed.add(key)
    first = str(err).splitlines()[0] if str(err) else ""
    backend.warn_fallback(f"a Triton kernel of the {what} failed on {key[0]} ({type(err).__name__}: {first[:160]}); "
                          "this call and later ones with the same shapes and dtypes run the PyTorch path, with the "
                          "kernels' dropout mask")


def _forward_with(
    x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float, seed: int,
    label: str, base_gemm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = dropout(x) Aᵀ by ``lora_down``, then ``base_gemm(S)`` → y with the rank-r term in it; the PyTorch path with
    the kernels' mask stands in when a kernel cannot run (``KERNEL_FAILURES``). Returns (y, S fp32)."""
    if x.numel() == 0 or lora_B.shape[0] == 0:  # a grid with a zero dimension is not a launch
        y, s = torch_ops.composed_forward(x, base, lora_A, lora_B, scaling, p, seed)
        return y, s.float()
    key = _signature(x.device, "forward", x, lora_A, lora_B, label=label, drop=p > 0)
    with _on(x.device):
        if not _failed_before(key):
            try:
                s = lora_down(x, lora_A, seed, p)
                return base_gemm(s), s
            except KERNEL_FAILURES as err:
                _record_failure(key, "forward", err)
        keep = _kernel_keep(seed, x, p)
        y, s = torch_ops.composed_forward(x, base, lora_A, lora_B, scaling, p, seed, keep=keep)
        return y, s.float()


def _backward_with(
    dy: torch.Tensor, x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
    scaling: float, p: float, seed: int, needs: tuple[bool, bool, bool, bool], label: str, base_dx,
) -> tuple[torch.Tensor | None, ...]:
    """One pass over dY (dS, dB, dbias), ``base_dx(dS)`` → dX with m ⊙ (dS A) in it, dA; the PyTorch path with the
    kernels' mask stands in when a kernel cannot run. Returns (dX, dA fp32, dB fp32, dbias fp32), None where not
    needed."""
    need_dx, need_da, need_db, need_dbias = needs
    if x.numel() == 0 or dy.numel() == 0:
        return torch_ops.composed_backward(dy, x, base, lora_A, lora_B, s, scaling, p, seed, *needs)
    key = _signature(x.device, "backward", dy, x, lora_A, lora_B, label=label, drop=p > 0, needs=needs)
    with _on(x.device):
        if not _failed_before(key):
            try:
                dx = da = None
                ds, db, dbias = lora_dy_pass(dy, lora_B, s, scaling, need_dx or need_da, need_db, need_dbias)
                if need_dx:
                    dx = base_dx(ds)
                if need_da:
                    da = lora_da(ds, x, lora_A, seed, p)
                return dx, da, db, dbias
            except KERNEL_FAILURES as err:
                _record_failure(key, "backward", err)
        keep = _kernel_keep(seed, x, p)
        return torch_ops.composed_backward(dy, x, base, lora_A, lora_B, s, scaling, p, seed, *needs, keep=keep)


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str, gemm: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y M×N in x's dtype, S M×r fp32). Two launches (fused), or cuBLAS + two (composed); ``"auto"``: the
    faster of the two for this shape (timed once, ``gemm_choice``)."""
    if gemm == "auto":
        k = gemm_choice.key(x.device, x, weight, lora_A, weight_layout, m_bucket(x.shape[0]))
        run = lambda g: lambda: forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, weight_layout, g)  # noqa: E731
        gemm = gemm_choice.choose(k, x.device, run("fused"), run("composed"))
    base = DenseBase(weight, bias, weight_layout)
    if gemm == "composed":
        return composed_forward(x, base, lora_A, lora_B, scaling, p, seed)
    return _forward_with(x, base, lora_A, lora_B, scaling, p, seed, f"fused-{weight_layout}",
                         lambda s: lora_forward(x, weight, bias, s, lora_B, scaling, weight_layout))


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, p: float, seed: int, weight_layout: str,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool, gemm: str = "fused",
) -> tuple[torch.Tensor | None, ...]:
    """At most three launches (plus cuBLAS's dY W when composed). Returns (dX, dA fp32, dB fp32, dbias fp32),
    None where not needed. ``"auto"``: the choice its forward made for this shape."""
    if gemm == "auto":
        k = gemm_choice.key(x.device, x, weight, lora_A, weight_layout, m_bucket(x.shape[0]))
        gemm = gemm_choice.cached(k) or "fused"
    base = DenseBase(weight, None, weight_layout)
    needs = (need_dx, need_da, need_db, need_dbias)
    if gemm == "composed":
        return composed_backward(dy, x, base, lora_A, lora_B, s, scaling, p, seed, *needs)
    return _backward_with(dy, x, base, lora_A, lora_B, s, scaling, p, seed, needs, f"fused-{weight_layout}",
                          lambda ds: lora_dx(dy, weight, ds, lora_A, weight_layout, seed, p, x.dtype))


def composed_forward(
    x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base(x) (the base's own GEMM: cuBLAS, bitsandbytes) + the rank-r term added in place. cuBLAS + 2 launches."""
    return _forward_with(x, base, lora_A, lora_B, scaling, p, seed, f"composed-{type(base).__name__}",
                         lambda s: lora_up_add(base.forward(x), s, lora_B, scaling))


def composed_backward(
    dy: torch.Tensor, x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
    scaling: float, p: float, seed: int, need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """dX = the base's input gradient with m ⊙ (dS A) added in place; dA, dB, dbias as the fused path. 3 launches."""
    return _backward_with(dy, x, base, lora_A, lora_B, s, scaling, p, seed, (need_dx, need_da, need_db, need_dbias),
                          f"composed-{type(base).__name__}",
                          lambda ds: lora_dx_add(base.input_grad(dy, x.dtype), ds, lora_A, seed, p))
