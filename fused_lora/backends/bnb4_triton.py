"""Launchers of the QLoRA kernels (``kernels/lora_4bit.py``): the base GEMMs of a LoRA layer whose frozen W is a
bitsandbytes ``Linear4bit`` weight, read from its 4-bit storage and dequantized in registers, never as a dense copy.

    packed = Packed4bit.from_params(layer.weight)       # once per layer: the only place that reads a QuantState
    y  = forward_4bit(x2d, packed, bias, s, lora_B, scaling)             # x Wᵀ + b + s·S Bᵀ, x's dtype
    dx = dx_4bit(dy2d, packed, ds, lora_A, seed, p, out_dtype)           # dY W + m ⊙ (dS A)
    W  = dequantize(packed)          # dense W in the quant state's dtype (Triton), for merges and tests
    W  = dequantize_ref(packed)      # the same in plain PyTorch: the kernels' reference

Layers whose K (in_features) is a multiple of the blocksize (every projection of the usual models with
blocksize 64) take the kernels' ``ALIGNED`` path (block scales loaded per row of W); other shapes are exact too,
with per-element scale loads and the 64×64 tiles only (kernels/lora_4bit.py).

S and dS come from the dense path's own launchers (``lora_triton.lora_down`` / ``lora_dy_pass``), and dA from
``lora_triton.lora_da``: only the base GEMMs read W. Numerics follow ``bnb.matmul_4bit``: W is ``code[q] · absmax``
in fp32 rounded to the quant state's dtype, then to x's dtype (``dequantize_4bit(W, state).to(x.dtype)``); the GEMM
then runs as the dense kernels' (fp32 accumulation, the rank-r term in the same accumulator, one rounding).
``Linear4bit`` casts x and the bias to its ``compute_dtype`` before its matmul: callers do the same before
``forward_4bit``.

bitsandbytes is an optional dependency: this module imports without it; only ``Packed4bit.from_params`` reads a
bitsandbytes object (by attribute; it imports nothing from bitsandbytes either, nor does ``base_layers``' reading of
the CPU inference packing it uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base_layers import in_cpu_packing, unpack_cpu_packing
from ..kernels.configs import m_bucket
from ..kernels.lora_4bit import dequantize_4bit_kernel, lora_dx_4bit_kernel, lora_fwd_4bit_kernel
from .lora_triton import backward_with, forward_with
from .triton_launch import (
    INT32_REACH,
    TILE_OVERHANG,
    TL_DTYPES,
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    drop_args,
    on_device,
    rank_block,
    unused,
    wide_offsets,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' (functional.dequantize_4bit checks these)
QUANT_TYPES = ("nf4", "fp4")
_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class Packed4bit:
    """A bitsandbytes 4-bit weight W (N×K = out×in) as the kernels read it; all tensors on one device.

    - ``data``: uint8, 1-D, at least ceil(N·K/2) bytes: W flattened row-major, two codes a byte, the even flat index
      in the high nibble (``Params4bit.data`` viewed as bytes, whatever its ``quant_storage`` dtype);
    - ``absmax``: one scale per ``blocksize`` consecutive flat elements: fp32, or uint8 indices when ``nested``;
    - ``code``: fp32 (16,), the NF4 or FP4 values (``quant_type``);
    - ``blocksize``: a power of two (bitsandbytes: 32…4096); ``shape``: (N, K); ``dtype``: the dtype dequantized
      values are rounded to (the quant state's: W's dtype before quantization);
    - nested (double quantization) only: ``absmax2`` fp32, one per ``blocksize2`` blocks; ``code2`` fp32 (256,);
      ``offset`` fp32 (1,): the real scale of block b is ``code2[absmax[b]] · absmax2[b // blocksize2] + offset``.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    quant_type: str
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        N, K = self.shape
        numel, blocks = N * K, -(-(N * K) // self.blocksize)
        problems = []
        if self.data.dtype != torch.uint8 or self.data.dim() != 1 or self.data.numel() < -(-numel // 2):
            problems.append(f"data must be 1-D uint8 with >= {-(-numel // 2)} bytes, got {self.data.dtype} "
                            f"{tuple(self.data.shape)}")
        for name, size in (("blocksize", self.blocksize), ("blocksize2", self.blocksize2)):
            if size < 1 or size & (size - 1):
                problems.append(f"{name} must be a power of two, got {size}")
        if self.dtype not in _W_DTYPES:
            problems.append(f"dtype must be fp32, fp16 or bf16, got {self.dtype}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            problems.append(f"code must be 16 fp32 values, got {self.code.dtype} {tuple(self.code.shape)}")
        nested_parts = [t is None for t in (self.absmax2, self.code2, self.offset)]
        if any(nested_parts) and not all(nested_parts):
            problems.append("absmax2, code2 and offset go together (double quantization) or not at all")
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() < blocks:
            problems.append(f"absmax must hold >= {blocks} {want} values, got {self.absmax.dtype} "
                            f"{tuple(self.absmax.shape)}")
        if self.nested:
            groups = -(-blocks // self.blocksize2)
            if self.absmax2.dtype != torch.float32 or self.absmax2.numel() < groups:
                problems.append(f"absmax2 must hold >= {groups} fp32 values, got {self.absmax2.dtype} "
                                f"{tuple(self.absmax2.shape)}")
            if self.code2.dtype != torch.float32 or self.code2.numel() != 256:
                problems.append(f"code2 must be 256 fp32 values, got {self.code2.dtype} {tuple(self.code2.shape)}")
            if self.offset.dtype != torch.float32 or self.offset.numel() != 1:
                problems.append(f"offset must be one fp32 value, got {self.offset.dtype} {tuple(self.offset.shape)}")
        devices = {t.device for t in self.tensors()}
        if len(devices) > 1:
            problems.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
        if problems:
            raise ValueError("Packed4bit: " + "; ".join(problems))

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.absmax, self.code, self.absmax2, self.code2, self.offset) if t is not None]

    @classmethod
    def from_params(cls, weight) -> Packed4bit:
        """From a quantized bitsandbytes ``Params4bit`` (``Linear4bit.weight``): views of its storage and quant
        state, nothing copied except the 4-byte offset (reshaped to a tensor on the data's device). Call it once
        per layer: it validates and builds Python objects. A weight in bitsandbytes' CPU inference packing (a
        ``Linear4bit`` that ran eval-mode inference on CPU) is read into new tensors in the standard layout, nothing
        lost (``base_layers.unpack_cpu_packing``); the weight itself is left as it is."""
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError("Packed4bit.from_params: the weight is not quantized yet (bitsandbytes quantizes a "
                             "Params4bit when it is moved to its device: layer.to(device))")
        if state.quant_type not in QUANT_TYPES:
            raise ValueError(f"Packed4bit.from_params: quant_type must be one of {QUANT_TYPES}, got "
                             f"{state.quant_type!r}")
        if len(state.shape) != 2:
            raise ValueError(f"Packed4bit.from_params: expected a 2-D weight, got shape {tuple(state.shape)}")
        shape = (int(state.shape[0]), int(state.shape[1]))
        if in_cpu_packing(weight):
            data, absmax, dtype = unpack_cpu_packing(weight.data, state)
            return cls(data=data, absmax=absmax, code=state.code.to(data.device, torch.float32),
                       blocksize=int(state.blocksize), shape=shape, dtype=dtype, quant_type=state.quant_type)
        data = weight.data.detach().contiguous().reshape(-1).view(torch.uint8)
        device = data.device
        fields = dict(data=data, absmax=state.absmax, code=state.code.to(device, torch.float32),
                      blocksize=int(state.blocksize), shape=shape, dtype=state.dtype, quant_type=state.quant_type)
        if state.nested:
            fields.update(absmax2=state.state2.absmax, code2=state.state2.code.to(device, torch.float32),
                          blocksize2=int(state.state2.blocksize),
                          offset=torch.as_tensor(state.offset, dtype=torch.float32, device=device).reshape(1))
        return cls(**fields)


def quant_args(packed: Packed4bit) -> tuple[list[torch.Tensor], dict[str, object]]:
    """(the six pointer arguments every 4-bit kernel takes after w_ptr's, its quantization constexprs)."""
    nothing = unused(packed.device)
    pointers = [packed.data, packed.absmax, packed.code,
                packed.absmax2 if packed.nested else nothing, packed.code2 if packed.nested else nothing,
                packed.offset if packed.nested else nothing]
    consts = {"NESTED": packed.nested, "QBLOCK_LOG2": packed.blocksize.bit_length() - 1,
              "QBLOCK2_LOG2": packed.blocksize2.bit_length() - 1,
              "ALIGNED": packed.shape[1] % packed.blocksize == 0}  # every row of W starts a block (real models)
    return pointers, consts


def w_wide(packed: Packed4bit) -> bool:
    """Whether W's flat element index n·K + k (tile overhang included) needs int64 (``triton_launch.wide_offsets``)."""
    N, K = packed.shape
    overhang = TILE_OVERHANG
    return (N - 1 + overhang) * K + K - 1 + overhang > INT32_REACH


def check_device(packed: Packed4bit, t: torch.Tensor) -> None:
    if packed.device != t.device:
        raise ValueError(f"the 4-bit weight is on {packed.device}, the activations on {t.device}")


def forward_4bit(
    x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, s: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N), one Triton GEMM reading W from its 4-bit storage.
    x: M×K (any strides); S: M×r (``lora_triton.lora_down``'s fp32 output); lora_B: N×r."""
    M, K = x.shape
    N, R = lora_B.shape
    if packed.shape != (N, K) or s.shape != (M, R):
        raise ValueError(f"forward_4bit: W {packed.shape}, x {tuple(x.shape)}, S {tuple(s.shape)}, "
                         f"B {tuple(lora_B.shape)} do not fit y = x Wᵀ + s·S Bᵀ")
    check_device(packed, x)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:  # a grid with a zero dimension is not a launch
        return y
    pointers, quant = quant_args(packed)
    bias_arg = bias if bias is not None else unused(x.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    with on_device(x.device):
        lora_fwd_4bit_kernel[grid](
            x, *pointers, bias_arg, s, lora_B, y,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), s.stride(0), s.stride(1), lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), bias_arg.stride(0),
            scaling,
            HAS_BIAS=bias is not None, W_DTYPE=TL_DTYPES[packed.dtype], **quant,
            BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, x.device),
            LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, x.device),
            WIDE=wide_offsets(x, bias_arg, s, lora_B, y) or w_wide(packed),
            BLOCK_R=rank_block(R, lora_B.dtype),
            ARCH=arch(x.device),
        )
    return y


def dx_4bit(
    dy: torch.Tensor, packed: Packed4bit, ds: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``), one Triton GEMM reading W from its 4-bit storage; m is the
    kernels' dropout mask for ``seed`` and ``p`` (regenerated, as in ``lora_triton.lora_dx``). dY: M×N (any
    strides); dS: M×r (``lora_triton.lora_dy_pass``'s fp32 output); lora_A: r×K."""
    M, N = dy.shape
    R, K = lora_A.shape
    if packed.shape != (N, K) or ds.shape != (M, R):
        raise ValueError(f"dx_4bit: W {packed.shape}, dY {tuple(dy.shape)}, dS {tuple(ds.shape)}, "
                         f"A {tuple(lora_A.shape)} do not fit dX = dY W + m ⊙ (dS A)")
    check_device(packed, dy)
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    if M == 0 or K == 0:
        return dx
    pointers, quant = quant_args(packed)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    with on_device(dy.device):
        lora_dx_4bit_kernel[grid](
            dy, *pointers, ds, lora_A, dx, M, N, K, R, m_bucket(M),
            dy.stride(0), dy.stride(1), ds.stride(0), ds.stride(1), lora_A.stride(0), lora_A.stride(1),
            dx.stride(0), dx.stride(1),
            *drop_args(seed, p, dy.device),
            HAS_DROPOUT=p > 0, W_DTYPE=TL_DTYPES[packed.dtype], **quant,
            BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
            LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, dy.device),
            WIDE=wide_offsets(dy, ds, lora_A, dx) or w_wide(packed),
            BLOCK_R=rank_block(R, lora_A.dtype),
            ARCH=arch(dy.device),
        )
    return dx


