"""Issue 20: autotuning must not change a result. On a GPU the autotuner benchmarks every config of a new key on the
call's own tensors before the real launch; a kernel that adds in place into its output (the composed path's y += s·S Bᵀ,
dX += m ⊙ (dS A)) or accumulates with atomics into a zeroed buffer (dB, dbias, split dS/dA, DoRA's d magnitude)
returns garbage on the first call unless ``restore_value`` / ``reset_to_zero`` undo each benchmark run.

``autotune_harness`` makes the interpreter benchmark as a GPU does (several configs, several runs of each on the real
arguments, the autotuner's own hooks around each run; ``mode="one"``: triton 3.6 benchmarking the one config left after
pruning, as with ``FUSED_LORA_AUTOTUNE=0``). Every public path runs once normally and once as a first call under the
harness: the output and every gradient must be bit for bit the normal call's (the harness launches the kernel's own
config after benchmarking, so only benchmarking can make a difference), and the harness must have benchmarked exactly
the autotuned kernels of that path. The reductions a GPU splits over programs (atomics: split dS, dA, DoRA's dY
pass; DoRA's norm, whose split partials are stored apart) are not split on CPU by the launchers: those kernels are
launched here directly with a split grid.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from autotune_harness import AUTOTUNED, autotune_harness_fixture, autotuned_kernels, gpu_like_autotuning  # noqa: F401
from helpers import CUDA, DEVICE
from torch import nn

from fused_lora import LoRALinear, hardware
from fused_lora.backends import triton_launch

pytestmark = [
    pytest.mark.skipif(CUDA, reason="the harness runs the kernels through Triton's interpreter (CPU)"),
    # a kernel failing under the harness must fail the test, not hand the call to the PyTorch path
    pytest.mark.filterwarnings("error::fused_lora.FallbackWarning"),
]

M, K, N, R = 37, 45, 29, 5  # odd sizes: edge tiles everywhere
K4 = 64  # 4-bit/8-bit: K a multiple of bitsandbytes' blocksize (the aligned loads every real projection takes)
SEED = 1234

# The autotuned kernels each path launches (forward, backward).
LORA_FWD = {"fused": {"lora_down_kernel", "lora_fwd_kernel"},
            "composed": {"lora_down_kernel", "lora_up_add_kernel"},
            "4bit-fused": {"lora_down_kernel", "lora_fwd_4bit_kernel"}}
LORA_BWD = {"fused": {"lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel"},
            "composed": {"lora_dy_kernel", "lora_dx_add_kernel", "lora_da_kernel"},
            "4bit-fused": {"lora_dy_kernel", "lora_dx_4bit_kernel", "lora_da_kernel"}}
DORA_FWD = {False: {"dora_norm_kernel", "lora_down_kernel", "dora_fwd_kernel"},
            True: {"dora_norm_kernel", "dora_down_kernel", "dora_fwd_kernel"}}  # by dropout on
DORA_BWD = {False: {"dora_dy_kernel", "lora_dx_kernel", "lora_da_kernel"},
            True: {"dora_dy_kernel", "dora_dx_kernel", "lora_da_kernel"}}

# The audit: what each autotuned kernel writes, and how benchmarking is kept from changing it. Stores of
# values computed from inputs only need nothing (every run writes the same); in-place adds need restore_value; atomic
# adds into a zero-filled buffer need reset_to_zero (zeroed before every benchmark run and once after the benchmarks,
# before the real launch: triton 3.6 and 3.9 alike). Buffers listed under reset_to_zero that a launch stores into
# instead (dS, dA unsplit: torch.empty) are only zeroed, then written whole.
PROTECTION = {
    "lora_down_kernel": ((), ()),  # S (or its split-K slices): stores
    "lora_fwd_kernel": ((), ()),  # y: stores
    "lora_dy_kernel": ((), ("ds_ptr", "db_ptr", "dbias_ptr")),  # dB, dbias atomics; dS atomics when split
    "lora_dx_kernel": ((), ()),  # dX: stores
    "lora_da_kernel": ((), ("da_ptr",)),  # dA atomics when split
    "lora_up_add_kernel": (("y_ptr",), ()),  # y += s·S Bᵀ in place
    "lora_dx_add_kernel": (("dx_ptr",), ()),  # dX += m ⊙ (dS A) in place
    "lora_fwd_4bit_kernel": ((), ()),  # y: stores
    "lora_dx_4bit_kernel": ((), ()),  # dX: stores
    "dequantize_4bit_kernel": ((), ()),  # W: stores (one config: never benchmarked on a GPU either)
    "dora_norm_kernel": ((), ()),  # ‖W + s·B A‖²: stores (a K split's partials, each in its own row)
    "dora_down_kernel": ((), ()),  # S, x_d: stores
    "dora_fwd_kernel": ((), ()),  # y, P: stores
    "dora_dy_kernel": ((), ("ds_ptr", "db_ptr", "dbias_ptr", "dmag_ptr")),  # atomics (dS when split); G: stores
    "dora_dx_kernel": ((), ()),  # dX: stores
    "multi_lora_down_kernel": ((), ()),  # packed S (or its split-K slices): stores
    "multi_lora_fwd_kernel": ((), ()),  # y: stores
    "multi_lora_up_add_kernel": (("y_ptr",), ()),  # y += s_i·S_i B_iᵀ (+ own bias − base bias) in place
    "multi_lora_dy_kernel": ((), ("ds_ptr", "db_ptr", "dbias_ptr")),  # dB, per-segment dbias atomics; dS when split
    "multi_lora_dx_kernel": ((), ()),  # dX: stores
    "multi_lora_dx_add_kernel": (("dx_ptr",), ()),  # dX += m_i ⊙ (dS_i A_i) in place
    "multi_lora_da_kernel": ((), ("da_ptr",)),  # dA atomics when split
    "multi_lora_fwd_4bit_kernel": ((), ()),  # y: stores
    "multi_lora_dx_4bit_kernel": ((), ()),  # dX: stores
}


# --------------------------------------------------------------------------------------------------------- layers
def _rnd(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)


def _dense_layer(p: float, bias_trained: bool, use_dora: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = LoRALinear(K, N, r=R, lora_alpha=2 * R, lora_dropout=p, init_lora_weights=False, use_dora=use_dora,
                       device=DEVICE)
    with torch.no_grad():  # B as large as W's entries: the rank-r term counts as much as the base product
        layer.lora_B.copy_(_rnd(N, R, gen=gen))
        if use_dora:  # g ≠ 1: every DoRA term counts
            layer.lora_magnitude_vector.mul_(0.5 + torch.rand(N, generator=gen).to(DEVICE))
    layer.bias.requires_grad_(bias_trained)
    return layer


def _bnb_layer(bits: int, p: float, bias_trained: bool) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(K4, N)
    if bits == 4:
        base = bnb.nn.Linear4bit(K4, N, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    else:
        base = bnb.nn.Linear8bitLt(K4, N, has_fp16_weights=False, threshold=0.0)
    base.load_state_dict(dense.state_dict())
    layer = LoRALinear.from_linear(base.to(DEVICE), r=R, lora_alpha=2 * R, lora_dropout=p, init_lora_weights=False)
    layer.base_layer.bias.requires_grad_(bias_trained)
    return layer


def _call(layer: nn.Module) -> dict[str, torch.Tensor]:
    """y and every gradient (x and the trainable parameters, the base's bias named "bias") of one forward and backward,
    the dropout seed fixed."""
    gen = torch.Generator().manual_seed(1)
    x = _rnd(M, layer.in_features, gen=gen).requires_grad_()
    grad_out = _rnd(M, N, gen=gen)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)  # the layer draws its dropout seed from the default generator
    y = layer(x)
    y.backward(grad_out)
    return {"y": y.detach(), "x": x.grad,
            **{name.removeprefix("base_layer."): t.grad for name, t in layer.named_parameters() if t.requires_grad}}


def _names(bias_trained: bool, magnitude_trained: bool = False) -> set[str]:
    return {"y", "x", "lora_A", "lora_B"} | ({"bias"} if bias_trained else set()) | (
        {"lora_magnitude_vector"} if magnitude_trained else set())


def _diffs(got: dict, want: dict, rtol: float = 0.0) -> dict[str, str]:
    """The results that differ by more than ``rtol`` times their largest value (0: any difference)."""
    out = {}
    for name in want:
        d, scale = (got[name].double() - want[name].double()).abs().max().item(), want[name].abs().max().item()
        if d > rtol * scale:
            out[name] = f"max |Δ| {d:.3g} (values up to {scale:.3g})"
    return out


def check_first_call(layer: nn.Module, fwd: set[str], bwd: set[str], names: set[str], harness, mode: str,
                     winner: str = "first", rtol: float = 0.0) -> None:
    """A normal call, then the same call as a first call under GPU-like autotuning: the same output and gradients (bit
    for bit when the kernels' own configs win; within ``rtol`` of each result's largest value when ``winner="last"``
    launches other tiles, which sum in another order), and exactly the path's autotuned kernels benchmarked (the
    forward's in the forward)."""
    want = _call(layer)
    assert set(want) == names, sorted(want)
    for name, value in want.items():
        assert value.abs().max() > 0, f"{name}: no signal to compare"
    tuner = harness(mode=mode, winner=winner)
    real_forward = type(layer).forward

    def forward_then_check(self, x):  # the forward's kernels benchmarked before backward runs
        y = real_forward(self, x)
        tuner.assert_benchmarked(fwd)
        return y

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(layer), "forward", forward_then_check)
        got = _call(layer)
    tuner.assert_benchmarked(fwd | bwd)
    assert set(got) == names, sorted(got)
    bad = _diffs(got, want, rtol)
    assert not bad, f"the first call under GPU-like autotuning ({mode}) differs from a normal call: {bad}"


