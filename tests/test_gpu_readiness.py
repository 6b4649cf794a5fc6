"""What a real GPU would hit, checked where a CPU can show it: strided bias and other pointers, PyTorch's
new TF32 API, launches on the tensors' device, explicit buffer dtypes, no recompiles from call-to-call values,
64-bit offsets, and the dropout mask's documented Philox layout.

The kernels run through Triton's interpreter here (conftest.py). Each test fails on the code before its fix.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import BACKENDS, DEVICE, legacy_tf32_flag
from test_functional import make_problem, run_and_check

from fused_lora import dropout_mask, fused_lora_linear, lora_linear_ref
from fused_lora.autograd import driver
from fused_lora.backends import dropout_triton, triton_launch
from fused_lora.kernels import catalog, configs

RUNTIME_VALUES, m_bucket = configs.RUNTIME_VALUES, configs.m_bucket

# ------------------------------------------------------------------------------------------------ pointers


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_and_adapters(backend):
    """A bias that is every other element of a buffer (before: the kernel read it at stride 1, errors ~2.4), and
    adapters that are transposed and strided views."""
    x, weight, _, lora_A, lora_B = make_problem((31,), 40, 36, 6, torch.float32, "linear", False, device=DEVICE)
    bias = torch.randn(2 * 36).to(DEVICE)[::2].requires_grad_()
    lora_A = (torch.randn(40, 12) * 40**-0.5).to(DEVICE)[:, ::2].t().requires_grad_()
    lora_B = (torch.randn(72, 6) * 6**-0.5).to(DEVICE)[::2].requires_grad_()
    assert bias.stride() == (2,) and lora_A.stride() == (2, 12) and lora_B.stride() == (12, 1)
    run_and_check(x, weight, bias, lora_A, lora_B, scaling=1.5, p=0.2, layout="linear", backend=backend)


# -------------------------------------------------------------------------------------------------- TF32


@contextlib.contextmanager
def fp32_precision(value: str):
    matmul_before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "none"  # inherit, as in a fresh process
        torch.backends.fp32_precision = value
        yield
    finally:
        torch.backends.fp32_precision = "none"  # the legacy flag is readable again
        torch.backends.cuda.matmul.fp32_precision = matmul_before


@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_new_tf32_api_does_not_crash(value):
    """``TrainingArguments(tf32=True)`` sets ``torch.backends.fp32_precision``; reading the legacy
    ``allow_tf32`` then raises. Every call with fp32 adapters or fp32 inputs asks for the precision."""
    with fp32_precision(value):
        assert triton_launch.dot_precision(torch.float32) == ("tf32" if value == "tf32" else "tf32x3")
        problem = make_problem((2, 9), 24, 20, 4, torch.bfloat16, "linear", True, adapter_dtype=torch.float32,
                               device=DEVICE)
        run_and_check(*problem, scaling=2.0, p=0.1, layout="linear", backend="triton")


def test_legacy_tf32_flag_still_followed():
    for flag, want in ((True, "tf32"), (False, "tf32x3")):
        with legacy_tf32_flag(flag):
            assert triton_launch.dot_precision(torch.float32) == want


# ------------------------------------------------------------------------------------------------ devices


def test_launches_are_guarded_with_the_tensors_device(monkeypatch):
    """Triton launches on the *current* device: every entry point must make the tensors' device current."""
    seen = []
    real = triton_launch.on_device

    def recording(device):
        seen.append(device)
        return real(device)

    for module in (driver, dropout_triton):  # where the launches are entered
        monkeypatch.setattr(module, "on_device", recording)
    x, weight, bias, lora_A, lora_B = make_problem((5,), 16, 12, 2, torch.float32, "linear", True, device=DEVICE)
    fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.3, dropout_seed=3, backend="triton").sum().backward()
    dropout_mask(3, (5, 16), 0.3, x.device, backend="triton")
    assert len(seen) == 3 and all(d == x.device for d in seen)  # forward, backward, mask


def test_device_guard_targets_the_tensor_device_index():
    guard = triton_launch.on_device(torch.device("cuda", 1))  # not entered: cuda:1 need not exist
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_launch.on_device(torch.device("cpu")), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------- buffer dtypes


def test_default_dtype_does_not_change_results():
    """Every buffer the launchers make has an explicit dtype (dS took the default dtype before)."""
    problem = make_problem((23,), 30, 26, 5, torch.float32, "conv1d", True, seed=4, device=DEVICE)

    def run():
        x, weight, bias, lora_A, lora_B = (t.detach().clone().requires_grad_(t.requires_grad) for t in problem)
        y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.2, weight_layout="conv1d", dropout_seed=9,
                              backend="triton")
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad, lora_A.grad, lora_B.grad, bias.grad]

    want = run()
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        got = run()
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- recompiles


