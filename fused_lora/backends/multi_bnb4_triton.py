"""Several LoRA adapters on one bitsandbytes 4-bit base on the Triton backend (``kernels/multi_lora_4bit.py``): the two
base GEMMs read W once from its 4-bit storage for all segments, dequantized in registers, each row tile's own adapter in
the accumulator; S, dS, dA and dB from the dense segmented kernels (``multi_triton``). As ``bnb4_triton`` for one
adapter: the layer's weight packed once (``bnb4_triton.packed_weight``), x and the biases in the layer's compute dtype
(as ``Linear4bit.forward``), dY too in dX (as ``MatMul4Bit.backward``). The composed path over a 4-bit base is
``multi_triton.composed_forward`` / ``composed_backward`` with a the 4-bit kind's base object (``bases/bnb4.py``).
"""

from __future__ import annotations

import torch

from ..bases import Pass
from ..call import Call, Operands
from ..kernels.configs import m_bucket
from ..kernels.multi_lora_4bit import multi_lora_dx_4bit_kernel, multi_lora_fwd_4bit_kernel
from ..segments import MultiAdapters, Segments, bias_rows
from .bnb4_triton import Packed4bit, check_device, packed_weight, quant_args, w_wide
from .multi_triton import Tables, backward_with, forward_with, rank_args
from .triton_launch import TL_DTYPES, cdiv, dot_dtype, dot_precision, on_device, unused, wide_offsets

__all__ = ["FUSED", "fused_backward", "fused_forward", "multi_dx_4bit", "multi_forward_4bit"]


def multi_forward_4bit(
    x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, s: torch.Tensor, lora_B: torch.Tensor, t: Tables,
) -> torch.Tensor:
    """y_i = x_i Wᵀ + bias[i] + s_i · S_i B_iᵀ in x's dtype (M×N), one Triton GEMM over all rows reading W from its
    4-bit storage. ``bias``: (n, N), row i segment i's (``segments.bias_rows``), or None; ``s``: the packed S;
    ``lora_B``: B_cat (N×R_tot)."""
    M, K = x.shape
    N = lora_B.shape[0]
    seg = t.segments
    if packed.shape != (N, K):
        raise ValueError(f"multi_forward_4bit: W {packed.shape}, x {tuple(x.shape)}, B_cat {tuple(lora_B.shape)} do "
                         "not fit y = x Wᵀ + s·S Bᵀ")
    check_device(packed, x)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    pointers, quant = quant_args(packed)
    bias_arg = bias if bias is not None else unused(x.device)
    grid = lambda meta: ((cdiv(M, meta["BLOCK_M"]) + seg.n) * cdiv(N, meta["BLOCK_N"]),)
    with on_device(x.device):
        multi_lora_fwd_4bit_kernel[grid](
            x, *pointers, bias_arg, s, lora_B, y, t.seg, t.scal,
            M, N, K, seg.n, seg.max_rank, m_bucket(M),
            x.stride(0), x.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 1,
            HAS_BIAS=bias is not None, W_DTYPE=TL_DTYPES[packed.dtype], **quant,
            BASE_DOT=dot_dtype(x.dtype), BASE_PREC=dot_precision(x.dtype, x.device),
            WIDE=wide_offsets(x, bias_arg, s, lora_B, y) or w_wide(packed),
            **rank_args(t, lora_B.dtype, x.device, False),
        )
    return y


def multi_dx_4bit(
    dy: torch.Tensor, packed: Packed4bit, ds: torch.Tensor, lora_A: torch.Tensor, t: Tables, out_dtype: torch.dtype,
) -> torch.Tensor:
    """dX_i = dY_i W + m_i ⊙ (dS_i A_i) (M×K, ``out_dtype``), one Triton GEMM over all rows reading W from its 4-bit
    storage; m_i each segment's kernels' mask. ``ds``: the packed dS; ``lora_A``: A_cat (R_tot×K)."""
    M, N = dy.shape
    K = lora_A.shape[1]
    seg = t.segments
    if packed.shape != (N, K):
        raise ValueError(f"multi_dx_4bit: W {packed.shape}, dY {tuple(dy.shape)}, A_cat {tuple(lora_A.shape)} do not "
                         "fit dX = dY W + m ⊙ (dS A)")
    check_device(packed, dy)
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    if M == 0 or K == 0:
        return dx
    pointers, quant = quant_args(packed)
    grid = lambda meta: ((cdiv(M, meta["BLOCK_M"]) + seg.n) * cdiv(K, meta["BLOCK_N"]),)
    with on_device(dy.device):
        multi_lora_dx_4bit_kernel[grid](
            dy, *pointers, ds, lora_A, dx, t.seg, t.scal, t.seeds,
            M, N, K, seg.n, seg.max_rank, m_bucket(M),
            dy.stride(0), dy.stride(1), lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
            HAS_DROPOUT=t.has_dropout, W_DTYPE=TL_DTYPES[packed.dtype], **quant,
            BASE_DOT=dot_dtype(dy.dtype), BASE_PREC=dot_precision(dy.dtype, dy.device),
            WIDE=wide_offsets(dy, ds, lora_A, dx) or w_wide(packed),
            **rank_args(t, lora_A.dtype, dy.device, False),
        )
    return dx


def fused_forward(
    x: torch.Tensor, base, bias: torch.Tensor | None, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter on its segment over a bitsandbytes ``Linear4bit`` base (the 4-bit kind's base object,
    ``bases/bnb4.py``), x already in its compute dtype; ``bias``: the layer's (an adapter's own replaces it on its
    rows), all cast to the compute dtype as ``Linear4bit.forward`` casts its bias. 2 launches. Returns (y, S packed
    fp32)."""
    adapters.check(segments, x.shape[0], x.shape[1], base.layer.out_features, "multi_bnb4_triton.fused_forward")
    packed = packed_weight(base)
    rows = bias_rows(bias, adapters, x.dtype)
    return forward_with(x, base, adapters, segments, seeds, "fused-bnb4",
                        lambda s, B_cat, t: multi_forward_4bit(x, packed, rows, s, B_cat, t))


def fused_backward(
    dy: torch.Tensor, x: torch.Tensor, base, adapters: MultiAdapters, segments: Segments,
    seeds: torch.Tensor | list[int] | None, s: torch.Tensor,
    need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
) -> tuple:
    """dX = dY W + m_i ⊙ (dS_i A_i) in one GEMM reading the 4-bit W (dY in the compute dtype, as bitsandbytes'
    ``MatMul4Bit.backward``); dA, dB, dbias as the dense path. 3 launches. Returns (dX, [dA_i], [dB_i], dbias
    (n, N))."""
    packed = packed_weight(base)
    return backward_with(
        dy, x, base, adapters, segments, seeds, s, (need_dx, need_da, need_db, need_dbias), "fused-bnb4",
        lambda ds, A_cat, t: multi_dx_4bit(dy if dy.dtype == x.dtype else dy.to(x.dtype), packed, ds, A_cat, t,
                                           x.dtype))


def _fused_pass_forward(t: Operands, call: Call, seed, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_forward(t.x, t.base, t.bias, t.adapters, t.segments, seed)


def _fused_pass_backward(t: Operands, call: Call, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                         keep=None) -> tuple:
    return fused_backward(dy, t.x, t.base, t.adapters, t.segments, seed, saved[0], *needs)


FUSED = Pass(_fused_pass_forward, _fused_pass_backward)  # the 4-bit kind's multi-adapter fused path (driver's form)