# ----------------------------------------------------------------------------------------------- the public paths
# Every path with dropout off and a trained bias, then on with a frozen one; each with the two modes in turn.
LORA_CASES = [(0.0, True, "all"), (0.3, False, "one")]
PATH_4BIT = {"fused": "4bit-fused", "composed": "composed"}


@pytest.mark.parametrize(("p", "bias_trained", "mode"), LORA_CASES)
@pytest.mark.parametrize("gemm", ["fused", "composed"])
def test_dense_first_call(gemm, p, bias_trained, mode, autotune_harness, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    check_first_call(_dense_layer(p, bias_trained), LORA_FWD[gemm], LORA_BWD[gemm], _names(bias_trained),
                     autotune_harness, mode)


@pytest.mark.parametrize(("p", "bias_trained", "mode"), LORA_CASES)
@pytest.mark.parametrize("gemm", ["fused", "composed"])
def test_4bit_first_call(gemm, p, bias_trained, mode, autotune_harness, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    path = PATH_4BIT[gemm]
    check_first_call(_bnb_layer(4, p, bias_trained), LORA_FWD[path], LORA_BWD[path], _names(bias_trained),
                     autotune_harness, mode)


@pytest.mark.parametrize(("p", "bias_trained", "mode"), LORA_CASES)
def test_8bit_first_call(p, bias_trained, mode, autotune_harness, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")  # an 8-bit base takes the composed path
    check_first_call(_bnb_layer(8, p, bias_trained), LORA_FWD["composed"], LORA_BWD["composed"], _names(bias_trained),
                     autotune_harness, mode)


# (dropout p, magnitude trained, bias trained, mode)
DORA_CASES = [(0.0, True, True, "all"), (0.0, False, False, "one"), (0.3, True, False, "one"),
              (0.3, False, True, "all")]


@pytest.mark.parametrize(("p", "magnitude_trained", "bias_trained", "mode"), DORA_CASES)
def test_dora_first_call(p, magnitude_trained, bias_trained, mode, autotune_harness, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    layer = _dense_layer(p, bias_trained, use_dora=True)
    layer.lora_magnitude_vector.requires_grad_(magnitude_trained)
    check_first_call(layer, DORA_FWD[p > 0], DORA_BWD[p > 0], _names(bias_trained, magnitude_trained),
                     autotune_harness, mode)


# --------------------------------------------------------------- split reductions and the one-config kernel, directly
# What a GPU launch picks to fill its SMs (the launchers' split factors are 1 on CPU): atomics from several programs
# into one zeroed element (the norm: partial sums in a row per slice). Launched as the launchers do (fused_lora's
# lora_triton / dora_triton), fp32 throughout.
def _kernel(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"fused_lora.kernels.{module}"), name)


def _f32(*shape, seed):
    return _rnd(*shape, gen=torch.Generator().manual_seed(seed))


def _zeros(*shape):
    return torch.zeros(shape, device=DEVICE, dtype=torch.float32)


LORA_DOT = dict(LORA_DOT=tl.float32, LORA_PREC="tf32x3", WIDE=False, BLOCK_R=16)
ARCH = 0  # the kernels' ARCH argument under the interpreter (triton_launch.arch)


def _m_bucket(m: int) -> int:
    from fused_lora.kernels.configs import m_bucket

    return m_bucket(m)


def _lora_dy_split():
    dy, b, s = _f32(M, N, seed=1), _f32(N, R, seed=2), _f32(M, R, seed=3)
    ds, db, dbias = _zeros(M, R), _zeros(N, R), _zeros(N)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, 16), 3)  # noqa: E731
    _kernel("lora_backward", "lora_dy_kernel")[grid](
        dy, b, s, ds, db, dbias, M, N, R, _m_bucket(M), *dy.stride(), *b.stride(), *s.stride(), *ds.stride(),
        *db.stride(), 0.5, ARCH, DS_ATOMIC=True, HAS_DBIAS=True, NEED_DS=True, NEED_DB=True, **LORA_DOT)
    return {"ds": ds, "db": db, "dbias": dbias}


def _lora_da_split():
    ds, x, da = _f32(M, R, seed=4), _f32(M, K, seed=5), _zeros(R, K)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, 16), 2)  # noqa: E731
    _kernel("lora_backward", "lora_da_kernel")[grid](
        ds, x, da, M, K, R, _m_bucket(M), *ds.stride(), *x.stride(), *da.stride(),
        torch.tensor([77], device=DEVICE), 0.3, 1 / 0.7, ARCH,
        DA_ATOMIC=True, HAS_DROPOUT=True, **LORA_DOT)
    return {"da": da}