def _jit_function(kernel):
    """Through the autotuner to the jit function (an InterpretedFunction under TRITON_INTERPRET=1)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


KERNELS = catalog.KERNELS


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_call_to_call_values_are_not_specialized(name):
    """M, the M bucket and the dropout seed change every call: the JIT must not compile a variant per value
    (1 and multiples of 16 would). The launch-signature proof with Triton's own specialization rule is in
    test_compile_targets.py; here: the kernels declare it, and no split factor is a constexpr or a tuning key."""
    kernel = KERNELS[name]
    fn = _jit_function(kernel)
    runtime = [a for a in fn.arg_names if a in RUNTIME_VALUES]  # (none in a per-layer kernel like dequantization)
    assert set(runtime) <= set(_do_not_specialize(fn)), (name, runtime)
    assert not {"SPLIT_N", "SPLIT_M"} & set(fn.arg_names)
    assert not {"SPLIT_N", "SPLIT_M"} & set(getattr(kernel, "keys", []))


def _do_not_specialize(fn) -> list[str]:
    """Names the JIT leaves unspecialized (``triton.jit(do_not_specialize=...)``; the interpreter keeps the
    decorator's arguments in ``kwargs``)."""
    names = fn.do_not_specialize if hasattr(fn, "do_not_specialize") else fn.kwargs.get("do_not_specialize") or []
    return [fn.arg_names[n] if isinstance(n, int) else n for n in names]


def test_m_buckets_are_few():
    assert len({m_bucket(m) for m in range(1, 200_000, 7)}) == 4
    assert m_bucket(1) == m_bucket(256) and m_bucket(257) == m_bucket(1024) and m_bucket(5000) == m_bucket(10**6)


# ------------------------------------------------------------------------------------------ 64-bit offsets


def _virtual(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A huge allocation whose untouched pages the OS never commits: views into it reach offsets past 2³¹ while
    only the elements written cost memory (the interpreter hands CPU storages to the kernels as they are). On a
    GPU it is a real allocation (6.4 GB here)."""
    return torch.empty(numel, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_offsets_past_2_31_elements(layout):
    """x, dY, W, A and B as views whose element offsets pass 2³¹ (column-major x of a long sequence, a 128k-vocab
    weight). Before: ``ks * stride_wk`` and friends were int32 products and wrapped around."""
    M, K, N, r, big = 40, 48, 40, 4, 2**26 + 5
    stride = big  # > 2³¹ / 48: index * stride passes 2³¹ within each tensor
    buf = _virtual(stride * max(K, N) + 6 * 64, torch.float16)
    gen = torch.Generator().manual_seed(0)

    def view(rows, cols, slot, scale):  # rows contiguous, columns `stride` apart; slot: a private row range
        t = buf.as_strided((rows, cols), (1, stride), storage_offset=slot * 64)
        t.copy_((torch.randn(rows, cols, generator=gen) * scale).half())
        return t

    x = view(M, K, 0, 1.0).requires_grad_()
    weight = view(N, K, 1, K**-0.5) if layout == "linear" else view(K, N, 1, K**-0.5)
    lora_A = view(r, K, 2, K**-0.5).requires_grad_()
    lora_B = view(N, r, 3, r**-0.5).requires_grad_()
    dy = view(M, N, 4, 1.0)
    assert max(K * x.stride(1), K * lora_A.stride(1), N * dy.stride(1)) > 2**31
    y = fused_lora_linear(x, weight, None, lora_A, lora_B, 2.0, 0.2, weight_layout=layout, dropout_seed=5,
                          backend="triton")
    y.backward(dy)
    mask = dropout_mask(5, (M, K), 0.2, DEVICE, backend="triton")
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    ref = lora_linear_ref(leaves[0], weight.double(), None, leaves[1], leaves[2], 2.0, weight_layout=layout,
                          dropout_mask=mask.double())
    ref.backward(dy.double())
    for name, got, want in (("y", y, ref), ("dx", x.grad, leaves[0].grad), ("dA", lora_A.grad, leaves[1].grad),
                            ("dB", lora_B.grad, leaves[2].grad)):
        err = (got.double() - want.detach()).abs().max().item()
        assert err < 2e-2 * max(1.0, want.abs().max().item()), (name, err)


def test_wide_offsets_only_where_needed():
    """int64 offsets cost registers (kernels/indexing.py): only launches reaching past 2³¹ elements get them."""
    meta = lambda *shape: torch.empty(shape, device="meta")
    assert not triton_launch.wide_offsets(meta(8192, 16384), meta(16384, 4096), meta(4096, 16))
    assert triton_launch.wide_offsets(meta(8192, 16384), meta(262144, 8192))  # a 256k-vocab head's weight
    assert triton_launch.wide_offsets(meta(64, 2**26)[:, :: 2**20])  # 64×64 elements, but 2³¹ apart
    assert triton_launch.wide_offsets(meta(2**31 // 4096 - 100, 4096))  # the tiles' overhang counts too


# ------------------------------------------------------------------------------------------- dropout lanes


def _philox4x32_10(key: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011), in Python integers."""
    m0, m1, w0, w1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key & mask, (key >> 32) & mask
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c3 ^ k1) & mask, p0 & mask
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return c0, c1, c2, c3


def _uniform(word: int) -> float:
    """``tl.random.uint_to_uniform_float`` for a 32-bit word."""
    signed = word - 2**32 if word >= 2**31 else word
    signed = -signed - 1 if signed < 0 else signed
    return signed * 4.6566127342e-10


def test_dropout_lanes_follow_the_documented_philox_layout():
    """kernels/dropout.py: column 4g+j of row i keeps when u >= p, u from Philox(seed, (g, i, 0, 0)) output
    r0, r2, r1, r3 for j = 0, 1, 2, 3."""
    seed, p, M, K = 987654321, 0.5, 3, 12
    got = dropout_mask(seed, (M, K), p, DEVICE, backend="triton") > 0
    lanes = (0, 2, 1, 3)
    for i in range(M):
        for col in range(K):
            words = _philox4x32_10(seed, (col // 4, i, 0, 0))
            assert bool(got[i, col]) == (_uniform(words[lanes[col % 4]]) >= p), (i, col)


def test_host_cdiv_and_next_power_of_2_are_tritons():
    """The launchers' plain host helpers (triton's are constexpr_function wrappers, slow on the host) give triton's
    values: grids, rank chunks and split factors do not move."""
    import triton

    for a in range(0, 300):
        assert triton_launch.next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 7, 16, 64, 128, 256):
            assert triton_launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in (2**31 - 1, 2**31, 2**31 + 1, 10**12):
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n)
        assert triton_launch.cdiv(n, 64) == triton.cdiv(n, 64)
