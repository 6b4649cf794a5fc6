"""Launch configurations: a small pruned list per kernel on GPU, one config under the interpreter.

``TRITON_INTERPRET=1`` must be set before this module is imported: ``triton.jit`` reads it at
decoration time, so it is read once here too and every launcher follows the same answer.
"""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def pick(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # Autotuning under the interpreter would interpret every config: collapse to one. The interpreter
    # config uses 32-wide tiles so that the small CPU test shapes still span several tiles (edge masks,
    # grouped ordering, rank chunks) while keeping the number of interpreted programs low.
    return [interpreter] if INTERPRET else gpu


# Every config below is compiled for sm_80 and sm_90 with triton 3.6 and the newest by CI (bench/compile_report.py,
# tests/test_compile_targets.py): no spills, registers and shared memory within the limits, tensor cores;
# the numbers are in bench/results/compile/.

# Base GEMM with the rank-r term folded in (forward y, backward dX). Tiles from the Triton matmul
# tutorial's Hopper list, pruned to the ones that suit K, N >= 768 (transformer projections) and do not
# spill on sm_90 in bf16 (bench/compile_report.py before it reproduced the JIT's specialization, which
# counts more registers: 128×256 with 8 warps spilled 248 B, 128×128 with 4 warps 424 B). fp32 operands
# halve BLOCK_K (fit_to_base_dtype).
GEMM_CONFIGS = pick(
    [
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
    _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
)



def fit_to_base_dtype(operand: str):
    """``early_config_prune`` of the GEMM kernels: the tiles above are sized for 16-bit operands; with fp32
    ``operand`` BLOCK_K is halved so that a pipeline stage takes the same shared memory. (Unhalved, a
    128×128×64 fp32 stage is 64 KiB: 4 stages need 256 KiB, over sm_90's 227 KiB a block, 3 over sm_80's
    163 KiB; bench/compile_report.py checks every config that remains.)"""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if INTERPRET or named_args[operand].element_size() < 4:
            return configs
        return [triton.Config({**c.kwargs, "BLOCK_K": c.kwargs["BLOCK_K"] // 2}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in configs]

    return prune


# Skinny GEMMs of the rank-r branch (S = x_d Aᵀ, dS/dB pass over dY, dA = dSᵀ x_d): memory-bound
# streams over an M×K or M×N operand; BLOCK_R covers the (padded) rank, up to 64 per program.
# Pruned with bench/compile_report.py (sm_90, bf16, r=16, dropout on): 128×128 tiles spill 40-352 B of
# stack per thread (the Philox state and the fp32 accumulators), these five do not.
SKINNY_CONFIGS = pick(
    [
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=32, BLOCK_K=128),
    ],
    _cfg(4, 1, BLOCK_M=32, BLOCK_K=32),
)
