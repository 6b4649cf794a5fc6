"""Launch configurations: a small pruned list per kernel on GPU, one config under the interpreter.

``TRITON_INTERPRET=1`` must be set before this module is imported: ``triton.jit`` reads it at
decoration time, so it is read once here too and every launcher follows the same answer.
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
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
_GEMM_128_S4 = _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_128_S3 = _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_64x128 = _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
_GEMM_64x64 = _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
_GEMM_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
GEMM_CONFIGS = pick([_GEMM_128_S4, _GEMM_128_S3, _GEMM_64x128, _GEMM_64x64], _GEMM_INTERP)

# dX leaves out the 64×128 tile: with 4 warps it spilled 8 B per thread on sm_80 in every dtype (triton 3.6
# with bf16 adapters, 3.9 with fp32 ones); the forward compiles it cleanly.
DX_CONFIGS = pick([_GEMM_128_S4, _GEMM_128_S3, _GEMM_64x64], _GEMM_INTERP)

# Skinny GEMMs of the rank-r branch (S = x_d Aᵀ, dS/dB pass over dY, dA = dSᵀ x_d): memory-bound
# streams over an M×K or M×N operand; BLOCK_R covers the (padded) rank, up to 64 per program.
# Pruned with bench/compile_report.py (sm_90, bf16, r=16, dropout on): 128×128 tiles spill 40-352 B of
# stack per thread (the Philox state and the fp32 accumulators), these four do not.
_SK_64x64 = _cfg(4, 4, BLOCK_M=64, BLOCK_K=64)
_SK_64x128 = _cfg(8, 3, BLOCK_M=64, BLOCK_K=128)
_SK_128x64 = _cfg(8, 3, BLOCK_M=128, BLOCK_K=64)
_SK_32x128 = _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)
_SKINNY_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_K=32)
SKINNY_CONFIGS = pick([_SK_64x64, _SK_64x128, _SK_128x64, _SK_32x128], _SKINNY_INTERP)

# Per dtype, where a config must go (kernels/*.py pass these to ``by_dtype``):
# - the dy pass with fp32 adapters: both 8-warp tiles spilled 8 B on sm_90 with triton 3.6 (255 registers:
#   dY is used in two layouts, B and S split for 3xTF32);
DY_CONFIGS_FP32_ADAPTERS = pick([_SK_64x64, _SK_32x128], _SKINNY_INTERP)
# - the dy pass with half adapters at 32×128: rank 64 (BLOCK_R 64) spilled 288 B on sm_80 with triton 3.9;
DY_CONFIGS_HALF_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_128x64], _SKINNY_INTERP)
# - S = x Aᵀ with half adapters at 32×128 and dA with fp32 adapters at 128×64 (no dropout, SPLIT_M 1) spill
#   12-16 B with triton 3.9 only, at 80 and 128 registers: its ptxas 13.4 under Triton's
#   --regAllocOptLevel=2 workaround; the same PTX through that ptxas without the flag has no stack, and
#   triton 3.6 (the GPU image's) compiles both cleanly. Dropped so that both tritons pass.
DOWN_CONFIGS_HALF_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_128x64], _SKINNY_INTERP)
DA_CONFIGS_FP32_ADAPTERS = pick([_SK_64x64, _SK_64x128, _SK_32x128], _SKINNY_INTERP)

# fp32 base operands (x, dY fp32; 3xTF32 splits both operands of the base dots): BLOCK_K halved, so a
# pipeline stage takes the shared memory of its 16-bit tile (unhalved, 128×128×64 in fp32 is 64 KiB a stage:
# 4 stages are over sm_90's 227 KiB a block, 3 over sm_80's 163 KiB), and only the tiles that do not spill:
# on sm_80 128×128×32 spilled 8-376 B, 64×128×32 96-216 B; the dy pass spilled 48-568 B at every 16-bit
# tile and 40 B at 64×64 with 8 warps, S = x Aᵀ 8 B there.
GEMM_CONFIGS_FP32 = pick([_cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)], _GEMM_INTERP)
SKINNY_CONFIGS_FP32 = pick(
    [
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=32),
        _cfg(4, 4, BLOCK_M=32, BLOCK_K=64),
    ],
    _SKINNY_INTERP,
)
# The dy pass in fp32 also spilled 8 B at 128×32 with 8 warps on sm_80 (triton 3.6).
DY_CONFIGS_FP32 = pick([_cfg(4, 4, BLOCK_M=64, BLOCK_K=32), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64)], _SKINNY_INTERP)


def by_dtype(base: str, fp32_base: list[triton.Config], fp32_adapters=None, half_adapters=None):
    """``early_config_prune``: the config list for the dtype of the ``base`` pointer argument and of the
    adapters (the ``LORA_DOT`` constexpr); None keeps the kernel's own list. The autotuner's key holds the
    argument dtypes (and ``LORA_DOT`` where no adapter tensor is an argument), so each pair is tuned apart."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if named_args[base].element_size() == 4:
            return fp32_base
        chosen = fp32_adapters if kwargs["LORA_DOT"] == tl.float32 else half_adapters
        return configs if chosen is None else chosen

    return prune