def _dora_norm_split():
    w, a, b, sq = _f32(N, K, seed=6), _f32(R, K, seed=7), _f32(N, R, seed=8), _zeros(3, N)  # a row per K slice
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), 3)  # noqa: E731
    _kernel("dora", "dora_norm_kernel")[grid](
        w, a, b, sq, N, K, R, w.stride(1), w.stride(0), *a.stride(), *b.stride(), 0.5, ARCH, ROOT=False, **LORA_DOT)
    return {"sq": sq}


def _dora_dy_split():
    dy, b, s, P = _f32(M, N, seed=9), _f32(N, R, seed=10), _f32(M, R, seed=11), _f32(M, N, seed=12)
    sq, mag = 1 + _f32(N, seed=13).abs(), _f32(N, seed=14)
    ds, db, dbias, dmag = _zeros(M, R), _zeros(N, R), _zeros(N), _zeros(N)
    g = torch.empty((M, N), device=DEVICE)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, 16), 3)  # noqa: E731
    _kernel("dora", "dora_dy_kernel")[grid](
        dy, b, s, P, sq, mag, ds, db, dbias, dmag, g, M, N, R, _m_bucket(M), *dy.stride(), *b.stride(), *s.stride(),
        *P.stride(), mag.stride(0), *ds.stride(), *db.stride(), *g.stride(), 0.5, ARCH,
        DS_ATOMIC=True, HAS_DBIAS=True, NEED_DS=True, NEED_DB=True, NEED_DMAG=True, WRITE_G=True, G_MINUS_ONE=True,
        **LORA_DOT)
    return {"ds": ds, "db": db, "dbias": dbias, "dmag": dmag, "g": g}


