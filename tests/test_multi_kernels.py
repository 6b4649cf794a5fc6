"""Several LoRA adapters on one base in one pass (fused_lora/segments.py, kernels/multi_lora.py,
kernels/multi_lora_4bit.py, backends/multi_triton.py, multi_bnb4_triton.py, multi_torch.py), through Triton's
interpreter and the PyTorch path.

- Against fp64 (``reference.multi_lora_ref``, each segment through the single-adapter reference) with the tests' rule
  (error <= 2x the same-dtype PyTorch error + a small atol): y, dX, every dA_i and dB_i, the base bias's and each own
  bias's gradient; 1, 2, 3 and 5 adapters, ranks 1…16 mixed, empty segments first, in the middle and last, fp32 and bf16
  bases with fp32 adapters, both weight layouts, base/own/no bias, dropout on some adapters and not others,
  non-contiguous x and dY, odd K/N and segments that end mid-tile.
- Each adapter computes what it computes alone: segment i's rows of y and dX, S_i, dA_i, dB_i and its bias sum equal the
  single-adapter launchers' (``lora_triton`` / ``lora_torch``) on x_i alone with seed_i (the same mask); bit for bit
  through the interpreter (the same tiles, summed in the same order).
- Forced split reductions (atomics) agree with unsplit launches; more adapters than the segment search scans at once.
The quantized bases: test_multi_kernels_quantized.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import CUDA, DEVICE, assert_within_torch_error, atol_for

from fused_lora.backends import dropout_triton, lora_torch, lora_triton, multi_torch, multi_triton
from fused_lora.backends.dense_base import DenseBase
from fused_lora.dropout import scaled_keep_mask
from fused_lora.kernels.configs import INTERPRET
from fused_lora.reference import multi_lora_ref
from fused_lora.segments import MultiAdapters, Segments, bias_grads

# name → (module, gemm)
PATHS = {"torch": (multi_torch, ""), "triton-fused": (multi_triton, "fused"),
         "triton-composed": (multi_triton, "composed")}
SINGLE = {"torch": lora_torch.DENSE, "triton-fused": lora_triton.FUSED, "triton-composed": lora_triton.COMPOSED}


def single_adapter(path: str, x, weight, bias, lora_A, lora_B, scaling, p, seed, layout, dy):
    """The single-adapter pass of ``path`` on x alone (its call record and operands): (y, S, dX, dA, dB, dbias)."""
    from fused_lora import bases
    from fused_lora.autograd.driver import call_record
    from fused_lora.call import Operands

    backend = "torch" if path == "torch" else "triton"
    call = call_record("lora", bases.get("dense"), layout, scaling, p, backend, path.removeprefix("triton-"),
                       ("fused", "composed", "torch"))
    t = Operands(x, weight, bias, lora_A, lora_B)
    seed_arg = seed if backend == "triton" else int(seed)
    y, s = SINGLE[path].forward(t, call, seed_arg, None)
    dx, da, db, dbias = SINGLE[path].backward(t, call, (s,), dy, (True, True, True, True), seed_arg, None)
    return y, s, dx, da, db, dbias


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    ranks: tuple[int, ...]
    ps: tuple[float, ...]
    dtype: torch.dtype = torch.float32  # x, W, y (adapters fp32: PEFT's default on a half base)
    layout: str = "linear"
    bias: str = "base"  # "none", "base", "own" (base and some adapters' own), "own-only" (own, no base bias)
    x_layout: str = "contiguous"  # or "transposed" (column-major), "sliced" (every other column)
    K: int = 40
    N: int = 28

    def __str__(self):
        return (f"{len(self.lengths)}ad-{'-'.join(map(str, self.lengths))}-r{'.'.join(map(str, self.ranks))}-"
                f"{str(self.dtype).split('.')[1]}-{self.layout}-{self.bias}-{self.x_layout}")


# Odd K and N; segments that end mid-tile (the interpreter's tiles are 32 rows), empty ones first, middle and last.
CASES = [
    Case((37,), (8,), (0.2,)),
    Case((0, 45), (2, 16), (0.0, 0.3), torch.bfloat16, "conv1d", "own", "transposed"),
    Case((13, 0, 20), (1, 4, 3), (0.1, 0.0, 0.0), torch.float32, "conv1d", "none", "sliced", K=33, N=17),
    Case((7, 33, 0, 1, 40), (16, 2, 8, 1, 4), (0.0, 0.25, 0.5, 0.0, 0.1), torch.bfloat16, "linear", "own-only"),
    Case((31, 9, 0), (4, 8, 16), (0.3, 0.0, 0.25), torch.float32, "linear", "own", K=45, N=31),
]
SEEDS = (1234, 77, 2**40 + 3, 9, 31)  # one past 2³² (the kernels' Philox key takes all 64 bits)


def _x(M, K, dtype, layout, gen):
    if layout == "transposed":
        return torch.randn(K, M, generator=gen).to(DEVICE, dtype).t()
    if layout == "sliced":
        return torch.randn(M, 2 * K, generator=gen).to(DEVICE, dtype)[:, ::2]
    return torch.randn(M, K, generator=gen).to(DEVICE, dtype)


def build(case: Case, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + sum(case.lengths))
    M, K, N = sum(case.lengths), case.K, case.N
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(DEVICE)  # noqa: E731
    weight = rnd(N, K, scale=K**-0.5).to(case.dtype)
    if case.layout == "conv1d":
        weight = weight.t().contiguous()
    n = len(case.lengths)
    own = [rnd(N) if i % 2 == 1 else None for i in range(n)] if case.bias in ("own", "own-only") else [None] * n
    dy = rnd(M, 2 * N).to(case.dtype)[:, ::2] if case.x_layout == "sliced" else rnd(M, N).to(case.dtype)
    return {
        "x": _x(M, K, case.dtype, case.x_layout, gen), "weight": weight,
        "bias": rnd(N).to(case.dtype) if case.bias in ("base", "own") else None,
        "A": [rnd(r, K, scale=K**-0.5) for r in case.ranks], "B": [rnd(N, r, scale=1.0) for r in case.ranks],
        "scalings": [2.0 / r for r in case.ranks], "own": own, "dy": dy,
        "seeds": [SEEDS[i] if i < len(SEEDS) else 1000 + 7 * i for i in range(n)],
    }


def adapters_of(d: dict, case: Case) -> MultiAdapters:
    return MultiAdapters(d["A"], d["B"], d["scalings"], case.ps, d["own"])


def masks(path: str, case: Case, seeds) -> list[torch.Tensor | None]:
    """The scaled keep mask each segment's adapter draws on ``path`` for x_i alone (None without dropout)."""
    make = scaled_keep_mask if path == "torch" else dropout_triton.dropout_mask
    return [make(s, (n, case.K), p, DEVICE) if p > 0 else None
            for n, p, s in zip(case.lengths, case.ps, seeds, strict=False)]


