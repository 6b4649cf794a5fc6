"""Several LoRA adapters on one frozen base in one pass: the batch's rows grouped by adapter, and the adapters.

The rows of a batch (x: M×K, any leading dims flattened) come in contiguous segments, one per adapter: adapter i owns
rows ``[start_i, start_{i+1})``, of any length, 0 included. Adapter i has its own A_i (r_i×K), B_i (N×r_i), scaling s_i,
dropout p_i and seed, and optionally its own bias b_i (N) that replaces the base bias on its rows:

    y_i = x_i Wᵀ + b(_i) + s_i · dropout_i(x_i) A_iᵀ B_iᵀ

Each adapter computes exactly what it would compute alone on x_i: its dropout mask is the one the single-adapter paths
draw for x_i alone with seed_i (rows numbered from 0 within the segment), so that N adapters trained in one batch equal
N separate single-adapter runs.

    Segments(lengths, ranks)       the row segments (host ints: the collator knows them, no device sync) and the
                                   packed layout of the per-segment S_i = dropout_i(x_i) A_iᵀ (len_i×r_i) and dS_i
    MultiAdapters(A, B, scalings, dropout_ps, biases)
                                   the adapters of one layer, in segment order
    bias_rows / bias_deltas / bias_grads
                                   the per-segment bias of the fused GEMMs and of the composed path, and the bias
                                   gradients from the per-segment sums Σ_rows dY_i

Ranks are laid out padded to a multiple of ``RANK_ALIGN`` (4): adapter i takes rp_i = ``padded_rank(r_i)`` rows of
A_cat = cat(A_i) and columns of B_cat = cat(B_i, dim=1), the padding zeros (ranks 1, 2, 3 take 4; the usual 8, 16, 32,
64 nothing more), and so do dA_cat and dB_cat. The per-segment S_i and dS_i (fp32 in the kernels) live in one flat
buffer, segment after segment, each row-major len_i×rp_i; the padding columns hold zeros (x times A's zero rows, dY
times B's zero columns). :meth:`Segments.split` gives the len_i×r_i views. Nothing is stored beyond x and S.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Each adapter's ranks are padded to a multiple of this in every rank-indexed buffer (A_cat, B_cat, S, dS, dA, dB), so
# that the kernels know (``tl.multiple_of``) that a segment's rank, its first rank and its S offset are multiples of 4:
# rank masks and rows then load as 128-bit vectors (4 fp32). With the ranks as they are, unknown to the compiler, every
# element took its own address and predicate: the in-place add at rank 64 went from 174 registers (the single-adapter
# kernel) to 255 and 56 B of spills per thread, the forward GEMM at 128×128×64 spilled 32-64 B (sm_80,
# bench/compile_report.py); padded, 180 registers and none, 248 and none.
RANK_ALIGN = 4


def padded_rank(rank: int) -> int:
    """The ranks a rank-``rank`` adapter takes in the padded layout (its rows of A_cat, its row stride in S)."""
    return -(-rank // RANK_ALIGN) * RANK_ALIGN


def _on_device(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host table on ``device``. On a GPU through pinned memory and a non-blocking copy: a copy from pageable
    memory can hold the host until the stream's earlier work is done, a sync per batch (the segments change with every
    batch); the caching host allocator keeps the pinned buffer until its copy has run."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ints(values, name: str, where: str) -> tuple[int, ...]:
    """``values`` as a tuple of Python ints: integers only (numpy's too), not bools, floats or tensors (a tensor would
    need a device sync; the collator knows the lengths on the host)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{where}: {name} must be host integers (Python or numpy ints; no tensors: reading one "
                            f"would sync with the device), got {type(v).__name__} {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class Segments:
    """Row segments of a batch, one per adapter in adapter order, and the adapters' ranks.

    ``lengths[i]``: the rows of adapter i (>= 0); ``ranks[i]``: r_i (>= 1). Host ints only. Derived, on the host:
    ``starts`` (n+1 row offsets), ``rank_offsets`` (n+1 offsets of each adapter's padded ranks in A_cat (R_tot×K),
    B_cat (N×R_tot), dA_cat and dB_cat), ``s_offsets`` (n+1 offsets of each S_i, len_i×``padded_rank(r_i)``, in the
    packed S). :meth:`table` puts the three on a device, once per device."""

    lengths: tuple[int, ...]
    ranks: tuple[int, ...]
    starts: tuple[int, ...] = field(init=False)
    rank_offsets: tuple[int, ...] = field(init=False)
    s_offsets: tuple[int, ...] = field(init=False)
    max_rank: int = field(init=False)  # the largest padded rank (the kernels' rank chunks follow it)
    _tables: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        where = "Segments"
        lengths = _ints(self.lengths, "lengths", where)
        ranks = _ints(self.ranks, "ranks", where)
        if not lengths:
            raise ValueError(f"{where}: no segments; give one length (and one rank) per adapter, at least one")
        if len(lengths) != len(ranks):
            raise ValueError(f"{where}: {len(lengths)} segment lengths but {len(ranks)} adapter ranks; give one length "
                             "per adapter, in adapter order (0 for an adapter with no rows in this batch)")
        bad = [(i, n) for i, n in enumerate(lengths) if n < 0]
        if bad:
            raise ValueError(f"{where}: segment lengths must be >= 0, got {bad[0][1]} for adapter {bad[0][0]} "
                             f"(lengths {list(lengths)})")
        bad = [(i, r) for i, r in enumerate(ranks) if r < 1]
        if bad:
            raise ValueError(f"{where}: adapter ranks must be >= 1, got r={bad[0][1]} for adapter {bad[0][0]}")
        set_ = object.__setattr__
        set_(self, "lengths", lengths)
        set_(self, "ranks", ranks)
        starts, rank_offsets, s_offsets = [0], [0], [0]
        for n, r in zip(lengths, ranks, strict=True):
            starts.append(starts[-1] + n)
            rank_offsets.append(rank_offsets[-1] + padded_rank(r))
            s_offsets.append(s_offsets[-1] + n * padded_rank(r))
        set_(self, "starts", tuple(starts))
        set_(self, "rank_offsets", tuple(rank_offsets))
        set_(self, "s_offsets", tuple(s_offsets))
        # Kept, not a property: the launchers read it several times per call (measured: a tenth of a stubbed
        # 8-adapter call's host time went to recomputing it and the adapters' ranks).
        set_(self, "max_rank", max(padded_rank(r) for r in ranks))

    @property
    def n(self) -> int:
        """The number of adapters (segments)."""
        return len(self.lengths)

    @property
    def rows(self) -> int:
        """M: the rows of all segments."""
        return self.starts[-1]

    @property
    def total_rank(self) -> int:
        """R_tot = Σ padded_rank(r_i): the rows of A_cat and dA_cat, the columns of B_cat and dB_cat."""
        return self.rank_offsets[-1]

    @property
    def s_numel(self) -> int:
        """Σ len_i·padded_rank(r_i): the elements of the packed S (and dS)."""
        return self.s_offsets[-1]

    def check(self, rows: int, n_adapters: int, where: str) -> None:
        """Raises ValueError unless the segments cover ``rows`` rows and there is one per adapter."""
        if n_adapters != self.n:
            raise ValueError(f"{where}: {self.n} segments (lengths {list(self.lengths)}) for {n_adapters} adapters; "
                             "give one segment length per adapter, in adapter order (0 for an adapter without rows)")
        if rows != self.rows:
            raise ValueError(f"{where}: the segment lengths {list(self.lengths)} sum to {self.rows} rows but x has "
                             f"{rows} rows (tokens, leading dims flattened); the segments must cover the batch exactly")

    def rows_of(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i + 1])

    def ranks_of(self, i: int) -> slice:
        """Adapter i's ranks in A_cat's rows / B_cat's columns (its r_i, without the padding)."""
        return slice(self.rank_offsets[i], self.rank_offsets[i] + self.ranks[i])

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """The per-segment len_i×r_i views of a packed S or dS (1-D, :attr:`s_numel` elements; row stride
        ``padded_rank(r_i)``)."""
        if packed.dim() != 1 or packed.numel() != self.s_numel:
            raise ValueError(f"Segments.split: expected a 1-D tensor of {self.s_numel} elements (Σ len_i·"
                             f"padded_rank(r_i)), got shape {tuple(packed.shape)}")
        return [packed[self.s_offsets[i]:self.s_offsets[i + 1]].view(self.lengths[i], padded_rank(r))[:, :r]
                for i, r in enumerate(self.ranks)]

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The packed 1-D form of per-segment len_i×r_i tensors (the inverse of :meth:`split`; padding zeros)."""
        if not parts:
            raise ValueError("Segments.pack: no parts")
        out = parts[0].new_zeros(self.s_numel)
        for view, part in zip(self.split(out), parts, strict=True):
            view.copy_(part)
        return out

    def tiles(self, block_m: int) -> int:
        """Row tiles of ``block_m`` rows that do not straddle segments: Σ cdiv(len_i, block_m) <= cdiv(M, block_m) + n
        (the kernels' grids take the bound: the autotuner picks block_m after the arguments are fixed)."""
        return sum(-(-n // block_m) for n in self.lengths)

    def table(self, device: torch.device) -> torch.Tensor:
        """int64 (3, n+1) on ``device``: row starts, rank offsets, S offsets (what the kernels index by). Made once per
        device (one host-to-device copy); keep the object for backward."""
        device = torch.device(device)
        t = self._tables.get(device)
        if t is None:
            t = _on_device([self.starts, self.rank_offsets, self.s_offsets], torch.int64, device)
            self._tables[device] = t
        return t


_SCALAR_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_SCALAR_TABLES = 256  # (scalings, ps, device) sets in a process: a sweep's layers share a handful


@dataclass(frozen=True, eq=False)
class MultiAdapters:
    """The adapters of one layer, in segment order: ``lora_A[i]`` r_i×K, ``lora_B[i]`` N×r_i (all one dtype and device;
    fp32 adapters on a half base are fine), ``scalings[i]`` (alpha/r, or alpha/sqrt(r) for rsLoRA), ``dropout_ps[i]``
    in [0, 1), ``biases[i]``: adapter i's own bias (N) replacing the base bias on its rows, or None (the base's; an
    empty tuple: None for all). The scalar table is made once per device; A_cat / B_cat are made per call (the
    parameters change between steps)."""

    lora_A: tuple[torch.Tensor, ...]
    lora_B: tuple[torch.Tensor, ...]
    scalings: tuple[float, ...]
    dropout_ps: tuple[float, ...]
    biases: tuple[torch.Tensor | None, ...] = ()
    ranks: tuple[int, ...] = field(init=False)  # r_i (kept: the launchers read it several times per call)

    def __post_init__(self) -> None:
        where = "MultiAdapters"
        set_ = object.__setattr__
        set_(self, "lora_A", tuple(self.lora_A))
        set_(self, "lora_B", tuple(self.lora_B))
        set_(self, "scalings", tuple(float(s) for s in self.scalings))
        set_(self, "dropout_ps", tuple(float(p) for p in self.dropout_ps))
        set_(self, "biases", tuple(self.biases) if self.biases else (None,) * len(self.lora_A))
        set_(self, "ranks", tuple(a.shape[0] for a in self.lora_A))
        n = len(self.lora_A)
        counts = {"lora_A": n, "lora_B": len(self.lora_B), "scalings": len(self.scalings),
                  "dropout_ps": len(self.dropout_ps), "biases": len(self.biases)}
        if n == 0 or len(set(counts.values())) != 1:
            raise ValueError(f"{where}: one entry per adapter in each of lora_A, lora_B, scalings, dropout_ps (and "
                             f"biases, if given), at least one adapter; got {counts}")
        K, N = self.lora_A[0].shape[-1], self.lora_B[0].shape[0]
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or a.shape[1] != K or b.shape != (N, a.shape[0]):
                raise ValueError(f"{where}: adapter {i}: lora_A must be r×in_features and lora_B out_features×r with "
                                 f"r >= 1 and every adapter on the same in/out features ({K}, {N}); got lora_A "
                                 f"{tuple(a.shape)}, lora_B {tuple(b.shape)}")
        dtypes = {t.dtype for t in self.lora_A + self.lora_B}
        devices = {t.device for t in self.lora_A + self.lora_B}
        if len(dtypes) != 1 or len(devices) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"{where}: every lora_A and lora_B must share one floating dtype and one device (they are "
                             f"concatenated for the kernels); got dtypes {sorted(map(str, dtypes))}, devices "
                             f"{sorted(map(str, devices))}. Cast the adapters (e.g. all float32)")
        for i, p in enumerate(self.dropout_ps):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{where}: adapter {i}: dropout p must be in [0, 1), got {p}")
        for i, s in enumerate(self.scalings):
            if not math.isfinite(s):
                raise ValueError(f"{where}: adapter {i}: scaling must be finite, got {s}")
        for i, b in enumerate(self.biases):
            if b is not None and (b.shape != (N,) or b.device not in devices):
                raise ValueError(f"{where}: adapter {i}: its own bias must have shape ({N},) on the adapters' device, "
                                 f"got {tuple(b.shape)} on {b.device}")

    @property
    def n(self) -> int:
        return len(self.lora_A)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A[0].dtype

    @property
    def device(self) -> torch.device:
        return self.lora_A[0].device

    @property
    def in_features(self) -> int:
        return self.lora_A[0].shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B[0].shape[0]

    @property
    def has_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_ps)

    @property
    def has_own_bias(self) -> bool:
        return any(b is not None for b in self.biases)

    def segments(self, lengths: Sequence[int]) -> Segments:
        """The :class:`Segments` of a batch with these adapters' ranks."""
        return Segments(tuple(lengths), self.ranks)

    @property
    def padded(self) -> bool:
        """Whether some rank is not a multiple of ``RANK_ALIGN`` (A_cat and B_cat then get zero rows / columns)."""
        return any(r % RANK_ALIGN for r in self.ranks)

    def A_cat(self) -> torch.Tensor:
        """cat(A_i), each padded with zero rows to ``padded_rank(r_i)``: R_tot×K (a copy of the small adapters, per
        call)."""
        if not self.padded:
            return self.lora_A[0] if self.n == 1 else torch.cat(self.lora_A, dim=0)
        out = self.lora_A[0].new_zeros((sum(padded_rank(r) for r in self.ranks), self.in_features))
        row = 0
        for a in self.lora_A:
            out[row:row + a.shape[0]].copy_(a)
            row += padded_rank(a.shape[0])
        return out

    def B_cat(self) -> torch.Tensor:
        """cat(B_i, dim=1), each padded with zero columns to ``padded_rank(r_i)``: N×R_tot."""
        if not self.padded:
            return self.lora_B[0] if self.n == 1 else torch.cat(self.lora_B, dim=1)
        out = self.lora_B[0].new_zeros((self.out_features, sum(padded_rank(r) for r in self.ranks)))
        col = 0
        for b in self.lora_B:
            out[:, col:col + b.shape[1]].copy_(b)
            col += padded_rank(b.shape[1])
        return out

    def scalar_table(self, device: torch.device) -> torch.Tensor:
        """fp32 (3, n) on ``device``: scalings, dropout p, 1/(1-p); each rounded to fp32 as the single-adapter kernels
        receive them (Triton passes Python floats as fp32). Kept per (values, device) for the process: a layer's
        adapters are made per call, their scalings and p stay (one host-to-device copy per layer kind, not per call).
        The kernels only read it."""
        device = torch.device(device)
        key = (self.scalings, self.dropout_ps, device)
        t = _SCALAR_TABLES.get(key)
        if t is None:
            scales = [1.0 / (1.0 - p) for p in self.dropout_ps]  # dropout.drop_scale (p < 1 here)
            t = _on_device([self.scalings, self.dropout_ps, scales], torch.float32, device)
            if len(_SCALAR_TABLES) >= _MAX_SCALAR_TABLES:
                _SCALAR_TABLES.clear()
            _SCALAR_TABLES[key] = t
        return t

    def check(self, segments: Segments, rows: int, in_features: int, out_features: int, where: str) -> None:
        """Raises ValueError unless the adapters fit the layer (K, N) and ``segments`` covers ``rows`` with these
        ranks."""
        segments.check(rows, self.n, where)
        if segments.ranks != self.ranks:
            raise ValueError(f"{where}: the segments carry ranks {list(segments.ranks)} but the adapters have ranks "
                             f"{list(self.ranks)}; make them with MultiAdapters.segments(lengths)")
        if (self.in_features, self.out_features) != (in_features, out_features):
            raise ValueError(f"{where}: the adapters are for in_features={self.in_features}, out_features="
                             f"{self.out_features}, the layer has {in_features}, {out_features}")


def seed_ints(seeds: torch.Tensor | Sequence[int] | None, n: int) -> list[int]:
    """The per-adapter dropout seeds as Python ints (the PyTorch path's Generators; a host read of a device tensor)."""
    if seeds is None:
        return [0] * n
    values = seeds.reshape(-1).tolist() if isinstance(seeds, torch.Tensor) else [int(s) for s in seeds]
    if len(values) != n:
        raise ValueError(f"fused_lora multi-adapter: {len(values)} dropout seeds for {n} adapters; give one per "
                         "adapter")
    return values


_NO_SEEDS: dict[tuple[int, torch.device], torch.Tensor] = {}


def seed_table(seeds: torch.Tensor | Sequence[int] | None, n: int, device: torch.device) -> torch.Tensor:
    """The per-adapter dropout seeds as an int64 (n,) tensor on ``device`` (the kernels read them there: a seed drawn
    on the device stays there)."""
    if seeds is None:  # no dropout: a table the kernels never read, one per (n, device)
        key = (n, torch.device(device))
        t = _NO_SEEDS.get(key)
        if t is None:
            t = _NO_SEEDS[key] = torch.zeros(n, dtype=torch.int64, device=device)
        return t
    if isinstance(seeds, torch.Tensor):
        if seeds.numel() != n:
            raise ValueError(f"fused_lora multi-adapter: {seeds.numel()} dropout seeds for {n} adapters; give one "
                             "per adapter")
        return seeds.reshape(n).to(device, torch.int64)
    return _on_device(seed_ints(seeds, n), torch.int64, torch.device(device))


def bias_rows(base_bias: torch.Tensor | None, adapters: MultiAdapters,
              dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """(n, N): row i the bias on segment i's rows (the adapter's own, else the base's, else zeros), in ``dtype``
    (default: the promoted dtype of every bias given, so that no value is rounded); None when there is no bias at all.
    The fused GEMMs add row ``segment`` in fp32."""
    given = [b for b in (base_bias, *adapters.biases) if b is not None]
    if not given:
        return None
    if dtype is None:
        dtype = given[0].dtype
        for b in given[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
    out = torch.zeros((adapters.n, adapters.out_features), dtype=dtype, device=given[0].device)
    for i, own in enumerate(adapters.biases):
        row = own if own is not None else base_bias
        if row is not None:
            out[i].copy_(row)
    return out


def bias_deltas(base_bias: torch.Tensor | None, adapters: MultiAdapters) -> torch.Tensor | None:
    """(n, N) fp32: own bias minus the base's (the base's output already holds the base bias) on the rows of an adapter
    with its own bias, 0 elsewhere; None when no adapter has its own. The composed path adds row ``segment`` with the
    rank-r term."""
    if not adapters.has_own_bias:
        return None
    out = torch.zeros((adapters.n, adapters.out_features), dtype=torch.float32, device=adapters.device)
    for i, own in enumerate(adapters.biases):
        if own is not None:
            out[i].copy_(own)
            if base_bias is not None:
                out[i].sub_(base_bias.float())
    return out


def bias_grads(dbias: torch.Tensor, adapters: MultiAdapters) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """From the per-segment sums (n, N) = Σ_rows dY_i: (the base bias's gradient: the sum over the segments that use the
    base bias; per adapter, its own bias's gradient or None)."""
    own = [dbias[i] if b is not None else None for i, b in enumerate(adapters.biases)]
    base_rows = [i for i, b in enumerate(adapters.biases) if b is None]
    base = dbias[base_rows].sum(0) if base_rows else dbias.new_zeros(dbias.shape[1])
    return base, own
