"""Launch configurations: a small pruned list per kernel on GPU, one config under the interpreter.

``TRITON_INTERPRET=1`` must be set before this module is imported: ``triton.jit`` reads it at
decoration time, so it is read once here too and every launcher follows the same answer.
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FUSED_LORA_AUTOTUNE=0: every kernel takes the first config that fits the device (a GPU check that must finish in a
# fixed time: bench/run_gpu.sh check). Triton 3.9 then skips benchmarking; triton 3.6 (the GPU image's) still
# benchmarks the one config left on the call's arguments, which the restore_value / reset_to_zero lists make harmless
# (tests/test_autotune_first_call.py). Read at import, like TRITON_INTERPRET.
AUTOTUNE = os.environ.get("FUSED_LORA_AUTOTUNE", "1") != "0"
# Triton keeps each autotuner's result on disk beside its compiled kernels (its cache directory), keyed by the kernel's
# source, the key's values (ARCH among them) and the configs: a restart re-tunes no key it has tuned before (the
# package's own choice among paths is kept with FUSED_LORA_GEMM_CACHE). Off under the interpreter (triton turns it off).
CACHE_RESULTS = True

# Kernel arguments whose value changes from call to call. Triton's JIT specializes an int argument that is 1 or
# a multiple of 16 into a new variant, so without this a batch of 1024 tokens after one of 1000 would compile new
# kernels in the middle of a training run. (The dropout seed is read from device memory, ``seed_ptr``: a captured
# CUDA graph takes each replay's seed, and no seed value can specialize anything.)
# ARCH: the launch device's compute capability (triton_launch.arch; 0 under the interpreter), an argument of every
# autotuned kernel that the code never reads. It is in each autotuner's key, so that a process with two GPU kinds tunes
# each apart (the key otherwise holds shapes and dtypes only: a config tuned on an H100 would be reused on an A10, where
# it may not fit), and the pruning (``by_dtype``) reads it; not specialized (80 is a multiple of 16), so it compiles
# no variant of its own.
RUNTIME_VALUES = ["M", "M_BUCKET", "ARCH"]


# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, which Triton's launcher
# checks), by compute capability: CUDA C Programming Guide, "Technical Specifications per Compute Capability".
SHARED_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                    120: 99 * 1024}


def arch_family(arch: int) -> int:
    """The listed compute capability a device's falls under (sm_87 → 86, sm_103 → 100, sm_121 → 120)."""
    known = [a for a in sorted(SHARED_PER_BLOCK) if a <= arch]
    return known[-1] if known else min(SHARED_PER_BLOCK)


def m_bucket(m: int) -> int:
    """The autotuner's token-count key: four buckets, so variable-length batches tune each kernel at most four
    times per layer shape (the tile choice changes with the number of row tiles, not with M itself)."""
    for bound in (256, 1024, 4096):
        if m <= bound:
            return bound
    return 16384


def cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def pick(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # Autotuning under the interpreter would interpret every config: collapse to one. The interpreter
    # config uses 32-wide tiles so that the small CPU test shapes still span several tiles (edge masks,
    # grouped ordering, rank chunks) while keeping the number of interpreted programs low.
    return [interpreter] if INTERPRET else gpu


# Every config below is compiled for sm_80 and sm_90 with triton 3.6 and the newest by CI
# (bench/compile_report.py, tests/test_compile_targets.py): no spills, registers and shared memory within the
# limits, tensor cores; the numbers are in bench/results/compile/. Spill figures quoted below are from it.

# Base GEMM with the rank-r term folded in (forward y, backward dX). Tiles from the Triton matmul
# tutorial's Hopper list, pruned to the ones that suit K, N >= 768 (transformer projections) and do not
# spill on sm_90 in bf16 (measured before the report reproduced the JIT's specialization, which counts more
# registers: 128×256 with 8 warps spilled 248 B, 128×128 with 4 warps 424 B).
_GEMM_128_S4 = cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_128_S3 = cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_64x128 = cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_64x64 = cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
_GEMM_INTERP = cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
GEMM_CONFIGS = pick([_GEMM_128_S4, _GEMM_128_S3, _GEMM_64x128, _GEMM_64x64], _GEMM_INTERP)

# dX leaves out the 64×128 tile: with 4 warps it spilled 8 B per thread on sm_80 in every dtype (triton 3.6
# with bf16 adapters, 3.9 with fp32 ones); the forward compiles it cleanly.
DX_CONFIGS = pick([_GEMM_128_S4, _GEMM_128_S3, _GEMM_64x64], _GEMM_INTERP)

# Skinny GEMMs of the rank-r branch (S = x_d Aᵀ, dS/dB pass over dY, dA = dSᵀ x_d): memory-bound
# streams over an M×K or M×N operand; BLOCK_R covers the (padded) rank, up to 64 per program.
# Pruned with bench/compile_report.py (sm_90, bf16, r=16, dropout on): 128×128 tiles spill 40-352 B of
# stack per thread (the Philox state and the fp32 accumulators), these four do not.
_SK_64x64 = cfg(4, 4, BLOCK_M=64, BLOCK_K=64)
_SK_64x128 = cfg(8, 3, BLOCK_M=64, BLOCK_K=128)
_SK_128x64 = cfg(8, 3, BLOCK_M=128, BLOCK_K=64)
_SK_32x128 = cfg(4, 4, BLOCK_M=32, BLOCK_K=128)
_SKINNY_INTERP = cfg(4, 1, BLOCK_M=32, BLOCK_K=32)
SKINNY_CONFIGS = pick([_SK_64x64, _SK_64x128, _SK_128x64, _SK_32x128], _SKINNY_INTERP)

# The composed path's in-place rank-r adds (lora_compose.py): one read and one write of an M×N (M×K) tile plus a
# rank-r dot, memory-bound; no K loop, so one pipeline stage. 32 elements per thread: 64 per thread (64×128 with
# 4 warps, 128×128 with 8) took 176-254 registers and spilled 8-16 B with fp32 or rank-64 adapters (sm_80/sm_90,
# bench/compile_report.py), and a memory-bound tile gains nothing from them.
ADD_CONFIGS = pick(
    [cfg(8, 1, BLOCK_M=64, BLOCK_N=128), cfg(4, 1, BLOCK_M=64, BLOCK_N=64), cfg(8, 1, BLOCK_M=128, BLOCK_N=64),
     cfg(4, 1, BLOCK_M=32, BLOCK_N=128)],
    cfg(4, 1, BLOCK_M=32, BLOCK_N=32),
)

# Per dtype, where a config must go (kernels/*.py pass these to ``by_dtype``):
# - fp32 adapters in the skinny kernels take rank chunks of up to 64, like half ones, so that r <= 64 reads x or dY
#   once (fused_lora/backends/triton_launch.py::skinny_rank_block); lists from a BLOCK_R 64 sweep on sm_80/sm_90
#   (bench/compile_report.py): S = x Aᵀ spilled 88-120 B at 32×128 with 4 warps and used 255 registers at 64×64
#   with 4 (sm_80); these three have no stack. The dy pass keeps 64×64 (251-255 registers, no stack) and 32×64 with 8
#   warps; 32×32 spilled 8 B on sm_90. Both 8-warp dy tiles of the 16-rank era spilled 8 B on sm_90 with triton 3.6
#   (dY is used in two layouts, B and S split for 3xTF32).
DOWN_CONFIGS_FP32_ADAPTERS = pick([cfg(8, 3, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=32, BLOCK_K=64),
                                   cfg(4, 4, BLOCK_M=64, BLOCK_K=32)], _SKINNY_INTERP)
DY_CONFIGS_FP32_ADAPTERS = pick([_SK_64x64, cfg(8, 3, BLOCK_M=32, BLOCK_K=64)], _SKINNY_INTERP)
# - the dy pass with half adapters at 32×128: rank 64 (BLOCK_R 64) spilled 288 B on sm_80 with triton 3.9;
DY_CONFIGS_HALF_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_128x64], _SKINNY_INTERP)
# - S = x Aᵀ with half adapters at 32×128 and dA with fp32 adapters at 128×64 (no dropout, SPLIT_M 1) spill
#   12-16 B with triton 3.9 only, at 80 and 128 registers: its ptxas 13.4 under Triton's
#   --regAllocOptLevel=2 workaround; the same PTX through that ptxas without the flag has no stack, and
#   triton 3.6 (the GPU image's) compiles both cleanly. Dropped so that both tritons pass.
DOWN_CONFIGS_HALF_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_128x64], _SKINNY_INTERP)
# - dA with fp32 adapters at 64×64 (no dropout, one row slice: the loop's step is a runtime value, so that a new split
#   factor compiles no new variant) spills 8 B at 128 registers on sm_90 with triton 3.9 (the same ptxas quirk).
# - Turing (sm_75, FMA dots, 16-rank chunks): the half lists' 4-warp 64×64 and 8-warp 64×128/128×64 tiles of S = x Aᵀ,
#   the dy pass and dA spilled 160-360 B per thread with fp16 adapters (triton 3.9); 64×64 and 32×64 with 8 warps
#   compile cleanly for fp16 and fp32 adapters alike.
SKINNY_CONFIGS_TURING = pick([cfg(8, 3, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=32, BLOCK_K=64)], _SKINNY_INTERP)
DA_CONFIGS_FP32_ADAPTERS = pick([cfg(8, 3, BLOCK_M=32, BLOCK_K=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=64), _SK_32x128],
                                _SKINNY_INTERP)

