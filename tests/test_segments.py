"""The host-side description of a multi-adapter batch (fused_lora/segments.py): row segments, the packed layout of S,
the adapters' validation and tables, and the bias helpers. No kernels run here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fused_lora.segments import (
    RANK_ALIGN,
    MultiAdapters,
    Segments,
    bias_deltas,
    bias_grads,
    bias_rows,
    padded_rank,
    seed_ints,
    seed_table,
)


def test_layout_offsets_and_views():
    seg = Segments([3, 0, 5], [2, 4, 8])
    # every rank padded to a multiple of RANK_ALIGN (4): rank 2 takes 4, 4 and 8 nothing more
    assert [padded_rank(r) for r in (1, 2, 3, 4, 5, 8, 16, 63)] == [4, 4, 4, 4, 8, 8, 16, 64] and RANK_ALIGN == 4
    assert (seg.n, seg.rows, seg.total_rank, seg.max_rank, seg.s_numel) == (3, 8, 16, 8, 3 * 4 + 0 + 5 * 8)
    assert seg.starts == (0, 3, 3, 8) and seg.rank_offsets == (0, 4, 8, 16) and seg.s_offsets == (0, 12, 12, 52)
    assert seg.rows_of(2) == slice(3, 8) and seg.ranks_of(0) == slice(0, 2) and seg.ranks_of(1) == slice(4, 8)
    packed = torch.arange(seg.s_numel, dtype=torch.float32)
    parts = seg.split(packed)
    assert [tuple(p.shape) for p in parts] == [(3, 2), (0, 4), (5, 8)]
    assert parts[0].data_ptr() == packed.data_ptr() and parts[0].stride() == (4, 1)  # views, rows 4 apart
    assert parts[0][1, 0] == 4 and parts[2][0, 0] == 12 and parts[2].is_contiguous()
    repacked = seg.pack(parts)
    assert torch.equal(seg.split(repacked)[0], parts[0]) and torch.equal(repacked[12:], packed[12:])
    assert not repacked[2:4].any()  # padding columns of a packed S are zeros
    # tiles that do not straddle segments, and the kernels' bound cdiv(M, B) + n on them
    for block in (1, 2, 4, 16):
        assert seg.tiles(block) == sum(-(-n // block) for n in (3, 0, 5)) <= -(-8 // block) + 3
    table = seg.table(torch.device("cpu"))
    assert table.dtype == torch.int64 and table.tolist() == [list(seg.starts), list(seg.rank_offsets),
                                                             list(seg.s_offsets)]
    assert seg.table("cpu") is table  # made once per device


def test_segments_accept_numpy_ints_and_reject_bad_input():
    assert Segments(np.array([2, 3]), (np.int64(4), 1)).lengths == (2, 3)
    with pytest.raises(TypeError, match="host integers.*no tensors"):
        Segments(torch.tensor([2, 3]), [1, 1])
    with pytest.raises(TypeError, match="host integers"):
        Segments([2.0, 3], [1, 1])
    with pytest.raises(ValueError, match=">= 0, got -1 for adapter 1"):
        Segments([2, -1], [1, 1])
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        Segments([2, 1], [1, 0])
    with pytest.raises(ValueError, match="2 segment lengths but 3 adapter ranks"):
        Segments([2, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="no segments"):
        Segments([], [])
    seg = Segments([2, 3], [1, 1])
    with pytest.raises(ValueError, match=r"sum to 5 rows but x has 6 rows"):
        seg.check(6, 2, "here")
    with pytest.raises(ValueError, match="2 segments .* for 3 adapters"):
        seg.check(5, 3, "here")
    with pytest.raises(ValueError, match="1-D tensor of 20 elements"):
        seg.split(torch.zeros(4))


def _adapters(ranks=(2, 3), K=6, N=5, dtype=torch.float32, **kw):
    return MultiAdapters([torch.randn(r, K, dtype=dtype) for r in ranks], [torch.randn(N, r, dtype=dtype)
                                                                           for r in ranks],
                         kw.pop("scalings", [0.5] * len(ranks)), kw.pop("dropout_ps", [0.0] * len(ranks)), **kw)


def test_adapters_validate_and_concatenate():
    ad = _adapters(dropout_ps=[0.0, 0.3], scalings=[2.0, 1 / 3])
    assert ad.ranks == (2, 3) and ad.has_dropout and not ad.has_own_bias and ad.padded
    A_cat, B_cat = ad.A_cat(), ad.B_cat()  # each adapter padded to 4 ranks with zeros
    assert A_cat.shape == (8, 6) and B_cat.shape == (5, 8)
    assert torch.equal(A_cat[0:2], ad.lora_A[0]) and torch.equal(A_cat[4:7], ad.lora_A[1])
    assert torch.equal(B_cat[:, 0:2], ad.lora_B[0]) and torch.equal(B_cat[:, 4:7], ad.lora_B[1])
    assert not A_cat[[2, 3, 7]].any() and not B_cat[:, [2, 3, 7]].any()
    aligned = _adapters(ranks=(4, 8))
    assert not aligned.padded and torch.equal(aligned.A_cat(), torch.cat(aligned.lora_A))
    assert torch.equal(aligned.B_cat(), torch.cat(aligned.lora_B, dim=1))
    table = ad.scalar_table("cpu")
    assert table.dtype == torch.float32 and table.shape == (3, 2)
    # each value rounded to fp32 once, as Triton passes a Python float to the single-adapter kernels
    assert table[0, 1].item() == float(np.float32(1 / 3)) and table[2, 1].item() == float(np.float32(1 / 0.7))
    seg = ad.segments([4, 0])
    ad.check(seg, 4, 6, 5, "here")
    with pytest.raises(ValueError, match="in_features=6, out_features=5, the layer has 7, 5"):
        ad.check(seg, 4, 7, 5, "here")
    with pytest.raises(ValueError, match="ranks"):
        ad.check(Segments([4, 0], [2, 2]), 4, 6, 5, "here")
    with pytest.raises(ValueError, match="one floating dtype"):
        MultiAdapters([torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.bfloat16)], [torch.zeros(5, 2)] * 2,
                      [1, 1], [0, 0])
    with pytest.raises(ValueError, match="adapter 1: lora_A must be r×in_features"):
        MultiAdapters([torch.zeros(2, 6), torch.zeros(2, 7)], [torch.zeros(5, 2)] * 2, [1, 1], [0, 0])
    with pytest.raises(ValueError, match="one entry per adapter"):
        MultiAdapters([torch.zeros(2, 6)], [torch.zeros(5, 2)], [1, 1], [0])
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\), got 1.0"):
        _adapters(dropout_ps=[0.0, 1.0])
    with pytest.raises(ValueError, match="own bias must have shape"):
        _adapters(biases=[None, torch.zeros(4)])


def test_seeds():
    assert seed_ints(torch.tensor([5, 6]), 2) == [5, 6] and seed_ints(None, 3) == [0, 0, 0]
    assert seed_table([1, 2], 2, torch.device("cpu")).tolist() == [1, 2]
    with pytest.raises(ValueError, match="3 dropout seeds for 2 adapters"):
        seed_table(torch.tensor([1, 2, 3]), 2, torch.device("cpu"))


def test_bias_rows_deltas_and_grads():
    own = torch.randn(5, dtype=torch.float32)
    base = torch.randn(5).to(torch.bfloat16)
    ad = _adapters(ranks=(1, 2, 3), biases=[None, own, None])
    rows = bias_rows(base, ad)
    assert rows.dtype == torch.float32  # promoted: neither bias rounded
    assert torch.equal(rows[0], base.float()) and torch.equal(rows[1], own) and torch.equal(rows[2], base.float())
    assert torch.equal(bias_rows(None, ad)[0], torch.zeros(5)) and bias_rows(None, _adapters()) is None
    deltas = bias_deltas(base, ad)
    assert torch.equal(deltas[1], own - base.float()) and not deltas[0].any() and not deltas[2].any()
    assert bias_deltas(base, _adapters()) is None
    dbias = torch.randn(3, 5)
    base_grad, own_grads = bias_grads(dbias, ad)
    assert torch.allclose(base_grad, dbias[0] + dbias[2]) and own_grads[0] is None and own_grads[2] is None
    assert torch.equal(own_grads[1], dbias[1])