def _dequantize_4bit():
    layer = _bnb_layer(4, 0.0, False).base_layer
    weight, state = layer.weight, layer.weight.quant_state
    out = torch.empty((N, K4), device=DEVICE, dtype=state.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K4, meta["BLOCK_K"]))  # noqa: E731
    _kernel("lora_4bit", "dequantize_4bit_kernel")[grid](
        weight.data.contiguous().reshape(-1).view(torch.uint8), state.absmax, state.code.float(), state.state2.absmax,
        state.state2.code.float(), torch.tensor([float(state.offset)], device=DEVICE), out, N, K4, ARCH,
        NESTED=True, QBLOCK_LOG2=state.blocksize.bit_length() - 1,
        QBLOCK2_LOG2=state.state2.blocksize.bit_length() - 1, ALIGNED=True, WIDE=False, KN=False)
    return {"w": out}


DIRECT = {"lora_dy_kernel": _lora_dy_split, "lora_da_kernel": _lora_da_split, "dora_norm_kernel": _dora_norm_split,
          "dora_dy_kernel": _dora_dy_split, "dequantize_4bit_kernel": _dequantize_4bit}


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("kernel", sorted(DIRECT))
def test_direct_launch_first_call(kernel, mode, autotune_harness):
    want = DIRECT[kernel]()
    for name, value in want.items():
        assert value.abs().max() > 0, f"{name}: no signal to compare"
    tuner = autotune_harness(mode=mode)
    got = DIRECT[kernel]()
    tuner.assert_benchmarked({kernel})
    bad = _diffs(got, want)
    assert not bad, f"{kernel}: the first launch under GPU-like autotuning ({mode}) differs from a normal one: {bad}"