# fp32 base operands (x, dY fp32; 3xTF32 splits both operands of the base dots): BLOCK_K halved, so a
# pipeline stage takes the shared memory of its 16-bit tile (unhalved, 128×128×64 in fp32 is 64 KiB a stage:
# 4 stages are over sm_90's 227 KiB a block, 3 over sm_80's 163 KiB), and only the tiles that do not spill:
# on sm_80 128×128×32 spilled 8-376 B, 64×128×32 96-216 B; the dy pass spilled 48-568 B at every 16-bit
# tile and 40 B at 64×64 with 8 warps, S = x Aᵀ 8 B there.
GEMM_CONFIGS_FP32 = pick([cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)], _GEMM_INTERP)
SKINNY_CONFIGS_FP32 = pick(
    [
        cfg(4, 4, BLOCK_M=64, BLOCK_K=32),
        cfg(8, 3, BLOCK_M=128, BLOCK_K=32),
        cfg(4, 4, BLOCK_M=32, BLOCK_K=64),
    ],
    _SKINNY_INTERP,
)
# The dy pass in fp32 also spilled 8 B at 128×32 with 8 warps on sm_80 (triton 3.6).
# (32×32: sm_100, where 64×32 spilled with triton 3.9 and 32×64 with 3.6.)
DY_CONFIGS_FP32 = pick([cfg(4, 4, BLOCK_M=64, BLOCK_K=32), cfg(4, 4, BLOCK_M=32, BLOCK_K=64),
                        cfg(4, 4, BLOCK_M=32, BLOCK_K=32)], _SKINNY_INTERP)


# The multi-adapter dY pass (kernels/multi_lora.py) with half adapters: the dense pass's tiles and a 32-row one with 8
# warps. At rank 64 (BLOCK_R 64) the three others spilled 16-104 B per thread on sm_80/86/89/120 (the segment's tables
# beside the pass's two rank-r accumulators; triton 3.9, EXCLUDED); 32×64 with 8 warps took 178-196 registers, no stack.
MULTI_DY_CONFIGS_HALF_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_128x64, cfg(8, 3, BLOCK_M=32, BLOCK_K=64)],
                                      _SKINNY_INTERP)