def dequantize(packed: Packed4bit, *, forward_tiles: bool = False) -> torch.Tensor:
    """W (N×K, contiguous, ``packed.dtype``) dequantized by a Triton kernel: bit for bit what
    ``bitsandbytes.functional.dequantize_4bit`` returns (tests/test_4bit_kernels.py). It loads W through the GEMMs'
    own tile loader, in dX's orientation, or the forward's with ``forward_tiles`` (tests check both)."""
    N, K = packed.shape
    out = torch.empty((N, K), device=packed.device, dtype=packed.dtype)
    if out.numel() == 0:
        return out
    pointers, quant = quant_args(packed)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"]))
    with on_device(packed.device):
        dequantize_4bit_kernel[grid](*pointers, out, N, K, **quant, WIDE=w_wide(packed), KN=forward_tiles,
                                     ARCH=arch(packed.device))
    return out


def dequantize_ref(packed: Packed4bit) -> torch.Tensor:
    """W (N×K, ``packed.dtype``) in plain PyTorch, the kernels' reference: the same operations as bitsandbytes'
    default (device-independent) dequantize_4bit, ``code[q] · absmax[flat // blocksize]`` in fp32 rounded once to
    the quant state's dtype, with the nested scale ``code2[absmax] · absmax2 + offset`` rounded after the product
    and after the sum."""
    N, K = packed.shape
    numel = N * K
    q = torch.stack([packed.data >> 4, packed.data & 0xF], dim=1).reshape(-1)[:numel].long()
    scale = packed.absmax
    if packed.nested:
        blocks = packed.absmax.numel()
        group = torch.arange(blocks, device=packed.device) // packed.blocksize2
        scale = packed.code2[packed.absmax.long()] * packed.absmax2[group]
        scale = scale + packed.offset
    scale = scale.repeat_interleave(packed.blocksize)[:numel]
    return (packed.code[q] * scale).to(packed.dtype).reshape(N, K)


