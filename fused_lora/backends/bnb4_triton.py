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
bitsandbytes object (by attribute; it imports nothing from bitsandbytes either, nor does its reading of bitsandbytes'
CPU inference packing, :func:`unpack_cpu_packing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bases import Pass
from ..call import Call, Operands, Seed
from ..kernels.configs import m_bucket
from ..kernels.lora_4bit import dequantize_4bit_kernel, lora_dx_4bit_kernel, lora_fwd_4bit_kernel
from .fast_launch import LaunchSite
from .lora_triton import backward_with, forward_with
from .triton_launch import (
    F32,
    INT32_REACH,
    TILE_OVERHANG,
    TL_DTYPES,
    Fresh,
    Plan,
    arch,
    cdiv,
    dot_dtype,
    dot_precision,
    drop_args,
    plan_drop,
    rank_block,
    remember,
    tf32_state,
    unused,
    wide_offsets,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' (functional.dequantize_4bit checks these)
QUANT_TYPES = ("nf4", "fp4")
_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# bitsandbytes' CPU inference packing (0.50, read from its source). On a CPU with AVX512-BF16, ``Linear4bit.forward``
# in eval mode on an input without grad repacks the weight in place for its bf16 kernel
# (``functional._convert_weight_packed_for_cpu``, gated by the layer's ``support_avx512bf16_for_cpu``;
# ``quant_state.packing_format_for_cpu`` becomes True): the codes regrouped in blocks of 32 rows, the block scales
# (double quantization undone) rounded to bf16 and transposed. From then on its forward runs
# ``bitsandbytes::gemv_4bit`` in every mode: x rounded to bf16 (~0.3% off), and no input gradient (the op has no
# autograd kernel). bitsandbytes' own way back (``_convert_weight_packed_for_cpu_inverse``, private) quantizes the
# scales again (another 0.3-0.6%) and, without double quantization, leaves them transposed (W ~40% off). The 4-bit
# base kind (``fused_lora/bases/bnb4.py``) keeps a layer LoRA sits on in the standard packing; the functions below read
# a weight already repacked back into it without loss: what it holds then is W with bf16 scales. The layout is
# bitsandbytes' private format: it is validated, and tests/test_qlora_cpu_packing.py checks the reading against
# bitsandbytes' own repack bit for bit.
CPU_PACKING_BLOCK_N = 32  # the row block of the CPU packing (_convert_weight_packed_for_cpu's block_n)


def in_cpu_packing(weight, state=None) -> bool:
    """Whether a bitsandbytes 4-bit weight is in bitsandbytes' CPU inference packing, by its quantization state
    (``state``, default the weight's own)."""
    state = state if state is not None else getattr(weight, "quant_state", None)
    # The repack sets the flag on the instance: read from there, since a missing attribute would go through
    # QuantState's Python __getattr__ (~2 µs, and this runs on every call of a 4-bit layer).
    return bool(getattr(state, "__dict__", {}).get("packing_format_for_cpu", False))


def quant_state_of(layer):
    """The quantization state of a bitsandbytes ``Linear4bit``: its weight's, or, when the weight is a plain tensor,
    the layer's own copy (``Linear4bit.quant_state``). FSDP2's ``fully_shard`` turns a ``Params4bit`` into a DTensor,
    and at forward and backward time into a plain gathered Parameter without ``quant_state``; the layer keeps it
    (bitsandbytes' own forward reads it from there too). None when the layer was never quantized."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def unpack_cpu_packing(data: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A 4-bit weight in bitsandbytes' CPU inference packing (``data`` N×K/2 uint8, its ``quant_state``) in the
    standard layout, nothing lost: (the codes two a byte in row-major order, even index in the high nibble, 1-D uint8;
    the block scales, fp32, one per ``blocksize`` consecutive elements in that order: the bf16 values the CPU kernel
    uses; the dtype dequantized values are rounded to). New tensors; ``data`` and ``state`` are left as they are.
    Raises ValueError for a layout this code does not know (another bitsandbytes version): never a wrong weight."""
    N, K = (int(d) for d in state.shape)
    blocksize, absmax = int(state.blocksize), state.absmax
    dtype = getattr(state, "original_dtype", None)
    known = (data.dtype == torch.uint8 and tuple(data.shape) == (N, K // 2) and N % CPU_PACKING_BLOCK_N == 0
             and K % blocksize == 0 and tuple(absmax.shape) == (K // blocksize, N)
             and not getattr(state, "nested", False) and dtype is not None)
    if not known:
        raise ValueError(f"fused_lora: this bitsandbytes Linear4bit weight is in a CPU inference packing fused_lora "
                         f"does not know (weight {data.dtype} {tuple(data.shape)}, W {N}×{K}, scales {absmax.dtype} "
                         f"{tuple(absmax.shape)}); load the model again and keep it from CPU inference "
                         "(bases.bnb4.standard_4bit_packing) before wrapping it")
    # Byte i of the 32 that hold rows 32·nb … 32·nb+31, columns 2·c and 2·c+1: low nibble code t = i, high t = 32 + i of
    # the 64 codes (row 32·nb + t // 2, column 2·c + t % 2).
    chunks = data.reshape(N // CPU_PACKING_BLOCK_N, K // 2, CPU_PACKING_BLOCK_N)
    codes = torch.cat([chunks & 0xF, chunks >> 4], dim=-1)
    codes = codes.reshape(N // CPU_PACKING_BLOCK_N, K // 2, CPU_PACKING_BLOCK_N, 2).transpose(1, 2).reshape(-1)
    return (codes[0::2] << 4) | codes[1::2], absmax.t().reshape(-1).float(), dtype


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
    def from_params(cls, weight, quant_state=None) -> Packed4bit:
        """From a quantized bitsandbytes ``Params4bit`` (``Linear4bit.weight``): views of its storage and quant
        state, nothing copied except the 4-byte offset (reshaped to a tensor on the data's device). Call it once
        per layer: it validates and builds Python objects. A weight in bitsandbytes' CPU inference packing (a
        ``Linear4bit`` that ran eval-mode inference on CPU) is read into new tensors in the standard layout, nothing
        lost (:func:`unpack_cpu_packing`); the weight itself is left as it is. ``quant_state``: the state when the
        weight is a plain tensor holding the packed bytes (FSDP2 gathers a ``Params4bit`` into one; the layer keeps the
        state: :func:`quant_state_of`)."""
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError("Packed4bit.from_params: the weight is not quantized yet (bitsandbytes quantizes a "
                             "Params4bit when it is moved to its device: layer.to(device))")
        if state.quant_type not in QUANT_TYPES:
            raise ValueError(f"Packed4bit.from_params: quant_type must be one of {QUANT_TYPES}, got "
                             f"{state.quant_type!r}")
        if len(state.shape) != 2:
            raise ValueError(f"Packed4bit.from_params: expected a 2-D weight, got shape {tuple(state.shape)}")
        shape = (int(state.shape[0]), int(state.shape[1]))
        if in_cpu_packing(weight, state):
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


def _quant_consts(packed: Packed4bit) -> dict[str, object]:
    """The quantization constexprs every 4-bit kernel takes."""
    return {"NESTED": packed.nested, "QBLOCK_LOG2": packed.blocksize.bit_length() - 1,
            "QBLOCK2_LOG2": packed.blocksize2.bit_length() - 1,
            "ALIGNED": packed.shape[1] % packed.blocksize == 0}  # every row of W starts a block (real models)


def _pointers(packed: Packed4bit, nothing: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six pointer arguments every 4-bit kernel takes after w_ptr's (``nothing`` for a plain pack's nested ones)."""
    if packed.nested:
        return packed.data, packed.absmax, packed.code, packed.absmax2, packed.code2, packed.offset
    return packed.data, packed.absmax, packed.code, nothing, nothing, nothing


def _pack_key(packed: Packed4bit) -> tuple:
    """What of a pack a 4-bit launch signature depends on (its tensors' dtypes are fixed by ``Packed4bit``'s checks)."""
    return packed.shape, packed.blocksize, packed.blocksize2, packed.nested, packed.dtype, packed.device


def quant_args(packed: Packed4bit) -> tuple[list[torch.Tensor], dict[str, object]]:
    """(the six pointer arguments every 4-bit kernel takes after w_ptr's, its quantization constexprs): for launchers
    that launch without a plan (the multi-adapter ones)."""
    return list(_pointers(packed, unused(packed.device))), _quant_consts(packed)


def w_wide(packed: Packed4bit) -> bool:
    """Whether W's flat element index n·K + k (tile overhang included) needs int64 (``triton_launch.wide_offsets``)."""
    N, K = packed.shape
    overhang = TILE_OVERHANG
    return (N - 1 + overhang) * K + K - 1 + overhang > INT32_REACH


def check_device(packed: Packed4bit, t: torch.Tensor) -> None:
    if packed.device != t.device:
        raise ValueError(f"the 4-bit weight is on {packed.device}, the activations on {t.device}")


_forward_plans: dict[tuple, Plan] = {}
_dx_plans: dict[tuple, Plan] = {}
_dequantize_plans: dict[tuple, Plan] = {}


def forward_4bit(
    x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, s: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · S Bᵀ in x's dtype (M×N), one Triton GEMM reading W from its 4-bit storage.
    x: M×K (any strides); S: M×r (``lora_triton.lora_down``'s fp32 output); lora_B: N×r."""
    device, x_dtype, b_dtype = x.device, x.dtype, lora_B.dtype
    key = (x.shape, x.stride(), _pack_key(packed), None if bias is None else (bias.shape, bias.stride(), bias.dtype),
           s.shape, s.stride(), s.dtype, lora_B.shape, lora_B.stride(), x_dtype, b_dtype, device, arch(device),
           tf32_state() if x_dtype is F32 or b_dtype is F32 else None)
    plan = _forward_plans.get(key)
    if plan is None:
        plan = remember(_forward_plans, key, _forward_plan(x, packed, bias, s, lora_B, key[-1]))
    y = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=x_dtype)
    if plan.site is None:  # a grid with a zero dimension is not a launch
        return y
    nothing = plan.nothing
    plan.site.launch(lora_fwd_4bit_kernel, (x, *_pointers(packed, nothing), nothing if bias is None else bias, s,
                                            lora_B, y, *plan.ints, scaling))
    return y


def _forward_plan(x, packed: Packed4bit, bias, s, lora_B, tf32: bool | None) -> Plan:
    M, K = x.shape
    N, R = lora_B.shape
    if packed.shape != (N, K) or s.shape != (M, R):
        raise ValueError(f"forward_4bit: W {packed.shape}, x {tuple(x.shape)}, S {tuple(s.shape)}, "
                         f"B {tuple(lora_B.shape)} do not fit y = x Wᵀ + s·S Bᵀ")
    check_device(packed, x)
    device = x.device
    nothing = unused(device)
    if M == 0 or N == 0:
        return Plan(None, (), (M, N))
    bias_arg = bias if bias is not None else nothing
    y = Fresh((M, N))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        HAS_BIAS=bias is not None, W_DTYPE=TL_DTYPES[packed.dtype], **_quant_consts(packed),
        BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, device, tf32),
        LORA_DOT=dot_dtype(lora_B.dtype), LORA_PREC=dot_precision(lora_B.dtype, device, tf32),
        WIDE=wide_offsets(x, bias_arg, s, lora_B, y) or w_wide(packed), BLOCK_R=rank_block(R, lora_B.dtype),
        ARCH=arch(device)), device)
    ints = (M, N, K, R, m_bucket(M), *x.stride(), *s.stride(), *lora_B.stride(), *y.stride(), bias_arg.stride(0))
    return Plan(site, ints, (M, N), nothing=nothing)


def dx_4bit(
    dy: torch.Tensor, packed: Packed4bit, ds: torch.Tensor, lora_A: torch.Tensor, seed: Seed, p: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A) (M×K, ``out_dtype``), one Triton GEMM reading W from its 4-bit storage; m is the
    kernels' dropout mask for ``seed`` and ``p`` (regenerated, as in ``lora_triton.lora_dx``). dY: M×N (any
    strides); dS: M×r (``lora_triton.lora_dy_pass``'s fp32 output); lora_A: r×K."""
    device, dy_dtype, a_dtype = dy.device, dy.dtype, lora_A.dtype
    key = (dy.shape, dy.stride(), _pack_key(packed), ds.shape, ds.stride(), ds.dtype, lora_A.shape, lora_A.stride(),
           dy_dtype, a_dtype, device, p, out_dtype, arch(device),
           tf32_state() if dy_dtype is F32 or a_dtype is F32 else None)
    plan = _dx_plans.get(key)
    if plan is None:
        plan = remember(_dx_plans, key, _dx_plan(dy, packed, ds, lora_A, p, out_dtype, key[-1]))
    dx = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=out_dtype)
    if plan.site is None:
        return dx
    plan.site.launch(lora_dx_4bit_kernel, (dy, *_pointers(packed, plan.nothing), ds, lora_A, dx, *plan.ints,
                                           *(plan.drop or drop_args(seed, p, device))))
    return dx


def _dx_plan(dy, packed: Packed4bit, ds, lora_A, p: float, out_dtype: torch.dtype, tf32: bool | None) -> Plan:
    M, N = dy.shape
    R, K = lora_A.shape
    if packed.shape != (N, K) or ds.shape != (M, R):
        raise ValueError(f"dx_4bit: W {packed.shape}, dY {tuple(dy.shape)}, dS {tuple(ds.shape)}, "
                         f"A {tuple(lora_A.shape)} do not fit dX = dY W + m ⊙ (dS A)")
    check_device(packed, dy)
    device = dy.device
    if M == 0 or K == 0:
        return Plan(None, (), (M, K))
    dx = Fresh((M, K))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)
    site = LaunchSite(grid, dict(
        HAS_DROPOUT=p > 0, W_DTYPE=TL_DTYPES[packed.dtype], **_quant_consts(packed),
        BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, device, tf32),
        LORA_DOT=dot_dtype(lora_A.dtype), LORA_PREC=dot_precision(lora_A.dtype, device, tf32),
        WIDE=wide_offsets(dy, ds, lora_A, dx) or w_wide(packed), BLOCK_R=rank_block(R, lora_A.dtype),
        ARCH=arch(device)), device)
    ints = (M, N, K, R, m_bucket(M), *dy.stride(), *ds.stride(), *lora_A.stride(), *dx.stride())
    return Plan(site, ints, (M, K), drop=plan_drop(p, device), nothing=unused(device))


def dequantize(packed: Packed4bit, *, forward_tiles: bool = False) -> torch.Tensor:
    """W (N×K, contiguous, ``packed.dtype``) dequantized by a Triton kernel: bit for bit what
    ``bitsandbytes.functional.dequantize_4bit`` returns (tests/test_4bit_kernels.py). It loads W through the GEMMs'
    own tile loader, in dX's orientation, or the forward's with ``forward_tiles`` (tests check both)."""
    device = packed.device
    key = (_pack_key(packed), forward_tiles, arch(device))
    plan = _dequantize_plans.get(key)
    if plan is None:
        plan = remember(_dequantize_plans, key, _dequantize_plan(packed, forward_tiles))
    out = torch.empty_strided(plan.shape, plan.strides, device=device, dtype=packed.dtype)
    if plan.site is None:
        return out
    plan.site.launch(dequantize_4bit_kernel, (*_pointers(packed, plan.nothing), out, *plan.ints))
    return out


def _dequantize_plan(packed: Packed4bit, forward_tiles: bool) -> Plan:
    N, K = packed.shape
    device = packed.device
    if N * K == 0:
        return Plan(None, (), (N, K))
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"]))
    site = LaunchSite(grid, dict(**_quant_consts(packed), WIDE=w_wide(packed), KN=forward_tiles, ARCH=arch(device)),
                      device)
    return Plan(site, (N, K), (N, K), nothing=unused(device))


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
    """The ``Packed4bit`` of a 4-bit base object's layer (``fused_lora/bases/bnb4.py``), built once and kept on the
    layer while its weight's storage and quantization state stay the same objects (a merge requantizes: a new
    storage, a new pack). The layer is kept in bitsandbytes' standard packing (``canonical_weight``: on CPU, eval-mode
    inference would repack it for bitsandbytes' bf16 kernel), so the pack holds views of its own storage."""
    weight = base.canonical_weight()
    state = quant_state_of(base.layer)  # FSDP2 gathers the weight into a plain tensor: the layer's state
    cached = getattr(base.layer, "_fused_lora_packed4", None)
    if cached is not None and cached[0] == weight.data.data_ptr() and cached[1] is state:
        return cached[2]
    packed = Packed4bit.from_params(weight, state)
    base.layer._fused_lora_packed4 = (weight.data.data_ptr(), state, packed)
    return packed


def fused_forward(t: Operands, call: Call, seed: Seed, keep_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ for a bitsandbytes ``Linear4bit`` base (``t.base``: the 4-bit kind's
    base object), x already in its compute dtype: ``lora_down`` (S), then one GEMM reading the 4-bit W with the rank-r
    term in its accumulator. 2 launches. The bias is cast to the compute dtype first, as ``Linear4bit.forward`` does.
    Returns (y, S fp32)."""
    x = t.x
    packed = packed_weight(t.base)
    bias = t.bias.to(x.dtype) if t.bias is not None and t.bias.dtype != x.dtype else t.bias
    return forward_with(t, call, seed, lambda s: forward_4bit(x, packed, bias, s, t.lora_B, call.scaling))


def fused_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed: Seed,
                   keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """dX = dY W + m ⊙ (dS A) in one GEMM reading the 4-bit W (dY in the compute dtype, as bitsandbytes'
    ``MatMul4Bit.backward``), dA, dB, dbias as the dense path. 3 launches. Returns (dX, dA, dB, dbias)."""
    x = t.x
    packed = packed_weight(t.base)
    return backward_with(t, call, saved, dy, needs, seed,
                         lambda ds: dx_4bit(dy if dy.dtype == x.dtype else dy.to(x.dtype), packed, ds, t.lora_A, seed,
                                            call.p, x.dtype))


FUSED = Pass(fused_forward, fused_backward)  # the 4-bit kind's fused path
