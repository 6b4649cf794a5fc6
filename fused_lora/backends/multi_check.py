"""The self-check of the multi variant (several LoRA adapters on one base, adapter i on the i-th segment of x's rows):
what the driver compares when a multi-adapter call's path is checked (``autograd/driver.py`` runs it, as it runs the
single-adapter check of ``self_check``; the rule, the verdicts and what a failed check does are that module's).

Each adapter computes what it computes alone on its rows, with its own kernels' mask (the single-adapter mask of x_i
alone and seed_i, rows numbered from the segment's start), so the references are the single-adapter PyTorch path's
arithmetic (``lora_torch``'s helpers), one segment at a time:

- forward: y on the sampled rows (``self_check.row_blocks``: at most three blocks of ``ROW_BLOCK`` rows), split where
  the blocks meet the segments into pieces (adapter i, rows a…b); S on those pieces (``Segments.split``'s rows);
- backward: dX on the same pieces; each adapter's dA_i, dB_i and its rows' bias sum over all of its rows, in chunks of
  rows (``self_check.row_chunks``), its mask made a chunk at a time (``masks.keep_rows`` from the segment's row).

Against the same-dtype PyTorch arithmetic and fp64: a composed path's base output (and input gradient) is the layer's
own, replayed (only the rank-r terms and an adapter's own bias are checked); a fused path's base GEMM is checked against
the dense fp64 GEMM of the (dequantized) weight (``self_check.Dense64``, a slice of rows at a time). Memory: the
sampled rows' y, S and dX (O(3 · ROW_BLOCK · (K + N)) elements), one chunk's temporaries (O(CHUNK_ELEMENTS)), the
per-adapter fp64 sums (Σ r_i · (K + N) + n · N); a 4-bit weight is dequantized once, as the single-adapter check does.
The fp64 work: the sampled rows' GEMMs, plus O(M · r_i · (K + N)) per adapter for the reductions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..call import Call, Operands
from . import masks, self_check
from .lora_torch import add_masked, add_up, branch_backward, down
from .multi_torch import base_bias
from .self_check import Dense64, row_chunks, take_rows

__all__ = ["Piece", "compare_backward", "compare_forward", "pieces"]


@dataclass(frozen=True)
class Piece:
    """Rows ``lo`` … ``hi − 1`` of x, all of adapter ``adapter``: ``local`` is ``lo``'s row within the segment (where
    its mask starts), ``at`` its first row among the sampled rows (``take_rows``' order)."""

    adapter: int
    lo: int
    hi: int
    local: int
    at: int

    @property
    def rows(self) -> slice:
        return slice(self.lo, self.hi)

    @property
    def sampled(self) -> slice:
        return slice(self.at, self.at + self.hi - self.lo)


def pieces(segments, blocks: list[slice]) -> list[Piece]:
    """The sampled rows ``blocks`` split where they meet the segments, block after block, segment after segment."""
    out, at = [], 0
    for b in blocks:
        for i in range(segments.n):
            lo, hi = max(b.start, segments.starts[i]), min(b.stop, segments.starts[i + 1])
            if hi > lo:
                out.append(Piece(i, lo, hi, lo - segments.starts[i], at + lo - b.start))
        at += b.stop - b.start
    return out


def _keep(call: Call, t: Operands, seed, i: int, local: int, rows: int) -> torch.Tensor | None:
    """The kernels' keep mask of adapter i on its rows ``local`` … ``local + rows − 1`` (None without dropout)."""
    p = call.ps[i]
    if p == 0 or rows == 0:
        return None
    return masks.keep_rows("triton", seed[i:i + 1], local, rows, t.x.shape[1], p, t.x.device)


def _branch64(x: torch.Tensor, lora_A: torch.Tensor, p: float, keep: torch.Tensor | None) -> torch.Tensor:
    """S = dropout(x) Aᵀ in fp64 (x and A already fp64)."""
    if keep is None:
        return x @ lora_A.t()
    return (x * keep.double()) @ lora_A.t() / (1.0 - p)


def _delta(t: Operands, base_b: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Adapter i's own bias minus the bias the base output holds, fp32 (as ``segments.bias_deltas``), or None."""
    own = t.adapters.biases[i]
    if own is None:
        return None
    return own.float() - base_b.float() if base_b is not None else own.float()


class _Bases:
    """The base parts of a check's references: the layer's own output replayed (composed) or computed here (fused)."""

    def __init__(self, call: Call, t: Operands, path: str, seen: dict) -> None:
        self.call, self.t, self.path, self.seen = call, t, path, seen
        self.replayed = path == "composed"
        self.base_b = t.bias if t.base is None else base_bias(t.base)
        self._w64 = None

    def _dense64(self, bias: torch.Tensor | None) -> Dense64:
        t = self.t
        if t.base is None:
            return Dense64(t.weight, bias, self.call.layout)
        if self._w64 is None:
            self._w64 = t.base.dequantized()  # once per check: the single-adapter check's cost
        return Dense64(self._w64, bias, "linear")

    def bias_of(self, i: int) -> torch.Tensor | None:
        own = self.t.adapters.biases[i]
        return own if own is not None else self.base_b

    def forward(self, piece: Piece, x_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the same-dtype base output of the piece, with adapter i's bias; its fp64 one)."""
        t, i = self.t, piece.adapter
        if self.replayed:
            rows = self.seen["forward"][piece.sampled]
            same, ref = rows.clone(), rows.double()
            delta = _delta(t, self.base_b, i)
            if delta is not None:
                same.add_(delta.to(same.dtype))
                own, b = t.adapters.biases[i], self.base_b
                ref += own.double() - (b.double() if b is not None else 0.0)
            return same, ref
        bias = self.bias_of(i)
        if t.base is None:  # the dense PyTorch path's GEMM with the segment's bias
            w = t.weight if self.call.layout == "linear" else t.weight.t()
            same = torch.nn.functional.linear(x_p, w, None if bias is None else bias.to(x_p.dtype))
        else:  # the layer's own forward, an own bias added as the PyTorch path adds it
            same = t.base.forward(x_p)
            delta = _delta(t, self.base_b, i)
            if delta is not None:
                same.add_(delta.to(same.dtype))
        return same, self._dense64(bias).forward(x_p.double())

    def input_grad(self, piece: Piece, dy_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the same-dtype base input gradient of the piece, its fp64 one)."""
        t = self.t
        if self.replayed:
            rows = self.seen["input_grad"][piece.sampled]
            return rows.clone(), rows.double()
        if t.base is None:
            w = t.weight if self.call.layout == "linear" else t.weight.t()
            same = dy_p @ w
        else:
            same = t.base.input_grad(dy_p, t.x.dtype)
        return same, self._dense64(None).input_grad(dy_p.double(), torch.float64)


def compare_forward(call: Call, t: Operands, seed, path: str, outs: tuple, blocks: list[slice],
                    seen: dict) -> tuple[bool, str, float, float]:
    """y on the sampled rows and S on their pieces, against the single-adapter PyTorch arithmetic per piece."""
    y, s = outs[0], outs[1]
    ad = t.adapters
    parts = pieces(t.segments, blocks)
    s_views = t.segments.split(s)
    bases = _Bases(call, t, path, seen)
    got_y = take_rows(y, blocks)
    same_y, ref_y = torch.empty_like(got_y), torch.empty(got_y.shape, dtype=torch.float64, device=y.device)
    got_s, same_s, ref_s = [], [], []
    with torch.no_grad():
        for pc in parts:
            i = pc.adapter
            x_p = t.x[pc.rows]
            keep = _keep(call, t, seed, i, pc.local, pc.hi - pc.lo)
            base_same, base_ref = bases.forward(pc, x_p)
            s_same, _ = down(x_p, ad.lora_A[i], call.ps[i], 0, keep)
            same_y[pc.sampled] = add_up(base_same, s_same, ad.lora_B[i], ad.scalings[i]).to(y.dtype)
            s_ref = _branch64(x_p.double(), ad.lora_A[i].double(), call.ps[i], keep)
            ref_y[pc.sampled] = base_ref + ad.scalings[i] * (s_ref @ ad.lora_B[i].double().t())
            got_s.append(s_views[i][pc.local:pc.local + pc.hi - pc.lo].reshape(-1))
            same_s.append(s_same.reshape(-1))
            ref_s.append(s_ref.reshape(-1))
        cat = (lambda parts_, like: torch.cat(parts_) if parts_ else like.new_zeros(0))  # noqa: E731
        got = {"y": got_y, "S": cat(got_s, s)}
        same = {"y": same_y, "S": cat(same_s, s)}
        ref = {"y": ref_y, "S": cat(ref_s, s.double())}
        return self_check.compare(got, same, ref)


def compare_backward(call: Call, t: Operands, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                     path: str, grads: tuple, blocks: list[slice], seen: dict) -> tuple[bool, str, float, float]:
    """dX on the sampled rows' pieces; each adapter's dA_i, dB_i and bias sum over all its rows, in chunks."""
    need_dx, need_da, need_db, need_dbias = needs
    dx, das, dbs, dbias = grads
    ad, seg = t.adapters, t.segments
    got: dict[str, torch.Tensor] = {}
    same: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    bases = _Bases(call, t, path, seen)
    with torch.no_grad():
        if need_dx:
            got["dx"] = take_rows(dx, blocks)
            same_dx = torch.empty_like(got["dx"])
            ref_dx = torch.empty(got["dx"].shape, dtype=torch.float64, device=dx.device)
            for pc in pieces(seg, blocks):
                i = pc.adapter
                x_p, dy_p = t.x[pc.rows], dy[pc.rows]
                keep = _keep(call, t, seed, i, pc.local, pc.hi - pc.lo)
                base_same, base_ref = bases.input_grad(pc, dy_p)
                s_p, _ = down(x_p, ad.lora_A[i], call.ps[i], 0, keep)
                lora_dx, keep_f, *_ = branch_backward(dy_p, x_p, ad.lora_A[i], ad.lora_B[i], s_p, ad.scalings[i],
                                                      call.ps[i], 0, True, False, False, False, keep)
                same_dx[pc.sampled] = add_masked(base_same, lora_dx, keep_f).to(t.x.dtype)
                ds = (dy_p.double() @ ad.lora_B[i].double()) * (ad.scalings[i] / (1.0 - call.ps[i]))
                term = ds @ ad.lora_A[i].double()
                ref_dx[pc.sampled] = base_ref + (term if keep is None else term * keep.double())
            same["dx"], ref["dx"] = same_dx, ref_dx
        if need_da or need_db or need_dbias:
            K, N = t.x.shape[1], dy.shape[1]
            for i in range(seg.n):
                sums_same: dict[str, torch.Tensor] = {}
                sums_ref: dict[str, torch.Tensor] = {}
                start = seg.starts[i]
                A, B = ad.lora_A[i], ad.lora_B[i]
                for chunk in row_chunks(seg.lengths[i], max(K, N)):
                    n_rows = chunk.stop - chunk.start
                    if n_rows == 0:
                        continue
                    rows = slice(start + chunk.start, start + chunk.stop)
                    x_c, dy_c = t.x[rows], dy[rows]
                    keep = _keep(call, t, seed, i, chunk.start, n_rows)
                    s_c, _ = down(x_c, A, call.ps[i], 0, keep)
                    _, _, da, db, db_i = branch_backward(dy_c, x_c, A, B, s_c, ad.scalings[i], call.ps[i], 0, False,
                                                         need_da, need_db, need_dbias, keep)
                    x64 = x_c.double() if keep is None else x_c.double() * keep.double()
                    dy64 = dy_c.double()
                    scale = ad.scalings[i] / (1.0 - call.ps[i])
                    ref_c = {"dA": ((dy64 @ B.double()) * scale).t() @ x64 if need_da else None,
                             "dB": dy64.t() @ (x64 @ A.double().t()) * scale if need_db else None,
                             "dbias": dy64.sum(0) if need_dbias else None}
                    for name, s_val in (("dA", da), ("dB", db), ("dbias", db_i)):
                        r = ref_c[name]
                        if r is None:
                            continue
                        sums_same[name] = s_val.double() + sums_same[name] if name in sums_same else s_val.double()
                        sums_ref[name] = r + sums_ref[name] if name in sums_ref else r
                for name, value, shape in (("dA", das, A.shape), ("dB", dbs, B.shape),
                                           ("dbias", dbias, (N,))):
                    if value is None:
                        continue
                    key = f"{name}[{i}]"
                    got[key] = value[i]
                    zero = torch.zeros(shape, dtype=torch.float64, device=dy.device)
                    same[key] = sums_same.get(name, zero)
                    ref[key] = sums_ref.get(name, zero)
        return self_check.compare(got, same, ref)