# ------------------------------------------------------------------------------------ the LoRA layer's two passes


def packed_weight(base) -> Packed4bit:
    """The ``Packed4bit`` of a ``base_layers.Bnb4Base``'s layer, built once and kept on the layer while its weight's
    storage and quantization state stay the same objects (a merge requantizes: a new storage, a new pack). The layer is
    kept in bitsandbytes' standard packing (``Bnb4Base.canonical_weight``: on CPU, eval-mode inference would repack it
    for bitsandbytes' bf16 kernel), so the pack holds views of its own storage."""
    weight = base.canonical_weight()
    cached = getattr(base.layer, "_fused_lora_packed4", None)
    if cached is not None and cached[0] == weight.data.data_ptr() and cached[1] is weight.quant_state:
        return cached[2]
    packed = Packed4bit.from_params(weight)
    base.layer._fused_lora_packed4 = (weight.data.data_ptr(), weight.quant_state, packed)
    return packed


def fused_forward(
    x: torch.Tensor, base, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ for a bitsandbytes ``Linear4bit`` base (``base_layers.Bnb4Base``), x
    already in its compute dtype: ``lora_down`` (S), then one GEMM reading the 4-bit W with the rank-r term in its
    accumulator. 2 launches. The bias is cast to the compute dtype first, as ``Linear4bit.forward`` does.
    Returns (y, S fp32)."""
    packed = packed_weight(base)
    bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    return forward_with(x, base, lora_A, lora_B, scaling, p, seed, "fused-bnb4",
                        lambda s: forward_4bit(x, packed, bias, s, lora_B, scaling))


def fused_backward(
    dy: torch.Tensor, x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
    scaling: float, p: float, seed: int, need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """dX = dY W + m ⊙ (dS A) in one GEMM reading the 4-bit W (dY in the compute dtype, as bitsandbytes'
    ``MatMul4Bit.backward``), dA, dB, dbias as the dense path. 3 launches. Returns (dX, dA, dB, dbias)."""
    packed = packed_weight(base)
    return backward_with(
        dy, x, base, lora_A, lora_B, s, scaling, p, seed, (need_dx, need_da, need_db, need_dbias), "fused-bnb4",
        lambda ds: dx_4bit(dy if dy.dtype == x.dtype else dy.to(x.dtype), packed, ds, lora_A, seed, p, x.dtype))