def references(d: dict, case: Case, mask_list) -> tuple[dict, dict]:
    """(fp64 reference, same-dtype PyTorch reference): y and every gradient, by autograd through multi_lora_ref."""
    out = []
    for upcast in (torch.float64, None):
        make = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach().clone())  # noqa: E731
        x = make(d["x"]).requires_grad_()
        As = [make(a).requires_grad_() for a in d["A"]]
        Bs = [make(b).requires_grad_() for b in d["B"]]
        bias = make(d["bias"]).requires_grad_() if d["bias"] is not None else None
        own = [make(b).requires_grad_() if b is not None else None for b in d["own"]]
        y = multi_lora_ref(x, make(d["weight"]), bias, As, Bs, d["scalings"], list(case.lengths), case.layout,
                           biases=own, dropout_masks=mask_list, upcast=upcast)
        y.backward(d["dy"].to(y.dtype))
        zeros_if_none = lambda g, t: g if g is not None else torch.zeros_like(t)  # noqa: E731
        out.append({"y": y.detach(), "dx": x.grad, "dA": [zeros_if_none(a.grad, a) for a in As],
                    "dB": [zeros_if_none(b.grad, b) for b in Bs],
                    "dbias": bias.grad if bias is not None else None,
                    "own": [b.grad if b is not None else None for b in own]})
    return out[0], out[1]


def run(path: str, d: dict, case: Case, adapters: MultiAdapters, segments: Segments):
    """y, S and the gradients of one forward and backward on ``path``."""
    module, gemm = PATHS[path]
    need_dbias = d["bias"] is not None or adapters.has_own_bias
    y, s = module.forward(d["x"], d["weight"], d["bias"], adapters, segments, d["seeds"], case.layout, gemm)
    dx, das, dbs, dbias = module.backward(d["dy"], d["x"], d["weight"], adapters, segments, d["seeds"], s, case.layout,
                                          True, True, True, need_dbias, gemm)
    base_grad, own_grads = bias_grads(dbias, adapters) if need_dbias else (None, [None] * adapters.n)
    return {"y": y, "s": s, "dx": dx, "dA": das, "dB": dbs, "dbias": base_grad if d["bias"] is not None else None,
            "own": own_grads}


