"""Which kernel variants ``compile_report.py`` compiles, and their launch arguments as Triton's JIT sees them.

A variant is one kernel with the constexprs and argument specialization a launcher in
``fused_lora/backends/`` really produce. Triton's JIT specializes a launch on more than the
constexprs: an int argument equal to 1 becomes the constant 1, an int or pointer divisible by 16 gets
``tt.divisibility = 16`` (vectorized, TMA/cp.async-able loads). So the weight layouts compile differently:
"linear" (N×K) has stride_wk == 1 and stride_wn == K, "conv1d" (K×N) the reverse, and a rank that is not a
multiple of 16 (r=8, PEFT's default) loses the alignment of every stride over the rank. ``specialize``
reproduces this with the JIT's own ``native_specialize_impl`` on the argument values of a transformer-shaped
problem: K, N multiples of 16 (real projections are), M = 1000 tokens (not a multiple of 16: the general
case; M only bounds masks along rows, never a contiguous axis), contiguous tensors, 16-byte aligned pointers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl


def _load_kernels():
    """``kernels/catalog.py`` without importing fused_lora (and torch): a triton-only venv can run this. The folder has
    no ``__init__.py`` (it must not shadow HF's ``kernels``): a package module is made for it by hand."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.machinery.ModuleSpec("fused_lora_kernels", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    return importlib.import_module("fused_lora_kernels.catalog")


kernels = _load_kernels()
configs = importlib.import_module("fused_lora_kernels.configs")
KERNELS = {name: getattr(kernels, name) for name in
           ("lora_down_kernel", "lora_fwd_kernel", "lora_dy_kernel", "lora_dx_kernel", "lora_da_kernel",
            "lora_up_add_kernel", "lora_dx_add_kernel",
            "lora_fwd_4bit_kernel", "lora_dx_4bit_kernel", "dequantize_4bit_kernel")}
GEMM_KERNELS = ("lora_fwd_kernel", "lora_dx_kernel",  # M×N×K base GEMMs; the other three are rank-r skinny
                "lora_fwd_4bit_kernel", "lora_dx_4bit_kernel")  # the same with W from 4-bit storage (QLoRA)
# QLoRA (kernels/lora_4bit.py, fused_lora/backends/bnb4_triton.py): W is bitsandbytes' packed 4-bit data (row-major,
# always the "linear" N×K layout) with its absmax (fp32, or uint8 with double quantization) and code tables. The GEMMs
# run where the dense GEMM kernels do (sm_80+); the elementwise dequantize kernel (merges) where the rank-r kernels do.
Q4_KERNELS = ("lora_fwd_4bit_kernel", "lora_dx_4bit_kernel", "dequantize_4bit_kernel")
Q4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' blocksizes
ADD_KERNELS = ("lora_up_add_kernel", "lora_dx_add_kernel")  # the composed path's in-place rank-r adds
# DoRA (kernels/dora.py, fused_lora/backends/dora_triton.py): launched where the fused base GEMM runs (sm_80+; Turing
# runs DoRA on the PyTorch path). dora_fwd/dora_dx are base GEMMs (two accumulators on each W tile with dropout); the
# norm reads W through either layout; down and dy are rank-r passes with BLOCK_R as triton_launch.rank_block.
DORA_KERNELS = ("dora_norm_kernel", "dora_down_kernel", "dora_fwd_kernel", "dora_dy_kernel", "dora_dx_kernel")
KERNELS.update({name: getattr(kernels, name) for name in DORA_KERNELS})
GEMM_KERNELS += ("dora_fwd_kernel", "dora_dx_kernel")
# Several adapters on one base (kernels/multi_lora.py, multi_lora_4bit.py, fused_lora/backends/multi_triton.py): each
# the segmented form of a single-adapter kernel, launched where that one is, with the same axes; the segment tables
# (int64 row starts / rank offsets / S offsets, fp32 scalings / p / 1/(1-p), int64 seeds) are extra pointers, S and dS
# are packed (no strides), A_cat / B_cat hold N_SEG adapters of rank r (their rank stride N_SEG·r).
SINGLE_OF = {"multi_lora_down_kernel": "lora_down_kernel", "multi_lora_fwd_kernel": "lora_fwd_kernel",
             "multi_lora_up_add_kernel": "lora_up_add_kernel", "multi_lora_dy_kernel": "lora_dy_kernel",
             "multi_lora_dx_kernel": "lora_dx_kernel", "multi_lora_dx_add_kernel": "lora_dx_add_kernel",
             "multi_lora_da_kernel": "lora_da_kernel", "multi_lora_fwd_4bit_kernel": "lora_fwd_4bit_kernel",
             "multi_lora_dx_4bit_kernel": "lora_dx_4bit_kernel"}
MULTI_KERNELS = tuple(SINGLE_OF)
KERNELS.update({name: getattr(kernels, name) for name in MULTI_KERNELS})
MULTI_Q4_GEMMS = ("multi_lora_fwd_4bit_kernel", "multi_lora_dx_4bit_kernel")
GEMM_KERNELS += ("multi_lora_fwd_kernel", "multi_lora_dx_kernel", *MULTI_Q4_GEMMS)
Q4_KERNELS += MULTI_Q4_GEMMS
ADD_KERNELS += ("multi_lora_up_add_kernel", "multi_lora_dx_add_kernel")
N_SEG = 3  # adapters of a multi-adapter variant (a runtime value: it only sets B_cat's and dB's rank stride)


def single_of(kernel: str) -> str:
    """The single-adapter kernel whose segmented form ``kernel`` is (itself when it is one)."""
    return SINGLE_OF.get(kernel, kernel)
TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
M, N, K = 1000, 2304, 2048


@dataclass(frozen=True)
class Variant:
    kernel: str
    base: str = "bf16"          # x, W, y, dY, dX
    adapter: str = "fp32"       # A, B: LoRALinear's default on a half base (as PEFT); else the base dtype
    layout: str = "linear"      # weight layout, only read by the GEMM kernels
    rank: int = 16              # → BLOCK_R = min(64, max(16, next_pow2(r))), and R's alignment
    dropout: bool = True        # HAS_DROPOUT (p > 0)
    bias: bool = True           # HAS_BIAS (forward), HAS_DBIAS (dy pass)
    split: int = 2              # SPLIT_N (dy pass), SPLIT_M (dA); 1 = plain store, > 1 = atomics; SPLIT_K of DoRA's
    #                             norm (1: the root stored, ROOT; > 1: partial sums)
    need: str = "ds+db"         # the dy pass's NEED_DS / NEED_DB
    tf32: bool = False          # torch.backends.cuda.matmul.allow_tf32: fp32 dots in TF32, else 3xTF32
    wide: bool = False          # WIDE: int64 offsets (a tensor of the launch spans >= 2³¹ elements)
    write_p: bool = True        # DoRA forward's WRITE_P (off: the magnitude frozen, P not stored; a subset of the code)
    # QLoRA kernels only (Q4_KERNELS): bitsandbytes' blocksize (QLoRA's 64), double quantization (QLoRA's
    # bnb_4bit_use_double_quant), the quant state's dtype (W_DTYPE; "" = the base dtype, as for a model loaded in its
    # compute dtype and quantized); the dequantize kernel writes W in ``base``.
    qblock: int = 64
    nested: bool = True
    wdtype: str = ""
    aligned: bool = True  # ALIGNED: K a multiple of the blocksize (every real model); False: the general path

    @property
    def q4_aligned(self) -> bool:
        return self.aligned and K % self.qblock == 0

    @property
    def dtypes(self) -> str:
        return f"{self.base}/{self.adapter}"

    def label(self) -> str:
        kernel = single_of(self.kernel)
        if kernel == "dequantize_4bit_kernel":
            return " ".join([self.base, f"bs{self.qblock}", "nested" if self.nested else "plain"]
                            + ([] if self.q4_aligned else ["unaligned"]) + (["wide"] if self.wide else []))
        parts = [self.dtypes]
        if kernel in GEMM_KERNELS or kernel == "dora_norm_kernel":
            parts.append(self.layout)
        parts.append(f"r{self.rank}")
        if kernel in ("lora_down_kernel", "lora_dx_kernel", "lora_da_kernel", "lora_dx_add_kernel",
                           "lora_dx_4bit_kernel", "dora_fwd_kernel", "dora_dy_kernel"):
            parts.append("drop" if self.dropout else "nodrop")
        if kernel in ("lora_fwd_kernel", "lora_dy_kernel", "lora_fwd_4bit_kernel", "dora_fwd_kernel",
                           "dora_dy_kernel") or self.kernel == "multi_lora_up_add_kernel":  # its own-bias deltas
            parts.append("bias" if self.bias else "nobias")
        if kernel in Q4_KERNELS:
            parts.append(f"W{self.wdtype or self.base} bs{self.qblock} {'nested' if self.nested else 'plain'}"
                         + ("" if self.q4_aligned else " unaligned"))
        if kernel in ("lora_dy_kernel", "lora_da_kernel", "dora_dy_kernel", "dora_norm_kernel"):
            parts.append(f"split{self.split}")
        if kernel in ("lora_dy_kernel", "dora_dy_kernel"):
            parts.append(self.need)
        if kernel == "dora_fwd_kernel" and not self.write_p:
            parts.append("noP")
        if self.tf32 and "fp32" in (self.base, self.adapter):
            parts.append("tf32")
        if self.wide:
            parts.append("wide")
        return " ".join(parts)


SKINNY_KERNELS = ("lora_down_kernel", "lora_dy_kernel", "lora_da_kernel",  # rank chunks spread over programs
                  "multi_lora_down_kernel", "multi_lora_dy_kernel", "multi_lora_da_kernel")


def block_r(r: int, adapter: str, kernel: str = "", arch: int = 90) -> int:
    """As ``triton_launch.skinny_rank_block`` for the skinny kernels (chunks of up to 64 for every adapter dtype) and
    ``triton_launch.rank_block`` for the others (16 for fp32 adapters), 16 everywhere on Turing (FMA dots);
    tests/test_compile_targets.py checks they agree."""
    if arch < 80 or (adapter == "fp32" and kernel not in SKINNY_KERNELS):
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


def precision(dtype: str, tf32: bool, arch: int = 90) -> str:
    """As ``triton_launch.dot_precision`` on a GPU of ``arch`` (checked by tests/test_compile_targets.py)."""
    if arch < 80:
        return "ieee"
    return ("tf32" if tf32 else "tf32x3") if dtype == "fp32" else "tf32"


class Ptr(str):
    """A pointer argument: its element type; always 16-byte aligned (fresh torch allocations are)."""

    def element_size(self) -> int:  # as torch.Tensor's, for the kernels' early_config_prune
        return 4 if self == "fp32" else 2


def launch_args(v: Variant, arch: int = 90) -> tuple[dict[str, object], dict[str, object]]:
    """(runtime arguments by name, constexprs) as the launchers in fused_lora/backends/ pass them for ``v`` on
    ``arch``: every kernel takes the target as its ``ARCH`` argument (triton_launch.arch), which its autotuner keys on
    and its config pruning reads."""
    args, constexprs = _launch_args(v, arch)
    return {**args, "ARCH": arch}, constexprs


def _launch_args(v: Variant, arch: int) -> tuple[dict[str, object], dict[str, object]]:
    R = v.rank
    base, ad, f32 = Ptr(v.base), Ptr(v.adapter), Ptr("fp32")
    wk, wn = (1, K) if v.layout == "linear" else (N, 1)  # triton_launch.weight_strides
    lora = {"LORA_DOT": TL[v.adapter], "LORA_PREC": precision(v.adapter, v.tf32, arch),
            "BLOCK_R": block_r(R, v.adapter, v.kernel, arch), "WIDE": v.wide}
    gemm = {"BASE_DOT": TL[v.base], "BASE_PREC": precision(v.base, v.tf32, arch), **lora}
    drop = {"seed_ptr": Ptr("i64"), "p": 0.1 if v.dropout else 0.0, "drop_scale": 1 / 0.9 if v.dropout else 1.0}
    bucket = triton.next_power_of_2(M)
    if v.kernel == "lora_down_kernel":
        args = dict(x_ptr=base, a_ptr=ad, s_ptr=f32, M=M, K=K, R=R, M_BUCKET=bucket, stride_xm=K, stride_xk=1,
                    stride_ar=K, stride_ak=1, stride_sm=R, stride_sr=1, stride_ss=M * R if v.split > 1 else 0, **drop)
        return args, {"HAS_DROPOUT": v.dropout, **lora}
    if v.kernel == "lora_fwd_kernel":
        args = dict(x_ptr=base, w_ptr=base, bias_ptr=base if v.bias else f32, s_ptr=f32, b_ptr=ad, y_ptr=base,
                    M=M, N=N, K=K, R=R, M_BUCKET=bucket, stride_xm=K, stride_xk=1, stride_wk=wk, stride_wn=wn,
                    stride_sm=R, stride_sr=1, stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1, stride_bias=1,
                    scaling=2.0)
        return args, {"HAS_BIAS": v.bias, **gemm}
    if v.kernel == "lora_dy_kernel":
        need_ds, need_db = "ds" in v.need, "db" in v.need
        # Buffers not needed are zeros(1, 1): strides (1, 1), specialized to the constant 1.
        args = dict(dy_ptr=base, b_ptr=ad, s_ptr=f32, ds_ptr=f32, db_ptr=f32, dbias_ptr=f32,
                    M=M, N=N, R=R, M_BUCKET=bucket, stride_dym=N, stride_dyn=1, stride_bn=R, stride_br=1,
                    stride_sm=R, stride_sr=1, stride_dsm=R if need_ds else 1, stride_dsr=1,
                    stride_dbn=R if need_db else 1, stride_dbr=1, scaling=2.0)
        return args, {"DS_ATOMIC": v.split > 1, "HAS_DBIAS": v.bias, "NEED_DS": need_ds, "NEED_DB": need_db, **lora}
    if v.kernel == "lora_dx_kernel":
        args = dict(dy_ptr=base, w_ptr=base, ds_ptr=f32, a_ptr=ad, dx_ptr=base, M=M, N=N, K=K, R=R,
                    M_BUCKET=bucket, stride_dym=N, stride_dyn=1, stride_wk=wk, stride_wn=wn, stride_dsm=R,
                    stride_dsr=1, stride_ar=K, stride_ak=1, stride_dxm=K, stride_dxk=1, **drop)
        return args, {"HAS_DROPOUT": v.dropout, **gemm}
    if v.kernel == "lora_da_kernel":
        args = dict(ds_ptr=f32, x_ptr=base, da_ptr=f32, M=M, K=K, R=R, M_BUCKET=bucket, stride_dsm=R, stride_dsr=1,
                    stride_xm=K, stride_xk=1, stride_dar=K, stride_dak=1, **drop)
        return args, {"DA_ATOMIC": v.split > 1, "HAS_DROPOUT": v.dropout, **lora}
    if v.kernel == "lora_up_add_kernel":
        args = dict(y_ptr=base, s_ptr=f32, b_ptr=ad, M=M, N=N, R=R, M_BUCKET=bucket, stride_ym=N, stride_yn=1,
                    stride_sm=R, stride_sr=1, stride_bn=R, stride_br=1, scaling=2.0)
        return args, lora
    if v.kernel == "lora_dx_add_kernel":
        args = dict(dx_ptr=base, ds_ptr=f32, a_ptr=ad, M=M, K=K, R=R, M_BUCKET=bucket, stride_dxm=K, stride_dxk=1,
                    stride_dsm=R, stride_dsr=1, stride_ar=K, stride_ak=1, **drop)
        return args, {"HAS_DROPOUT": v.dropout, **lora}
    if v.kernel in DORA_KERNELS:
        return _dora_launch_args(v, arch)
    if v.kernel in MULTI_KERNELS:
        return _multi_launch_args(v, arch)
    # QLoRA, as fused_lora/backends/bnb4_triton.py launches them: packed bytes, absmax (uint8 when nested), the
    # 16-entry code; absmax2/code2/offset are fp32 (triton_launch.unused's one fp32 element when not nested).
    u8 = Ptr("u8")
    quant = dict(w_ptr=u8, absmax_ptr=u8 if v.nested else f32, code_ptr=f32, absmax2_ptr=f32, code2_ptr=f32,
                 offset_ptr=f32)
    q4 = {"NESTED": v.nested, "QBLOCK_LOG2": v.qblock.bit_length() - 1, "QBLOCK2_LOG2": 8,  # state2: 256 blocks
          "ALIGNED": v.q4_aligned}
    if v.kernel == "lora_fwd_4bit_kernel":
        args = dict(x_ptr=base, **quant, bias_ptr=base if v.bias else f32, s_ptr=f32, b_ptr=ad, y_ptr=base,
                    M=M, N=N, K=K, R=R, M_BUCKET=bucket, stride_xm=K, stride_xk=1, stride_sm=R, stride_sr=1,
                    stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1, stride_bias=1, scaling=2.0)
        return args, {"HAS_BIAS": v.bias, "W_DTYPE": TL[v.wdtype or v.base], **q4, **gemm}
    if v.kernel == "lora_dx_4bit_kernel":
        args = dict(dy_ptr=base, **quant, ds_ptr=f32, a_ptr=ad, dx_ptr=base, M=M, N=N, K=K, R=R, M_BUCKET=bucket,
                    stride_dym=N, stride_dyn=1, stride_dsm=R, stride_dsr=1, stride_ar=K, stride_ak=1,
                    stride_dxm=K, stride_dxk=1, **drop)
        return args, {"HAS_DROPOUT": v.dropout, "W_DTYPE": TL[v.wdtype or v.base], **q4, **gemm}
    if v.kernel == "dequantize_4bit_kernel":
        # KN=False: the merge path's orientation (the forward's is for tests, interpreted)
        return dict(**quant, out_ptr=base, N=N, K=K), {**q4, "WIDE": v.wide, "KN": False}
    raise KeyError(v.kernel)


def configs_for(kernel, v: Variant, arch: int = 90) -> list[triton.Config]:
    """The configs the autotuner may pick for ``v`` on ``arch``: its list after the kernel's early pruning."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return list(kernel.configs)
    args, consts = launch_args(v, arch)
    return list(prune(kernel.configs, args, **consts))  # as Autotuner.prune_configs calls it


def specialize(fn, v: Variant, config: triton.Config, overrides: dict[str, object] | None = None,
               arch: int = 90):
    """(signature, constexprs, attrs) for ASTSource, specialized as the JIT specializes the launch on ``arch``;
    ``overrides`` replaces runtime argument values (tests: another M or seed must give the same signature)."""
    args, constexprs = launch_args(v, arch)
    args = {**args, **(overrides or {})}
    constexprs = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, Ptr):
            ty, spec = f"*{value}", "D"
        else:  # the JIT's own rule: == 1 → constant, % 16 == 0 → divisibility 16; floats unspecialized;
            # none of it for the kernel's do_not_specialize arguments (M, its bucket, the seed)
            specialize_value = not fn.params[i].do_not_specialize
            ty, spec = native_specialize_impl(BaseBackend, value, False, specialize_value, specialize_value)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


ARCHS = (75, 80, 86, 89, 90, 100, 120)
SHARED_PER_BLOCK = configs.SHARED_PER_BLOCK


def expected_tensor_ops(v: Variant, arch: int) -> str:
    """The tensor-core instructions a variant must contain ("" = none required). Every dot has tensor-core inputs
    (half, or fp32 as TF32/3xTF32):
    - sm_75 (Turing): none. Triton lowers ``tl.dot`` to FMA before sm_80 (its AccelerateMatmul pass: "Dot op using
      MMA for compute capability 75 has been deprecated. It falls back to the FMA path"), so no kernel of ours has
      HMMA there; the package runs cuBLAS's base GEMM on Turing (dispatch.resolve_gemm) and these rank-r kernels
      with FMA dots (memory-bound, so what is checked there is that they do not spill);
    - sm_80, sm_86, sm_89, sm_120: mma.sync (HMMA) only (consumer Blackwell has no tcgen05; checked in its SASS);
    - sm_90: the base GEMMs must use Hopper's warpgroup MMA (HGMMA), the rank-r kernels either (Triton lowers
      32-row tiles and some transposed operands to mma.sync);
    - sm_100: Blackwell's tcgen05 MMA (UTCHMMA in SASS) in the base GEMMs, tcgen05 or HMMA in the others."""
    if arch < 80 or v.kernel == "dequantize_4bit_kernel":  # the dequantize kernel has no dot
        return ""
    if arch == 90:
        return "hgmma" if v.kernel in GEMM_KERNELS else "hgmma+hmma"
    if arch == 100:
        return "utcmma" if v.kernel in GEMM_KERNELS else "utcmma+hmma"
    return "hmma"


def launched_on(v: Variant, arch: int) -> bool:
    """Whether the package launches ``v`` on ``arch`` (fused_lora.dispatch: ``auto`` runs cuBLAS's base GEMM on
    Turing, so not the GEMM kernels, and no kernels with bf16 inputs there: the PyTorch path serves bf16; DoRA runs
    the PyTorch path there, fused_lora.dispatch.route; a 4-bit layer whose K is not a multiple of its blocksize runs
    the composed path on every GPU)."""
    if arch < 80 and v.kernel in DORA_KERNELS:
        return False
    if v.kernel in Q4_KERNELS and v.kernel != "dequantize_4bit_kernel" and not v.q4_aligned:
        return False  # an unaligned K runs the composed path on GPUs (fused_lora/quantized.py)
    if arch < 80:
        return v.kernel not in GEMM_KERNELS and v.base != "bf16" and v.adapter != "bf16"
    return True


def _product(kernel: str, **axes) -> list[Variant]:
    names = list(axes)
    return [Variant(kernel, **dict(zip(names, values, strict=True))) for values in itertools.product(*axes.values())]


DTYPES = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32")]
CI_DTYPES = [("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")]  # see ci_matrix


def full_matrix() -> list[Variant]:
    """Every axis value the launchers can produce (ranks 8/16/32/64 cover every BLOCK_R and both alignments)."""
    out = []
    for (b, a), kernel in itertools.product(DTYPES, KERNELS):
        layouts = ["linear", "conv1d"] if kernel in GEMM_KERNELS else ["linear"]
        common = dict(base=[b], adapter=[a], layout=layouts, rank=[8, 16, 32, 64])
        single = single_of(kernel)
        if single in ("lora_down_kernel", "lora_dx_kernel"):
            out += _product(kernel, dropout=[True, False], **common)
        elif single == "lora_fwd_kernel":
            out += _product(kernel, bias=[True, False], **common)
        elif single == "lora_dy_kernel":
            out += _product(kernel, bias=[True, False], split=[1, 2], need=["ds+db", "ds", "db"], **common)
        elif kernel == "multi_lora_up_add_kernel":  # bias: the own-bias deltas
            out += _product(kernel, bias=[True, False], **common)
        elif single == "lora_up_add_kernel":
            out += _product(kernel, **common)
        elif single == "lora_dx_add_kernel":
            out += _product(kernel, dropout=[True, False], **common)
        else:
            out += _product(kernel, dropout=[True, False], split=[1, 2], **common)
    return [v for v in out if v.kernel not in Q4_KERNELS + DORA_KERNELS] + _q4_full() + _dora_full()


def _other_w(base: str) -> str:
    """A quant-state dtype other than the base's: W then rounds twice (W's dtype, then x's)."""
    return "bf16" if base == "fp32" else "fp32"


def _q4_full() -> list[Variant]:
    """The QLoRA kernels' axes: every dtype pair and rank, the heavy and light flag, nested or not, W in the base
    dtype or another; every blocksize at the defaults (it is only a shift amount in the code)."""
    out = []
    for kernel in ("lora_fwd_4bit_kernel", "lora_dx_4bit_kernel", *MULTI_Q4_GEMMS):
        flag = "bias" if "fwd" in kernel else "dropout"
        for (b, a), rank, on, nested, other, aligned in itertools.product(
                DTYPES, [8, 16, 32, 64], [True, False], [True, False], [False, True], [True, False]):
            out.append(Variant(kernel, base=b, adapter=a, rank=rank, nested=nested,
                               wdtype=_other_w(b) if other else "", aligned=aligned, **{flag: on}))
        out += [Variant(kernel, qblock=q) for q in Q4_BLOCKSIZES if q != 64]
    for base, nested, aligned in itertools.product(TL, [True, False], [True, False]):
        out.append(Variant("dequantize_4bit_kernel", base=base, nested=nested, aligned=aligned))
    out += [Variant("dequantize_4bit_kernel", qblock=q) for q in Q4_BLOCKSIZES if q != 64]
    return out


def _q4_ci() -> list[Variant]:
    """The QLoRA kernels in CI: the dense GEMMs' CI dtype pairs and their rank-64 half-adapter case, plus what changes
    the 4-bit code: plain fp32 absmax (one gather less), W in another dtype than x (a second rounding; with an fp32
    base a half W makes 3xTF32 two products), no dropout in dX, int64 offsets, and the unaligned path (K not a
    multiple of the blocksize: scales gathered per element, 64×64 tiles only) at every CI dtype pair."""
    out = []
    for kernel in ("lora_fwd_4bit_kernel", "lora_dx_4bit_kernel", *MULTI_Q4_GEMMS):
        out += [Variant(kernel, base=b, adapter=a) for b, a in CI_DTYPES]
        out += [Variant(kernel, adapter="bf16", rank=64), Variant(kernel, nested=False),
                Variant(kernel, wdtype="fp32"), Variant(kernel, base="fp32", wdtype="bf16"), Variant(kernel, wide=True)]
        out += [Variant(kernel, base=b, adapter=a, aligned=False) for b, a in CI_DTYPES]
    out += [Variant("lora_dx_4bit_kernel", dropout=False), Variant("multi_lora_dx_4bit_kernel", dropout=False)]
    out += [Variant("dequantize_4bit_kernel", base=b, nested=n) for b, n in itertools.product(TL, [True, False])]
    out += [Variant("dequantize_4bit_kernel", wide=True), Variant("dequantize_4bit_kernel", aligned=False)]
    return out


def ci_matrix() -> list[Variant]:
    """The distinct variants CI compiles, each at every autotune config, for sm_80 and sm_90.

    A cold compile costs ~2 s of CPU (LLVM and ptxas), so the full product (520 variants × 4 configs × 2 targets) is
    out of a CI budget; what is kept is what changes the code the checks look at:
    - every dtype pair LoRALinear produces except fp16/fp16: base bf16, fp16, fp32 with fp32 adapters (its
      default on a half base, as PEFT) and adapters in the base dtype for bf16 and fp32. fp16/fp16 lowers
      to the same MMA shapes, layouts and pipelining as bf16/bf16 (only the cvt opcode differs);
    - both weight layouts for the GEMM kernels (they swap which stride is the constant 1);
    - the heavy form of every flag (dropout, bias, dbias, both dy outputs, SPLIT > 1: atomics), whose code
      contains the light form's, and rank 16 (BLOCK_R 16, the common rank);
    - rank 64 with bf16 adapters (BLOCK_R 64: the largest rank-r tiles) for every kernel, and rank 64 with fp32
      adapters for the skinny kernels (their chunks go up to 64 for every adapter dtype; the other kernels take
      16-rank chunks with fp32 adapters, so there rank 64 compiles as rank 16), and, at the default dtypes, the
      light forms that change the data path rather than drop code: no dropout (x goes straight from shared memory
      into the MMA) and SPLIT 1 (a plain store epilogue).
    - every kernel's WIDE variant (int64 offsets) at the default dtypes.
    Not compiled in CI: bias off and single-output dy passes (strict subsets of the code), rank 8 (only the
    rank strides lose their 16-alignment), TF32 on (one MMA where 3xTF32 has two or three), fp16/fp16.
    ``--matrix full`` compiles all of them.
    """
    out = []
    for (b, a), kernel in itertools.product(CI_DTYPES, KERNELS):
        for layout in (["linear", "conv1d"] if kernel in GEMM_KERNELS else ["linear"]):
            out.append(Variant(kernel, base=b, adapter=a, layout=layout))
    out += [Variant(kernel, adapter="bf16", rank=64) for kernel in KERNELS]
    out += [Variant(k, dropout=False) for k in ("lora_down_kernel", "lora_dx_kernel", "multi_lora_down_kernel",
                                                "multi_lora_dx_kernel")]
    out += [Variant("lora_dy_kernel", split=1), Variant("lora_da_kernel", split=1, dropout=False),
            Variant("multi_lora_dy_kernel", split=1), Variant("multi_lora_da_kernel", split=1, dropout=False)]
    out += [Variant(kernel, wide=True) for kernel in KERNELS]  # int64 offsets: the rare launch past 2³¹ elements
    out += [Variant(kernel, rank=64) for kernel in SKINNY_KERNELS]  # fp32 adapters' 64-rank chunks (skinny_rank_block)
    return [v for v in out if v.kernel not in Q4_KERNELS + DORA_KERNELS] + _q4_ci() + _dora_ci()


def sample_matrix() -> list[Variant]:
    """A small matrix for every arch in CI (``ci_matrix`` for all seven archs is over CI's time budget): each kernel
    at the default dtypes (bf16 base, fp32 adapters; fp16 on Turing, which runs no bf16 kernels) with every heavy
    flag, and at rank 64 with half adapters (BLOCK_R 64: the most registers and shared memory of the rank-r tiles).
    ``launched_on`` drops what an arch does not run."""
    out = []
    for kernel in KERNELS:
        out += [Variant(kernel), Variant(kernel, adapter="bf16", rank=64)]
        if kernel in SKINNY_KERNELS:
            out.append(Variant(kernel, rank=64))  # fp32 adapters' 64-rank chunks
        out += [Variant(kernel, base="fp16"), Variant(kernel, base="fp16", adapter="fp16", rank=64)]
    # The dequantize kernel has no adapters: one variant per base (its label does not name adapter or rank).
    out = [v for v in out if v.kernel != "dequantize_4bit_kernel"]
    out.append(Variant("dora_fwd_kernel", dropout=False))  # the one-accumulator form has its own config list
    return out + [Variant("dequantize_4bit_kernel"), Variant("dequantize_4bit_kernel", base="fp16")]


def _dora_launch_args(v: Variant, arch: int) -> tuple[dict[str, object], dict[str, object]]:
    """As fused_lora/backends/dora_triton.py launches the DoRA kernels: G (dy pass, for dX) written, d magnitude
    needed; without dropout the forward's x_d argument is x itself; sq and the atomics buffers fp32, the magnitude in
    the adapters' dtype."""
    R = v.rank
    base, ad, f32 = Ptr(v.base), Ptr(v.adapter), Ptr("fp32")
    wk, wn = (1, K) if v.layout == "linear" else (N, 1)
    lora = {"LORA_DOT": TL[v.adapter], "LORA_PREC": precision(v.adapter, v.tf32, arch),
            "BLOCK_R": block_r(R, v.adapter, v.kernel, arch), "WIDE": v.wide}
    gemm = {"BASE_DOT": TL[v.base], "BASE_PREC": precision(v.base, v.tf32, arch), **lora}
    drop = {"seed_ptr": Ptr("i64"), "p": 0.1, "drop_scale": 1 / 0.9}
    bucket = triton.next_power_of_2(M)
    if v.kernel == "dora_norm_kernel":
        args = dict(w_ptr=base, a_ptr=ad, b_ptr=ad, out_ptr=f32, N=N, K=K, R=R, stride_wk=wk, stride_wn=wn,
                    stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1, scaling=2.0)
        return args, {"ROOT": v.split == 1, **lora}
    if v.kernel == "dora_down_kernel":
        args = dict(x_ptr=base, a_ptr=ad, s_ptr=f32, xd_ptr=base, M=M, K=K, R=R, M_BUCKET=bucket, stride_xm=K,
                    stride_xk=1, stride_ar=K, stride_ak=1, stride_sm=R, stride_sr=1, stride_xdm=K, stride_xdk=1, **drop)
        return args, lora
    if v.kernel == "dora_fwd_kernel":
        args = dict(x_ptr=base, xd_ptr=base, w_ptr=base, bias_ptr=base if v.bias else f32, s_ptr=f32, b_ptr=ad,
                    norm_ptr=f32, mag_ptr=ad, y_ptr=base, p_ptr=ad, M=M, N=N, K=K, R=R, M_BUCKET=bucket,
                    stride_xm=K, stride_xk=1, stride_xdm=K, stride_xdk=1, stride_wk=wk, stride_wn=wn, stride_sm=R,
                    stride_sr=1, stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1, stride_pm=N, stride_pn=1,
                    stride_bias=1, stride_mag=1, scaling=2.0, drop_scale=drop["drop_scale"] if v.dropout else 1.0)
        return args, {"HAS_BIAS": v.bias, "HAS_DROPOUT": v.dropout, "WRITE_P": v.write_p, **gemm}
    if v.kernel == "dora_dy_kernel":
        need_ds, need_db = "ds" in v.need, "db" in v.need
        args = dict(dy_ptr=base, b_ptr=ad, s_ptr=f32, p_ptr=ad, norm_ptr=f32, mag_ptr=ad, ds_ptr=f32, db_ptr=f32,
                    dbias_ptr=f32, dmag_ptr=f32, g_ptr=base, M=M, N=N, R=R, M_BUCKET=bucket, stride_dym=N,
                    stride_dyn=1, stride_bn=R, stride_br=1, stride_sm=R, stride_sr=1, stride_pm=N, stride_pn=1,
                    stride_mag=1, stride_dsm=R if need_ds else 1, stride_dsr=1, stride_dbn=R if need_db else 1,
                    stride_dbr=1, stride_gm=N, stride_gn=1, scaling=2.0)
        return args, {"DS_ATOMIC": v.split > 1, "HAS_DBIAS": v.bias, "NEED_DS": need_ds, "NEED_DB": need_db,
                      "NEED_DMAG": True, "WRITE_G": True, "G_MINUS_ONE": v.dropout, **lora}
    if v.kernel == "dora_dx_kernel":
        args = dict(dy_ptr=base, gm_ptr=base, w_ptr=base, ds_ptr=f32, a_ptr=ad, dx_ptr=base, M=M, N=N, K=K, R=R,
                    M_BUCKET=bucket, stride_dym=N, stride_dyn=1, stride_gmm=N, stride_gmn=1, stride_wk=wk,
                    stride_wn=wn, stride_dsm=R, stride_dsr=1, stride_ar=K, stride_ak=1, stride_dxm=K, stride_dxk=1,
                    **drop)
        return args, gemm
    raise KeyError(v.kernel)


def _multi_launch_args(v: Variant, arch: int) -> tuple[dict[str, object], dict[str, object]]:
    """As fused_lora/backends/multi_triton.py and multi_bnb4_triton.py launch the segmented kernels: the single-adapter
    kernel's arguments less S's strides (packed) and the scalar scaling / p / 1/(1-p) (read from the fp32 table), plus
    the three table pointers and n_seg, R_MAX (the largest rank: BLOCK_R follows it); B_cat and dB N×(N_SEG·r), the
    bias table and dbias (N_SEG, N)."""
    R, R_TOT = v.rank, N_SEG * v.rank
    base, ad, f32, i64 = Ptr(v.base), Ptr(v.adapter), Ptr("fp32"), Ptr("i64")
    wk, wn = (1, K) if v.layout == "linear" else (N, 1)
    lora = {"LORA_DOT": TL[v.adapter], "LORA_PREC": precision(v.adapter, v.tf32, arch),
            "BLOCK_R": block_r(R, v.adapter, v.kernel, arch), "WIDE": v.wide}
    gemm = {"BASE_DOT": TL[v.base], "BASE_PREC": precision(v.base, v.tf32, arch), **lora}
    seg = dict(M=M, n_seg=N_SEG, R_MAX=R, M_BUCKET=triton.next_power_of_2(M))
    tables = dict(seg_ptr=i64, scal_ptr=f32)
    bias = dict(bias_ptr=base if v.bias else f32, stride_bias_seg=N if v.bias else 0, stride_bias=1)
    if v.kernel == "multi_lora_down_kernel":
        args = dict(x_ptr=base, a_ptr=ad, s_ptr=f32, **tables, seed_ptr=i64, K=K, **seg, stride_xm=K, stride_xk=1,
                    stride_ar=K, stride_ak=1, stride_ss=M * R if v.split > 1 else 0)
        return args, {"HAS_DROPOUT": v.dropout, **lora}
    if v.kernel == "multi_lora_fwd_kernel":
        args = dict(x_ptr=base, w_ptr=base, s_ptr=f32, b_ptr=ad, y_ptr=base, **tables, N=N, K=K, **seg,
                    stride_xm=K, stride_xk=1, stride_wk=wk, stride_wn=wn, stride_bn=R_TOT, stride_br=1, stride_ym=N,
                    stride_yn=1, **bias)
        return args, {"HAS_BIAS": v.bias, **gemm}
    if v.kernel == "multi_lora_up_add_kernel":
        args = dict(y_ptr=base, s_ptr=f32, b_ptr=ad, delta_ptr=f32, **tables, N=N, **seg, stride_ym=N, stride_yn=1,
                    stride_bn=R_TOT, stride_br=1, stride_delta_seg=N if v.bias else 0)
        return args, {"HAS_DELTA": v.bias, **lora}
    if v.kernel == "multi_lora_dy_kernel":
        need_ds, need_db = "ds" in v.need, "db" in v.need
        args = dict(dy_ptr=base, b_ptr=ad, s_ptr=f32, ds_ptr=f32, db_ptr=f32, dbias_ptr=f32, **tables, N=N, **seg,
                    stride_dym=N, stride_dyn=1, stride_bn=R_TOT, stride_br=1, stride_dbn=R_TOT if need_db else 1,
                    stride_dbr=1, stride_dbias_seg=N if v.bias else 0)
        return args, {"DS_ATOMIC": v.split > 1, "HAS_DBIAS": v.bias, "NEED_DS": need_ds, "NEED_DB": need_db, **lora}
    if v.kernel == "multi_lora_dx_kernel":
        args = dict(dy_ptr=base, w_ptr=base, ds_ptr=f32, a_ptr=ad, dx_ptr=base, **tables, seed_ptr=i64, N=N, K=K,
                    **seg, stride_dym=N, stride_dyn=1, stride_wk=wk, stride_wn=wn, stride_ar=K, stride_ak=1,
                    stride_dxm=K, stride_dxk=1)
        return args, {"HAS_DROPOUT": v.dropout, **gemm}
    if v.kernel == "multi_lora_dx_add_kernel":
        args = dict(dx_ptr=base, ds_ptr=f32, a_ptr=ad, **tables, seed_ptr=i64, K=K, **seg, stride_dxm=K, stride_dxk=1,
                    stride_ar=K, stride_ak=1)
        return args, {"HAS_DROPOUT": v.dropout, **lora}
    if v.kernel == "multi_lora_da_kernel":
        args = dict(ds_ptr=f32, x_ptr=base, da_ptr=f32, **tables, seed_ptr=i64, K=K, **seg, stride_xm=K, stride_xk=1,
                    stride_dar=K, stride_dak=1)
        return args, {"DA_ATOMIC": v.split > 1, "HAS_DROPOUT": v.dropout, **lora}
    u8 = Ptr("u8")
    quant = dict(w_ptr=u8, absmax_ptr=u8 if v.nested else f32, code_ptr=f32, absmax2_ptr=f32, code2_ptr=f32,
                 offset_ptr=f32)
    q4 = {"NESTED": v.nested, "QBLOCK_LOG2": v.qblock.bit_length() - 1, "QBLOCK2_LOG2": 8, "ALIGNED": v.q4_aligned,
          "W_DTYPE": TL[v.wdtype or v.base]}
    if v.kernel == "multi_lora_fwd_4bit_kernel":
        args = dict(x_ptr=base, **quant, s_ptr=f32, b_ptr=ad, y_ptr=base, **tables, N=N, K=K, **seg, stride_xm=K,
                    stride_xk=1, stride_bn=R_TOT, stride_br=1, stride_ym=N, stride_yn=1, **bias)
        return args, {"HAS_BIAS": v.bias, **q4, **gemm}
    if v.kernel == "multi_lora_dx_4bit_kernel":
        args = dict(dy_ptr=base, **quant, ds_ptr=f32, a_ptr=ad, dx_ptr=base, **tables, seed_ptr=i64, N=N, K=K, **seg,
                    stride_dym=N, stride_dyn=1, stride_ar=K, stride_ak=1, stride_dxm=K, stride_dxk=1)
        return args, {"HAS_DROPOUT": v.dropout, **q4, **gemm}
    raise KeyError(v.kernel)


def _dora_full() -> list[Variant]:
    """The DoRA kernels' axes: every dtype pair and rank, both layouts where W is read, every flag."""
    out = []
    for (b, a), rank in itertools.product(DTYPES, [8, 16, 32, 64]):
        common = dict(base=[b], adapter=[a], rank=[rank])
        both = dict(layout=["linear", "conv1d"], **common)
        out += _product("dora_norm_kernel", split=[1, 2], **both) + _product("dora_down_kernel", **common)
        out += _product("dora_fwd_kernel", dropout=[True, False], bias=[True, False], write_p=[True, False], **both)
        out += _product("dora_dy_kernel", dropout=[True, False], bias=[True, False], split=[1, 2],
                        need=["ds+db", "ds", "db"], **common)
        out += _product("dora_dx_kernel", **both)
    return out


def _dora_ci() -> list[Variant]:
    """The DoRA kernels in CI, on the dense kernels' rules (ci_matrix): the CI dtype pairs with both layouts where W is
    read, and both forward forms (one accumulator without dropout, two with: separate config lists); rank 64 with
    bf16 adapters, SPLIT 1 without dropout for the dy pass, SPLIT_K 1 for the norm (its root stored), and WIDE, at the
    default dtypes."""
    out = []
    for b, a in CI_DTYPES:
        for layout in ("linear", "conv1d"):
            out += [Variant("dora_norm_kernel", base=b, adapter=a, layout=layout),
                    Variant("dora_dx_kernel", base=b, adapter=a, layout=layout)]
            out += [Variant("dora_fwd_kernel", base=b, adapter=a, layout=layout, dropout=d) for d in (True, False)]
        out += [Variant("dora_down_kernel", base=b, adapter=a), Variant("dora_dy_kernel", base=b, adapter=a)]
    out += [Variant(kernel, adapter="bf16", rank=64) for kernel in DORA_KERNELS]
    out += [Variant("dora_fwd_kernel", adapter="bf16", rank=64, dropout=False),
            Variant("dora_dy_kernel", split=1, dropout=False), Variant("dora_norm_kernel", split=1)]
    out += [Variant(kernel, wide=True) for kernel in DORA_KERNELS] + [Variant("dora_fwd_kernel", wide=True,
                                                                              dropout=False)]
    return out


def variants_for(matrix: str, arch: int) -> list[Variant]:
    """The variants of ``matrix`` that the package launches on ``arch``. In the sample, fp16 bases stand in for bf16
    only on Turing."""
    variants = [v for v in MATRICES[matrix]() if launched_on(v, arch)]
    if matrix == "sample" and arch >= 80:
        variants = [v for v in variants if v.base != "fp16"]
    return variants


MATRICES = {"ci": ci_matrix, "full": full_matrix, "sample": sample_matrix}
LEGEND = """Variant: base/adapter dtypes, weight layout (GEMM kernels), rank r (BLOCK_R = 16 for r ≤ 16, on sm_75,
and for fp32 adapters outside the skinny kernels (S, dy pass, dA), else r up to 64; r = 8 also drops the
16-alignment of the rank strides), dropout, bias, SPLIT_N/SPLIT_M, the dy pass's outputs. Config:
BLOCK_M×BLOCK_N×BLOCK_K (skinny kernels: BLOCK_M×BLOCK_K), warps, pipeline stages. Shared memory as Triton
allocates it (the kernel's metadata plus the cubin's static part); stack/local: spill bytes per thread. Refresh:
`python bench/compile_report.py --out bench/results/compile` (see bench/README.md).
"""