# ------------------------------------------------------------------------------------------------ the harness itself
def test_every_autotuned_kernel_is_covered_and_protected():
    """The harness finds exactly the package's autotuned kernels, the tests above benchmark each of them, and each
    declares the protection of the audit (PROTECTION)."""
    tuners = autotuned_kernels()
    assert set(tuners) == AUTOTUNED
    covered = set().union(*LORA_FWD.values(), *LORA_BWD.values(), *DORA_FWD.values(), *DORA_BWD.values(), DIRECT,
                          *MULTI_FWD.values(), *MULTI_BWD.values(), MULTI_DIRECT)
    assert covered == AUTOTUNED
    assert set(PROTECTION) == AUTOTUNED
    for name, tuner in tuners.items():
        restore, reset = PROTECTION[name]
        assert (tuple(tuner.restore_value), tuple(tuner.reset_to_zero)) == (restore, reset), name


def test_harness_restores_the_autotuners_and_fails_when_nothing_ran():
    tuners = autotuned_kernels()
    before = {name: dict(vars(t)) for name, t in tuners.items()}
    with gpu_like_autotuning(mode="one") as tuner:
        assert all(len(t.configs) == 3 and t.cache == {} for t in tuners.values())
        tuner.assert_benchmarked(set())
        with pytest.raises(AssertionError, match="benchmarked"):
            tuner.assert_benchmarked({"lora_up_add_kernel"})  # nothing ran: the harness says so
        DIRECT["dora_norm_kernel"]()
        tuner.assert_benchmarked({"dora_norm_kernel"})
        assert tuner.bench_calls["dora_norm_kernel"] == 2 and tuner.bench_runs["dora_norm_kernel"] == 4
        DIRECT["dora_norm_kernel"]()  # the same key: cached, no second benchmark
        assert tuner.bench_calls["dora_norm_kernel"] == 2 and tuner.launches["dora_norm_kernel"] == 6
        tuner.reset()
        tuner.assert_benchmarked(set())
    after = {name: dict(vars(t)) for name, t in tuners.items()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
        assert all(after[name][k] is before[name][k] for k in before[name]), name


# fp32 sums in another order (the doubled tiles): measured 1-2e-7 of each result's largest value, where a benchmark
# run left in a result adds a whole rank-r term (several times the largest value).
VARIANT_RTOL = 2e-6


@pytest.mark.parametrize(("gemm", "use_dora"), [("fused", False), ("composed", False), ("fused", True)])
def test_first_call_launching_another_config(gemm, use_dora, autotune_harness, monkeypatch):
    """The benchmarks' last config (doubled tiles) launched for real: the zeroed and restored buffers are right for a
    launch that is not the kernel's own config, and the variant computes the same result."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    layer = _dense_layer(0.3, True, use_dora=use_dora)
    fwd, bwd = (DORA_FWD[True], DORA_BWD[True]) if use_dora else (LORA_FWD[gemm], LORA_BWD[gemm])
    check_first_call(layer, fwd, bwd, _names(True, use_dora), autotune_harness, "all", "last", VARIANT_RTOL)


# ------------------------------------------------------------------------------------------ two GPU kinds, one process
def test_every_autotuner_keys_on_the_arch():
    for name, tuner in autotuned_kernels().items():
        assert "ARCH" in tuner.keys, name
        assert "ARCH" in tuner.arg_names, name


@pytest.mark.parametrize(("use_dora", "gemm"), [(False, "fused"), (False, "composed"), (True, "fused")])
def test_each_gpu_kind_is_tuned_apart(use_dora, gemm, autotune_harness, monkeypatch):
    """One process, the same layer and call on an sm_80 device, then on an sm_90 one (``hardware.device_capability``
    stands in for the two GPUs): every kernel of the path prunes and benchmarks its configs again for the second kind
    and its autotuner keeps one cache entry per kind, so a config tuned on one is never launched on the other. Before
    the ``ARCH`` key the second call found the first one's entry: each kernel was pruned and benchmarked once."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", gemm)
    layer = _dense_layer(0.3, True, use_dora=use_dora)
    kernels = (DORA_FWD[True] | DORA_BWD[True]) if use_dora else (LORA_FWD[gemm] | LORA_BWD[gemm])
    tuner = autotune_harness(mode="all")
    results = []
    for capability in ((8, 0), (9, 0)):
        monkeypatch.setattr(hardware, "device_capability", lambda device, c=capability: c)
        monkeypatch.setattr(triton_launch, "_arches", {})  # the launchers keep a device's arch: this one "changed"
        results.append(_call(layer))
    tuner.assert_benchmarked(kernels)
    for name in kernels:
        assert tuner.pruned[name] == [80, 90], (name, tuner.pruned[name])
        assert tuner.bench_calls[name] == 2 * len(tuner.tuners[name].configs), name
        archs = {dict(zip(tuner.tuners[name].keys, key, strict=False))["ARCH"] for key in tuner.tuners[name].cache}
        assert len(tuner.tuners[name].cache) == 2 and archs == {80, 90}, (name, list(tuner.tuners[name].cache))
    assert not _diffs(results[1], results[0])  # the same configs won on both: the same bits


def test_pruning_reads_the_launch_arch():
    """``configs.by_dtype`` takes the GPU kind from the launch's ``ARCH`` argument (positional or by keyword), not from
    torch: here the tensors are on the CPU. A 128×128×64 forward tile with rank-64 bf16 adapters needs 144 KiB of
    shared memory: excluded on sm_86 (99 KiB), kept on sm_90."""
    from fused_lora.kernels import configs

    wide = configs.cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    small = configs.cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    prune = configs.by_dtype("x_ptr", [small], kernel="lora_fwd_kernel")
    x = torch.empty(2, 2, dtype=torch.bfloat16)
    half_r64 = dict(LORA_DOT=tl.bfloat16, BLOCK_R=64)
    assert wide not in prune([wide, small], {"x_ptr": x, "ARCH": 86}, **half_r64)
    assert prune([wide, small], {"x_ptr": x}, ARCH=90, **half_r64)[0] is wide


# ------------------------------------------------------------------------------------- several adapters on one base
# The segmented kernels (kernels/multi_lora.py, multi_lora_4bit.py) through their passes (fused_lora/backends/
# multi_triton.py, multi_bnb4_triton.py): three adapters on odd segments, one empty, dropout on two, an own bias beside
# the base's (on the 4-bit composed path it comes in with the in-place add: its HAS_DELTA form).
MULTI_FWD = {"fused": {"multi_lora_down_kernel", "multi_lora_fwd_kernel"},
             "composed": {"multi_lora_down_kernel", "multi_lora_up_add_kernel"},
             "4bit-fused": {"multi_lora_down_kernel", "multi_lora_fwd_4bit_kernel"},
             "4bit-composed": {"multi_lora_down_kernel", "multi_lora_up_add_kernel"}}
MULTI_BWD = {"fused": {"multi_lora_dy_kernel", "multi_lora_dx_kernel", "multi_lora_da_kernel"},
             "composed": {"multi_lora_dy_kernel", "multi_lora_dx_add_kernel", "multi_lora_da_kernel"},
             "4bit-fused": {"multi_lora_dy_kernel", "multi_lora_dx_4bit_kernel", "multi_lora_da_kernel"},
             "4bit-composed": {"multi_lora_dy_kernel", "multi_lora_dx_add_kernel", "multi_lora_da_kernel"}}
MULTI_LENGTHS, MULTI_RANKS, MULTI_PS = (9, 0, 28), (3, 5, 2), (0.3, 0.0, 0.2)


def _multi_problem(path: str):
    from fused_lora import bases
    from fused_lora.backends.dense_base import DenseBase
    from fused_lora.segments import MultiAdapters

    gen = torch.Generator().manual_seed(3)
    k = K4 if path.startswith("4bit") else K
    if path.startswith("4bit"):
        base = bases.base_of(_bnb_layer(4, 0.0, True).base_layer)[1]
        weight, bias = None, base.layer.bias
    else:
        weight, bias = _rnd(N, k, gen=gen, scale=k**-0.5), _rnd(N, gen=gen)
        base = DenseBase(weight, bias, "linear")
    adapters = MultiAdapters([_rnd(r, k, gen=gen, scale=k**-0.5) for r in MULTI_RANKS],
                             [_rnd(N, r, gen=gen) for r in MULTI_RANKS], [2.0 / r for r in MULTI_RANKS], MULTI_PS,
                             [None, None, _rnd(N, gen=gen)])
    x, dy = _rnd(sum(MULTI_LENGTHS), k, gen=gen), _rnd(sum(MULTI_LENGTHS), N, gen=gen)
    return base, weight, bias, adapters, adapters.segments(MULTI_LENGTHS), x, dy


def _multi_call(path: str, problem, after_forward=None) -> dict[str, torch.Tensor]:
    """y, S and every gradient of one forward and backward of ``path``; ``after_forward()`` runs between the two."""
    from fused_lora.backends import multi_bnb4_triton, multi_triton

    base, weight, bias, adapters, segments, x, dy = problem
    seeds = [SEED, SEED + 1, SEED + 2]
    needs = (True, True, True, True)
    if path == "fused":
        y, s = multi_triton.forward(x, weight, bias, adapters, segments, seeds, "linear")
    elif path == "4bit-fused":
        y, s = multi_bnb4_triton.fused_forward(x, base, bias, adapters, segments, seeds)
    else:
        y, s = multi_triton.composed_forward(x, base, adapters, segments, seeds)
    if after_forward is not None:
        after_forward()
    if path == "fused":
        grads = multi_triton.backward(dy, x, weight, adapters, segments, seeds, s, "linear", *needs)
    elif path == "4bit-fused":
        grads = multi_bnb4_triton.fused_backward(dy, x, base, adapters, segments, seeds, s, *needs)
    else:
        grads = multi_triton.composed_backward(dy, x, base, adapters, segments, seeds, s, *needs)
    dx, das, dbs, dbias = grads
    out = {"y": y, "s": s, "dx": dx, "dbias": dbias}
    for i, n in enumerate(MULTI_LENGTHS):
        if n:  # an empty segment's gradients are zeros: no signal to compare
            out[f"dA{i}"], out[f"dB{i}"] = das[i], dbs[i]
    return out


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("path", sorted(MULTI_FWD))
def test_multi_first_call(path, mode, autotune_harness):
    problem = _multi_problem(path)
    want = _multi_call(path, problem)
    for name, value in want.items():
        assert value.abs().max() > 0, f"{name}: no signal to compare"
    tuner = autotune_harness(mode=mode)
    got = _multi_call(path, problem, after_forward=lambda: tuner.assert_benchmarked(MULTI_FWD[path]))
    tuner.assert_benchmarked(MULTI_FWD[path] | MULTI_BWD[path])
    bad = _diffs(got, want)
    assert not bad, f"the first call under GPU-like autotuning ({mode}) differs from a normal call: {bad}"


def test_multi_first_call_launching_another_config(autotune_harness):
    """The doubled tiles launched for real: row tiles of 64 rows, which the segments' tiles follow (the grids' bound on
    them holds for any tile height), and the protected buffers right for a config that is not the kernel's own."""
    problem = _multi_problem("fused")
    want = _multi_call("fused", problem)
    tuner = autotune_harness(mode="all", winner="last")
    got = _multi_call("fused", problem)
    tuner.assert_benchmarked(MULTI_FWD["fused"] | MULTI_BWD["fused"])
    bad = _diffs(got, want, VARIANT_RTOL)
    assert not bad, f"another config differs: {bad}"


def _multi_dy_split():
    from fused_lora.backends import multi_triton

    _, _, _, adapters, segments, x, dy = _multi_problem("fused")
    t = multi_triton.tables(segments, adapters, [1, 2, 3], DEVICE)
    s = multi_triton.multi_lora_down(x, adapters.A_cat(), t)
    ds, db, dbias = multi_triton.multi_lora_dy_pass(dy, adapters.B_cat(), s, t, True, True, True, split_n=3)
    return {"ds": ds, "db": db, "dbias": dbias}


def _multi_da_split():
    from fused_lora.backends import multi_triton

    _, _, _, adapters, segments, x, _ = _multi_problem("fused")
    t = multi_triton.tables(segments, adapters, [1, 2, 3], DEVICE)
    ds = _rnd(segments.s_numel, gen=torch.Generator().manual_seed(9))
    return {"da": multi_triton.multi_lora_da(ds, x, adapters.A_cat(), t, split_m=2)}


MULTI_DIRECT = {"multi_lora_dy_kernel": _multi_dy_split, "multi_lora_da_kernel": _multi_da_split}


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("kernel", sorted(MULTI_DIRECT))
def test_multi_split_first_call(kernel, mode, autotune_harness):
    """The split reductions (atomics from several programs; the launchers split only on a GPU), launched directly."""
    want = MULTI_DIRECT[kernel]()
    tuner = autotune_harness(mode=mode)
    got = MULTI_DIRECT[kernel]()
    assert kernel in tuner.benchmarked
    bad = _diffs(got, want)
    assert not bad, f"{kernel}: the first launch under GPU-like autotuning ({mode}) differs from a normal one: {bad}"