def _check(name, got, same, ref, dtype):
    scale = ref.abs().max().item() if ref.numel() else 1.0
    assert_within_torch_error(name, got, same, ref, atol_for(dtype, scale))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_fp64(case, path):
    d = build(case)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    got = run(path, d, case, adapters, segments)
    ref, same = references(d, case, masks(path, case, d["seeds"]))
    assert got["y"].dtype == case.dtype and got["dx"].dtype == case.dtype
    s_dtype = torch.float32  # the kernels' accumulator, or the adapters' dtype (fp32 here) on the PyTorch path
    assert got["s"].dtype == s_dtype and got["s"].shape == (segments.s_numel,)
    _check("y", got["y"], same["y"], ref["y"], case.dtype)
    _check("dx", got["dx"], same["dx"], ref["dx"], case.dtype)
    for i in range(adapters.n):
        _check(f"dA[{i}]", got["dA"][i], same["dA"][i], ref["dA"][i], torch.float32)
        _check(f"dB[{i}]", got["dB"][i], same["dB"][i], ref["dB"][i], torch.float32)
        assert (got["own"][i] is None) == (ref["own"][i] is None), i
        if ref["own"][i] is not None:
            _check(f"own bias[{i}]", got["own"][i], same["own"][i], ref["own"][i], torch.float32)
    assert (got["dbias"] is None) == (ref["dbias"] is None)
    if ref["dbias"] is not None:
        _check("dbias", got["dbias"], same["dbias"], ref["dbias"], torch.float32)
    # A_i, B_i that play no part (an empty segment) get exact zeros
    for i, n in enumerate(case.lengths):
        if n == 0:
            assert not got["dA"][i].any() and not got["dB"][i].any(), i