# The multi-adapter forward GEMM (kernels/multi_lora.py) with an fp32 base: the dense list's tile, and a 32-row one for
# sm_80, where the 64-row tile spilled 16 B per thread (the segment's tables beside 3xTF32's split operands; triton 3.9,
# bench/compile_report.py; EXCLUDED).
MULTI_GEMM_CONFIGS_FP32 = pick(
    [cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), cfg(4, 5, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    _GEMM_INTERP,
)

# QLoRA GEMMs (kernels/lora_4bit.py): W's tile is dequantized in registers (one byte, a code lookup, a scale per
# element) before it goes to the MMA, so a tile costs registers where the dense kernels' costs shared memory. With the
# dense lists' BLOCK_K 64 (32 W elements per thread at 128×128 with 8 warps, 64 at 64×128 with 4) they reached 255
# registers and spilled 8-40 B per thread on sm_80/86/89/120 (mma.sync), 16-296 B at 64×128 on sm_90 (triton 3.9,
# bench/compile_report.py); BLOCK_K 32 halves the W tile and compiled cleanly at 218-237 registers on sm_80/sm_120.
Q4_GEMM_CONFIGS = pick(
    [cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
     cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    _GEMM_INTERP,
)
# The multi-adapter 4-bit forward GEMM (kernels/multi_lora_4bit.py): the QLoRA list and 64×64×32 with 8 warps. With fp32
# adapters on sm_80/86/89 the QLoRA tiles all spilled (the 128×128 ones 8-64 B with both tritons, 64×64×32 with 4 warps
# 8-16 B at 128 registers with triton 3.6; EXCLUDED); with 8 warps it took 93-128 registers and no stack on every arch,
# both tritons (bench/results/compile-multi/).
MULTI_Q4_GEMM_CONFIGS = pick(Q4_GEMM_CONFIGS + [cfg(8, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)], _GEMM_INTERP)
# fp32 base: the dense kernels' one fp32 tile and a 32-row one, which sm_120 needs (there 64×64×32 spilled 8 B in dX
# with a bf16 W, 24-32 B wide).
Q4_GEMM_CONFIGS_FP32 = pick(
    [cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), cfg(4, 5, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    _GEMM_INTERP,
)
# An unaligned K (in_features not a multiple of the blocksize: no projection of GPT-2 or Gemma) takes per-element scale
# gathers and 64×64 tiles at most; on a GPU such layers run the composed path (fused_lora/quantized.py): their tiles
# spilled 8-56 B or passed 99 KiB on sm_80/86/89/100/120 with one triton or the other. The interpreter runs them.

# dequantize_4bit_kernel (kernels/lora_4bit.py): the GEMMs' W-tile loader writing W out, run once per merge (or
# test): one config (an autotuner with one config does not benchmark), 32 elements per thread. Interpreted, the tile
# is 128 wide along K so that the tests' blocksizes 32 and 64 give rows of 5 and 3 scale slots (the GEMMs' 32-wide
# interpreter tiles only ever have 2).
DEQUANT_CONFIGS = pick([cfg(4, 1, BLOCK_N=32, BLOCK_K=128)], cfg(4, 1, BLOCK_N=32, BLOCK_K=128))

def config_name(config: triton.Config) -> str:
    """"128×128×64 w8 s4" (GEMM tiles BLOCK_M×BLOCK_N×BLOCK_K; skinny BLOCK_M×BLOCK_K; adds BLOCK_M×BLOCK_N), the
    name bench/compile_report.py prints."""
    tiles = "×".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def launch_arch(named_args: dict, kwargs: dict) -> int:
    """The ``ARCH`` argument of a launch (compute capability, e.g. 86; 0 under the interpreter), positional or by
    keyword: what an ``early_config_prune`` knows of the device (the launchers pass ``triton_launch.arch``,
    bench/compile_matrix.py the target it compiles for)."""
    return kwargs["ARCH"] if "ARCH" in kwargs else named_args["ARCH"]


def kept_on(kernel: str, arch: int, case: str, block_r: int, configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` less those ``EXCLUDED`` for ``kernel`` on ``arch``'s family, dtype case and rank chunk."""
    family = arch_family(arch)
    gone = {n for archs, k, cases, ranks, n, _ in EXCLUDED
            if family in archs and k == kernel and case in cases and block_r in ranks}
    return [c for c in configs if config_name(c) not in gone]


def by_dtype(base: str, fp32_base: list[triton.Config], fp32_adapters=None, half_adapters=None, *, kernel: str,
             turing: list[triton.Config] | None = None):
    """``early_config_prune``: the config list for the dtype of the ``base`` pointer argument and of the
    adapters (the ``LORA_DOT`` constexpr), None keeping the kernel's own list, less the configs ``EXCLUDED`` on the
    launch's GPU (its ``ARCH`` argument); ``turing``: the list for 16-bit base operands on GPUs before Ampere (FMA
    dots). The autotuner's key holds the argument dtypes (and ``LORA_DOT`` where no adapter tensor is an argument) and
    ``ARCH``, so each pair is tuned apart, on each GPU kind. With ``FUSED_LORA_AUTOTUNE=0``, the first config left."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        arch = launch_arch(named_args, kwargs)
        if named_args[base].element_size() == 4:
            chosen, case = fp32_base, "fp32"
        elif kwargs["LORA_DOT"] == tl.float32:
            chosen, case = fp32_adapters, "fp32-adapters"
        else:
            chosen, case = half_adapters, "half"
        if turing is not None and arch < 80 and case != "fp32":
            chosen = turing
        chosen = configs if chosen is None else chosen
        kept = kept_on(kernel, arch, case, kwargs.get("BLOCK_R", 0), chosen)
        kept = kept or chosen[:1]  # never empty (tests/test_compile_targets.py fails before that could ship)
        return kept if AUTOTUNE else kept[:1]

    return prune


ALL_RANKS = (16, 32, 64)
# Configs a compile report (bench/compile_report.py, both tritons) found to break a check on a GPU family: spills,
# or shared memory over the block limit. They stay in the lists for the other families. Each entry:
# (arch families, kernel, dtype cases, BLOCK_R values, config, what was measured).
# Spills are per thread; "3.6" / "3.9" name the triton (and so ptxas 12.8 / 12.9, 13.4 for sm_100) that showed them.
_99K = (86, 89, 120)  # A10/A40/RTX 30xx, L4/L40/RTX 40xx, RTX 50xx: 99 KiB of shared memory per block
_HALF_WIDE_R = (32, 64)  # BLOCK_R of half adapters at r > 16: the rank-r operand tiles add shared memory
EXCLUDED: list[tuple[tuple[int, ...], str, tuple[str, ...], tuple[int, ...], str, str]] = [
    # sm_90 (H100/H200)
    ((90,), "lora_dx_add_kernel", ("fp32",), ALL_RANKS, "32×128 w4 s1",
     "spills 8 B at 128 registers (3.9, since the seed is read from memory)"),
    # sm_80 (A100)
    ((80, 86, 89), "lora_dy_kernel", ("half",), (64,), "64×128 w8 s3", "r64: spills 8 B at 255 registers (3.6)"),
    # sm_86 / sm_89 / sm_120 (99 KiB)
    (_99K, "lora_fwd_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s4", "r64: 144-145 KiB of shared memory"),
    (_99K, "lora_dx_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s4", "r64: 144-145 KiB of shared memory"),
    (_99K, "lora_da_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s3", "r64: 112-113 KiB of shared memory"),
    (_99K, "lora_dy_kernel", ("fp32",), ALL_RANKS, "32×64 w4 s4", "spills 24 B (3.6 sm_86/89), 8-16 B (sm_120)"),
    ((86, 89), "lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s4", "spills 8-16 B (3.9)"),
    ((86, 89), "lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s3", "spills 8-16 B (3.9)"),
    ((86, 89), "lora_down_kernel", ("fp32",), ALL_RANKS, "32×64 w4 s4", "spills 8 B at 128 registers (3.9)"),
    ((120,), "lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×64 w4 s5", "spills 16 B (3.9)"),
    ((120,), "lora_fwd_kernel", ("half",), _HALF_WIDE_R, "64×128×64 w4 s4", "r64: spills 16-48 B (3.6, 3.9)"),
    ((120,), "lora_dx_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×64 w4 s5", "spills 16 B (3.6)"),
    ((120,), "lora_down_kernel", ("half",), ALL_RANKS, "64×128 w8 s3", "spills 8 B at 80 registers (3.9)"),
    ((120,), "lora_down_kernel", ("fp32",), ALL_RANKS, "64×32 w4 s4", "spills 8 B (3.6)"),
    ((120,), "lora_down_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s3", "r64: spills 16 B (3.9)"),
    # sm_100 (B200)
    ((100,), "lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×64 w4 s5", "spills 8 B (3.6)"),
    ((100,), "lora_dx_kernel", ("half",), ALL_RANKS, "64×64×64 w4 s5", "spills 16 B (3.6)"),
    ((100,), "lora_down_kernel", ("fp32-adapters",), ALL_RANKS, "64×128 w8 s3", "spills 8 B (3.6, 3.9)"),
    ((100,), "lora_down_kernel", ("half",), ALL_RANKS, "64×64 w4 s4", "r64: spills 16 B (3.9)"),
    ((100,), "lora_dy_kernel", ("fp32",), ALL_RANKS, "64×32 w4 s4", "spills 16 B (3.9)"),
    ((100,), "lora_dy_kernel", ("fp32",), ALL_RANKS, "32×64 w4 s4", "spills 8 B (3.6)"),
    ((100,), "lora_da_kernel", ("fp32-adapters",), ALL_RANKS, "64×128 w8 s3", "spills 8 B at 128 registers (3.9)"),
    ((100,), "lora_dx_add_kernel", ("fp32",), ALL_RANKS, "32×128 w4 s1", "spills 8 B at 128 registers (3.9)"),
    ((100,), "lora_dx_add_kernel", ("fp32-adapters",), ALL_RANKS, "32×128 w4 s1",
     "spills 16 B at 128 registers (3.9, since the seed is read from memory)"),
    ((120,), "lora_down_kernel", ("fp32-adapters",), ALL_RANKS, "64×64 w8 s3", "spills 16 B (3.9)"),
    ((120,), "lora_dy_kernel", ("fp32-adapters",), ALL_RANKS, "64×64 w4 s4", "spills 8 B (3.9)"),
    # QLoRA (kernels/lora_4bit.py)
    (_99K, "lora_fwd_4bit_kernel", ("half",), ALL_RANKS, "128×128×32 w8 s4", "r64: 144-145 KiB of shared memory"),
    (_99K, "lora_dx_4bit_kernel", ("half",), ALL_RANKS, "128×128×32 w8 s4", "r64: 144-145 KiB of shared memory"),
    ((100,), "lora_fwd_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s4", "r64: spills 8 B (3.9)"),
    ((100, 120), "lora_fwd_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s3", "r64: spills 8-16 B (3.9)"),
    ((80,), "lora_fwd_4bit_kernel", ("half",), _HALF_WIDE_R, "64×64×32 w4 s5", "r64: spills 8 B (3.9)"),
    ((100,), "lora_dx_4bit_kernel", ("half",), _HALF_WIDE_R, "64×64×32 w4 s5", "r64: spills 8 B (3.6)"),
    ((80,), "lora_dx_4bit_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×32 w4 s5", "spills 8 B (3.6)"),
    ((90, 100), "lora_fwd_4bit_kernel", ("fp32",), ALL_RANKS, "32×64×32 w4 s5", "no wgmma/tcgen05 for 32 rows (3.9)"),
    ((90, 100), "lora_dx_4bit_kernel", ("fp32",), ALL_RANKS, "32×64×32 w4 s5", "no wgmma/tcgen05 for 32 rows (3.9)"),
    # DoRA (kernels/dora.py)
    ((80, 86, 89, 120), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s3",
     "p = 0: spills 8 B (3.9)"),
    ((120,), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s4", "p = 0: spills 8 B (3.9)"),
    ((120,), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×64 w4 s4", "p > 0: spills 8 B (3.9)"),
    (_99K, "dora_fwd_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s4", "r64, p = 0: 160 KiB of shared memory"),
    (_99K, "dora_fwd_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s3", "r64, p = 0: 112 KiB of shared memory"),
    (_99K, "dora_fwd_kernel", ("half",), _HALF_WIDE_R, "64×128×64 w4 s4", "r64, p = 0: 104 KiB of shared memory"),
    (_99K, "dora_fwd_kernel", ("half",), _HALF_WIDE_R, "64×64×64 w4 s5", "r64, p = 0: 104 KiB of shared memory"),
    ((80, 86, 89, 120), "dora_dy_kernel", ("half",), _HALF_WIDE_R, "64×128 w8 s3", "r64: spills 24 B (3.9)"),
    ((80, 86, 89), "dora_dy_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s3", "r64: spills 16-40 B (3.9)"),
    ((120,), "dora_dy_kernel", ("fp32",), ALL_RANKS, "64×32 w4 s4", "spills 40 B (3.9)"),
    ((120,), "dora_dx_kernel", ("half", "fp32-adapters"), ALL_RANKS, "64×128×64 w8 s3", "spills 8 B (3.9)"),
    ((120,), "dora_down_kernel", ("half",), _HALF_WIDE_R, "64×64 w4 s4", "r64: spills 8 B (3.9)"),
    ((100,), "dora_down_kernel", ("half", "fp32-adapters"), ALL_RANKS, "64×64 w4 s4", "spills 8-16 B (3.9)"),
    ((100,), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s3", "p = 0: spills 32 B (3.6)"),
    ((100,), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s4", "p = 0: spills 32 B (3.6)"),
    ((80, 86, 89), "dora_dy_kernel", ("half",), _HALF_WIDE_R, "64×64 w4 s4", "r64: spills 8-16 B (3.6)"),
    ((86, 89), "dora_dy_kernel", ("fp32-adapters",), ALL_RANKS, "64×64 w4 s4", "p = 0: spills 16 B (3.6)"),
    ((100,), "dora_dy_kernel", ("fp32-adapters",), ALL_RANKS, "32×64 w8 s3", "spills 8 B (3.6)"),
    # since g is an IEEE-rounded division (tl.div_rn: PyTorch's quotient, the same g in the forward and the dY pass):
    # 255 registers and a spill with triton 3.6 only (3.9 compiles both)
    ((86, 89), "dora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s4",
     "p = 0, conv1d: spills 8 B at 255 registers (3.6)"),
    ((90,), "dora_dy_kernel", ("fp32-adapters",), ALL_RANKS, "64×64 w4 s4",
     "p = 0, split 1: spills 16 B at 255 registers (3.6)"),
    # Several adapters on one base (kernels/multi_lora.py, multi_lora_4bit.py): the single-adapter kernels' tiles with
    # the segment's tables, rank and offsets besides; each kernel measured on its own (CI matrix on sm_80/sm_90, the
    # sample on the others, every config, both tritons: bench/results/compile-multi/).
    (_99K, "multi_lora_da_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s3",
     "r64: spills 80 B at 255 registers, 112-113 KiB of shared memory (3.6, 3.9)"),
    ((120,), "multi_lora_da_kernel", ("fp32-adapters",), _HALF_WIDE_R, "32×128 w4 s4",
     "r64: spills 24-48 B (3.6, 3.9)"),
    (_99K, "multi_lora_down_kernel", ("fp32-adapters",), _HALF_WIDE_R, "64×64 w8 s3",
     "r64: spills 8-24 B at 255 registers (3.9)"),
    ((100,), "multi_lora_down_kernel", ("half",), _HALF_WIDE_R, "64×64 w4 s4",
     "r64: spills 8 B at 128 registers (3.9)"),
    ((100, 120), "multi_lora_down_kernel", ("half",), _HALF_WIDE_R, "64×128 w8 s3",
     "r64: spills 16-40 B at 128 registers (3.9)"),
    ((80, 86, 89), "multi_lora_dx_4bit_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×32 w4 s5",
     "spills 16 B at 128 registers (3.6)"),
    (_99K, "multi_lora_dx_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s4",
     "r64: spills 16 B at 255 registers, 144-145 KiB of shared memory (3.6, 3.9)"),
    ((90,), "multi_lora_dx_4bit_kernel", ("fp32",), ALL_RANKS, "32×64×32 w4 s5", "no wgmma for 32 rows (3.6, 3.9)"),
    ((120,), "multi_lora_dx_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s3",
     "r64: spills 16 B at 255 registers (3.9)"),
    ((86, 89), "multi_lora_dx_add_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s1",
     "r64: spills 8 B at 128 registers (3.6)"),
    ((120,), "multi_lora_dx_add_kernel", ("half",), _HALF_WIDE_R, "64×128 w8 s1",
     "r64: spills 8 B at 128 registers (3.9)"),
    (_99K, "multi_lora_dx_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s4",
     "r64: spills 24 B at 255 registers, 144-145 KiB of shared memory (3.6, 3.9)"),
    ((120,), "multi_lora_dx_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s3",
     "r64: spills 24 B at 255 registers (3.9)"),
    ((75,), "multi_lora_dy_kernel", ("fp32-adapters",), ALL_RANKS, "32×64 w8 s3", "spills 8 B at 64 registers (3.6)"),
    ((80,), "multi_lora_dy_kernel", ("fp32",), ALL_RANKS, "32×64 w4 s4", "spills 8 B at 255 registers (3.6)"),
    ((80, 86, 89, 90, 120), "multi_lora_dy_kernel", ("fp32-adapters",), _HALF_WIDE_R, "64×64 w4 s4",
     "r64: spills 8-112 B at 255 registers (3.6, 3.9)"),
    ((80, 86, 89, 100, 120), "multi_lora_dy_kernel", ("half",), _HALF_WIDE_R, "128×64 w8 s3",
     "r64: spills 8-104 B (3.6, 3.9)"),
    ((80, 86, 89, 120), "multi_lora_dy_kernel", ("half",), _HALF_WIDE_R, "64×128 w8 s3",
     "r64: spills 16-80 B (3.6, 3.9)"),
    ((80, 86, 89, 120), "multi_lora_dy_kernel", ("half",), _HALF_WIDE_R, "64×64 w4 s4",
     "r64: spills 32-72 B at 255 registers (3.6, 3.9)"),
    ((80,), "multi_lora_fwd_4bit_kernel", ("fp32",), ALL_RANKS, "64×64×32 w4 s5", "spills 8-24 B (3.6, 3.9)"),
    ((80, 86, 89), "multi_lora_fwd_4bit_kernel", ("fp32-adapters",), ALL_RANKS, "64×64×32 w4 s5",
     "spills 8-16 B at 128 registers (3.6)"),
    ((80, 86, 89, 120), "multi_lora_fwd_4bit_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×32 w8 s3",
     "spills 8-64 B at 255 registers (3.6, 3.9)"),
    ((80, 86, 89, 120), "multi_lora_fwd_4bit_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×32 w8 s4",
     "spills 8-64 B at 255 registers (3.6, 3.9)"),
    (_99K, "multi_lora_fwd_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s4",
     "r64: spills 24 B at 255 registers, 144-145 KiB of shared memory (3.6, 3.9)"),
    ((90,), "multi_lora_fwd_4bit_kernel", ("fp32",), ALL_RANKS, "32×64×32 w4 s5", "no wgmma for 32 rows (3.6, 3.9)"),
    ((120,), "multi_lora_fwd_4bit_kernel", ("half",), _HALF_WIDE_R, "128×128×32 w8 s3",
     "r64: spills 24 B at 255 registers (3.9)"),
    ((80,), "multi_lora_fwd_kernel", ("fp32",), ALL_RANKS, "64×64×32 w4 s5", "spills 16 B at 255 registers (3.9)"),
    ((80, 86, 89, 120), "multi_lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s3",
     "spills 8-40 B at 255 registers (3.6, 3.9)"),
    ((80, 86, 89, 120), "multi_lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "128×128×64 w8 s4",
     "spills 8-40 B at 255 registers (3.6, 3.9)"),
    ((80, 120), "multi_lora_fwd_kernel", ("fp32-adapters",), ALL_RANKS, "64×128×64 w4 s4",
     "spills 8-16 B at 255 registers (3.9)"),
    ((86, 89, 100, 120), "multi_lora_fwd_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s4",
     "r64: spills 8 B, 144-145 KiB of shared memory (3.6, 3.9)"),
    ((90,), "multi_lora_fwd_kernel", ("fp32",), ALL_RANKS, "32×64×32 w4 s5", "no wgmma for 32 rows (3.6, 3.9)"),
    ((100, 120), "multi_lora_fwd_kernel", ("half",), _HALF_WIDE_R, "64×128×64 w4 s4", "r64: spills 16-80 B (3.6, 3.9)"),
    ((120,), "multi_lora_fwd_kernel", ("half",), _HALF_WIDE_R, "128×128×64 w8 s3",
     "r64: spills 8-16 B at 255 registers (3.6, 3.9)"),
    ((80,), "multi_lora_up_add_kernel", ("fp32-adapters",), ALL_RANKS, "64×128 w8 s1",
     "spills 8-16 B at 128 registers (3.6, 3.9)"),
    ((80, 90), "multi_lora_up_add_kernel", ("fp32-adapters",), ALL_RANKS, "32×128 w4 s1",
     "spills 8-16 B at 128 registers (3.6)"),
]