def _same(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """``got`` equals ``want``: bit for bit, or within a few roundings of the values' size (another summation order:
    the PyTorch path's GEMM over all rows against one over x_i's; on a GPU another autotuned tile)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    if exact:
        assert torch.equal(got, want), f"{name}: max |Δ| {(got.double() - want.double()).abs().max().item():.3g}"
        return
    rtol = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}[got.dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max |Δ| {err:.3g} > {rtol:g} × {scale:.3g}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=str)
def test_each_adapter_computes_what_it_computes_alone(case, path):
    """Segment i's share of every output equals the single-adapter launcher's on x_i alone with seed_i: N adapters in
    one batch train as N separate runs."""
    d = build(case, seed=1)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    got = run(path, d, case, adapters, segments)
    # Bit for bit where every GEMM is the kernels' (the fused path, interpreted: the same tiles in the same order); the
    # composed and PyTorch paths run the base GEMM over all rows (cuBLAS/MKL), which rounds other rows' way.
    exact = path == "triton-fused" and INTERPRET and not CUDA
    s_parts = segments.split(got["s"])
    for i, n in enumerate(case.lengths):
        if n == 0:
            continue
        rows = segments.rows_of(i)
        x_i, dy_i = d["x"][rows], d["dy"][rows]
        bias_i = d["own"][i] if d["own"][i] is not None else d["bias"]
        y_i, s_i, dx_i, da_i, db_i, dbias_i = single_adapter(path, x_i, d["weight"], bias_i, d["A"][i], d["B"][i],
                                                             d["scalings"][i], case.ps[i], d["seeds"][i],
                                                             case.layout, dy_i)
        _same(f"y[{i}]", got["y"][rows], y_i, exact)
        _same(f"S[{i}]", s_parts[i], s_i, exact)
        _same(f"dx[{i}]", got["dx"][rows], dx_i, exact)
        _same(f"dA[{i}]", got["dA"][i], da_i, exact)
        _same(f"dB[{i}]", got["dB"][i], db_i, exact)
        own_sum = got["own"][i] if d["own"][i] is not None else None
        if own_sum is not None:
            _same(f"own bias[{i}]", own_sum, dbias_i, exact)


def test_masks_are_the_single_adapter_ones():
    """The test above could pass with no dropout at all if every p were 0: the cases drop on several segments, and a
    mask of x_i alone differs from the rows of a mask drawn for the whole batch (the row counter restarts)."""
    case = CASES[3]
    assert sum(p > 0 for n, p in zip(case.lengths, case.ps, strict=True) if n) >= 2
    whole = dropout_triton.dropout_mask(SEEDS[1], (sum(case.lengths), case.K), case.ps[1], DEVICE)
    alone = masks("triton-fused", case, SEEDS)[1]
    assert not torch.equal(whole[Segments(case.lengths, case.ranks).rows_of(1)], alone)


@pytest.mark.skipif(CUDA, reason="the launchers split reductions over programs on a GPU by themselves")
def test_forced_splits_agree():
    """The reductions a GPU splits over programs (split-K slices of S, atomics into dS/dB/dbias and dA) give what one
    program per output gives (to fp32 rounding: another summation order)."""
    case = CASES[4]
    d = build(case, seed=2)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    t = multi_triton.tables(segments, adapters, d["seeds"], DEVICE)
    A_cat, B_cat = adapters.A_cat(), adapters.B_cat()
    s1 = multi_triton.multi_lora_down(d["x"], A_cat, t, split_k=1)
    s2 = multi_triton.multi_lora_down(d["x"], A_cat, t, split_k=2)
    one = multi_triton.multi_lora_dy_pass(d["dy"], B_cat, s1, t, True, True, True, split_n=1)
    three = multi_triton.multi_lora_dy_pass(d["dy"], B_cat, s1, t, True, True, True, split_n=3)
    da1 = multi_triton.multi_lora_da(one[0], d["x"], A_cat, t, split_m=1)
    da2 = multi_triton.multi_lora_da(one[0], d["x"], A_cat, t, split_m=2)
    for name, a, b in [("S", s2, s1), ("dS", three[0], one[0]), ("dB", three[1], one[1]), ("dbias", three[2], one[2]),
                       ("dA", da2, da1)]:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), name


def test_bad_input_is_named():
    case = CASES[0]
    d = build(case)
    adapters = adapters_of(d, case)
    with pytest.raises(ValueError, match="sum to 36 rows but x has 37 rows"):
        multi_triton.forward(d["x"], d["weight"], d["bias"], adapters, adapters.segments([36]), d["seeds"], "linear")
    with pytest.raises(ValueError, match="2 segments .* for 1 adapters"):
        multi_torch.forward(d["x"], d["weight"], d["bias"], adapters, Segments([30, 7], [8, 8]), d["seeds"], "linear")


def test_empty_batch_and_zero_length_segments_only():
    """M = 0 (every segment empty): the PyTorch path stands in (no launch has a row); the shapes and zeros are right."""
    case = Case((0, 0), (2, 3), (0.1, 0.0))
    d = build(case)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    for path in PATHS:
        got = run(path, d, case, adapters, segments)
        assert got["y"].shape == (0, case.N) and got["dx"].shape == (0, case.K) and got["s"].numel() == 0
        assert all(not a.any() for a in got["dA"]) and all(not b.any() for b in got["dB"])


def test_dense_base_object_on_the_composed_path():
    """Any base with forward / input_grad: a DenseBase through multi_triton.composed_* gives the fused path's result."""
    case = CASES[2]
    d = build(case, seed=5)
    adapters = adapters_of(d, case)
    segments = adapters.segments(case.lengths)
    base = DenseBase(d["weight"], d["bias"], case.layout)
    y, s = multi_triton.composed_forward(d["x"], base, adapters, segments, d["seeds"])
    y_fused, s_fused = multi_triton.forward(d["x"], d["weight"], d["bias"], adapters, segments, d["seeds"],
                                            case.layout)
    assert torch.equal(s, s_fused)
    assert torch.allclose(y, y_fused, rtol=1e-5, atol=1e-5 * y_fused.abs().max().item())


def test_many_adapters():
    """70 adapters (the kernels' segment search scans 64 segments per step: the tiles of the last ones are found in its
    second step), short and empty segments, against fp64."""
    gen = torch.Generator().manual_seed(70)
    lengths = tuple(int(n) for n in torch.randint(0, 4, (70,), generator=gen))
    ranks = tuple(int(r) for r in torch.randint(1, 4, (70,), generator=gen))
    case = Case(lengths, ranks, tuple(0.2 if i % 3 == 0 else 0.0 for i in range(70)), K=21, N=17)
    d = build(case, seed=3)
    adapters = adapters_of(d, case)
    got = run("triton-fused", d, case, adapters, adapters.segments(case.lengths))
    ref, same = references(d, case, masks("triton-fused", case, d["seeds"]))
    _check("y", got["y"], same["y"], ref["y"], case.dtype)
    _check("dx", got["dx"], same["dx"], ref["dx"], case.dtype)
    for i in (0, 63, 64, 69):
        _check(f"dA[{i}]", got["dA"][i], same["dA"][i], ref["dA"][i], torch.float32)
        _check(f"dB[{i}]", got["dB"][i], same["dB"][i], ref["dB"][i], torch.float32)
