"""DRAM traffic and roofline MODEL of one LoRA linear layer, forward + backward. A MODEL, not a measurement.

    python bench/traffic_model.py [--only LoRAFusion] [--kernels] [--adapter-dtype fp32] [--rank 64]
    python bench/traffic_model.py --json m.json --markdown m.md
    python bench/traffic_model.py --multi [--adapters 1 2 4 8] [--tokens 512]   # n adapters on one base: concurrent
                                                                                # vs sequential (multi-adapter section)

Bytes read and written and matmul FLOPs per kernel of y = x Wᵀ + b + s·(m⊙x)Aᵀ Bᵀ and its gradients
for: the frozen base alone (the floor), fused-lora (2 + 3 launches), the composed path (cuBLAS base GEMMs +
kernels/lora_compose.py), PEFT's eager ops, torch.compile of bench/providers.py's naive layer and LoRAFusion's
design (lora_v1.py); then roofline times per device. Assumptions:

1. Every tensor a kernel writes goes to DRAM, and every read of another kernel's output comes from DRAM: true
   when activations exceed L2 (8192×4096 bf16 is 64 MiB); for small shapes (GPT-2 at M=1024) L2 absorbs some,
   so the model overstates traffic there, the eager paths' most. Tiny tensors (A, B, S, dS) count once.
2. "GiB once": each tensor read once per kernel that uses it. Per device, GEMMs run in grouped (GROUP_M) tile
   order: the GROUP_M·BLOCK_M-row activation panel is reused from L2 by its group's column tiles and the weight
   is swept once per group, i.e. re-read ceil(M/(BM·GROUP_M)) times unless weight + panel fit in the usable L2;
   the panel is re-read once per wave of the group (SMs tiles at a time) when panel + the weight columns one
   wave streams do not fit (the weight evicts it). Usable L2 = half of it on A100/H100 (two partitions, each
   caching what its SMs touch: NVIDIA A100 whitepaper, "L2 cache"; assumed alike on H100), all of it on L4/T4.
   cuBLAS's tiles are not public: grouped too, with whichever of 128×128, 128×256, 256×128 moves least.
   Skinny kernels (S = x Aᵀ, the dY pass, dA) stream x or dY once per rank-chunk program column (chunk after chunk)
   unless it fits in L2. Their chunk is triton_launch.skinny_rank_block's: min(64, max(16, next_pow2(r))) for every
   adapter dtype, so r <= 64 reads x or dY once and r = 128 twice; 16 on Turing (FMA dots), so a T4 at r = 64 reads
   them 4 times. The GEMMs loop over the rank inside each program (triton_launch.rank_block: chunks of 16 for fp32
   adapters, up to 64 for half ones): their chunk changes no byte here, each program reads its S and B (dS and A)
   rows once whatever the chunk.
3. Roofline time = Σ over kernels of max(bytes/BW, FLOPs/peak) (a memory-bound op does not hide behind a GEMM);
   peak = dense 16-bit tensor-core rate for every matmul, elementwise FLOPs ignored; no launch overhead, no GEMM
   below peak. Launches are shown instead (compute kernels; fused-lora adds 2-4 tiny torch.zeros fills).
4. torch.compile (default mode): matmuls stay cuBLAS (extern); elementwise ops fuse per producer/consumer. One
   pointwise kernel draws the mask and writes x_d (the mm's input) and the bool mask, which the partitioner
   saves instead of x_d (measured here on CPU: 10.1 MiB saved = x + bool mask, bench/results/cpu-2026-11-24);
   backward recomputes x_d for dA in the same pointwise kernel as dropout backward + the dX accumulation.
5. PEFT (tuners/lora/layer.py): result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling, one
   eager op each; CUDA dropout writes x_d and a bool mask, both saved. fp32 adapters on a bf16 base (PEFT's
   autocast_adapter_dtype default) add x.to(fp32), an fp32 branch, a promoting add, a cast back, and their
   backwards. LoRAFusion's "Torch LoRA" is the bf16 case.

LoRAFusion's published figures (arXiv 2510.00206; H100, bf16, r=16, p=0.1, ncu dram__bytes; their
benchmarks_paper/plots/evaluation-fig-7-kernel-ncu-profile.py): fwd+bwd at 8192×4096×4096 1.258 GiB (fused) vs 2.008
GiB (Torch LoRA); kernels 1.27× average, 1.39× best faster than Torch LoRA. Their design writes x_d and a bool mask
in a separate dropout kernel and reads them back (S = x_d Aᵀ, dA = dSᵀ x_d, the mask in dX); fused-lora regenerates
the mask from a Philox seed inside the S, dX and dA kernels and writes neither. Compulsory traffic ("GiB once") is
0.69 GiB of their 1.258 and 1.63 of Torch LoRA's 2.008: the rest is GEMM re-reads (assumption 2), so the H100 column
is the one to compare: it lands 3-8% below (eager) and 6-13% below (their design) at their three published shapes.
The binary fits-in-L2 rule flips near its threshold: fused-lora's 128×128 tile at K=4096 needs 25.7 MB of 25 MB
usable on H100, so its GEMMs re-read x twice there (no effect on time: those GEMMs are compute-bound).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace

GIB = 2**30

# Tiles mirrored from kernels/configs.py (not imported: that imports triton). (BLOCK_M, BLOCK_N, GROUP_M):
# GEMM_CONFIGS / DX_CONFIGS list _GEMM_128_S4 first (autotune may pick another; only BLOCK_M and GROUP_M
# change the model). The skinny kernels' BLOCK_M does not enter it.
FUSED_TILE = ((128, 128, 8),)
# fused_lora/backends/triton_launch.skinny_rank_block: the skinny kernels' rank chunk per program column,
# min(64, max(16, next_pow2(r))) for every adapter dtype, 16 where tl.dot runs on FMA units (Turing).
BLOCK_R_MIN, BLOCK_R_MAX = 16, 64
CUBLAS_TILE = ((128, 128, 8), (128, 256, 8), (256, 128, 8))  # assumption 2: cuBLAS takes the one moving least
LORAFUSION_TILE = ((128, 256, 8),)  # lorafusion/ops/triton_ops/config.py, H100_CONFIG fused_lora_xw_sb(_tma)/dyw_dsa


@dataclass(frozen=True)
class Device:
    name: str
    bw: float  # DRAM bytes/s
    peak: float  # dense 16-bit tensor-core FLOP/s
    l2: float  # bytes
    l2_share: float  # usable fraction for data shared by all SMs (assumption 2)
    sms: int
    fma_dots: bool = False  # Triton's tl.dot runs on FMA units (Turing): the skinny kernels take 16-rank chunks


DEVICES = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 3.35 TB/s HBM3, BF16 1,979 TFLOPS with sparsity → 989.4 dense;
    # H100 architecture whitepaper: 132 SMs, 50 MB L2.
    Device("H100 SXM", 3.35e12, 989.4e12, 50e6, 0.5, 132),
    # NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s, BF16 312 TFLOPS dense; A100 whitepaper: 108 SMs, 40 MB L2.
    Device("A100 80GB SXM", 2.039e12, 312e12, 40e6, 0.5, 108),
    # NVIDIA L4 datasheet: 300 GB/s, BF16 242 TFLOPS with sparsity → 121 dense, 7,424 CUDA cores = 58 SMs;
    # 48 MB L2 (AD104; TechPowerUp, not in the datasheet).
    Device("L4", 300e9, 121e12, 48e6, 1.0, 58),
    # NVIDIA T4 datasheet: 320 GB/s, FP16 mixed 65 TFLOPS, 2,560 CUDA cores = 40 SMs; Turing whitepaper: 4 MB L2.
    # Turing has NO bf16 tensor cores (bf16 matmuls run at the 8.1 TFLOPS fp32 rate): this column is fp16,
    # same bytes. And Triton emits no HMMA for our kernels on sm_75 (bench/results/compile/sm_75-*.md): fused-lora's
    # T4 time is optimistic.
    Device("T4 (fp16)", 320e9, 65e12, 4e6, 1.0, 40, fma_dots=True),
)


@dataclass(frozen=True)
class Shape:
    family: str
    name: str
    M: int
    K: int
    N: int
    r: int = 16
    p: float = 0.1
    bias: bool = False
    e: int = 2  # base element bytes (bf16)
    ea: int = 2  # adapter / LoRA-branch element bytes

    @property
    def label(self) -> str:
        return f"{self.family} {self.name} M={self.M} {self.K}→{self.N}"


def shapes(ea: int = 2) -> list[Shape]:
    out = [Shape("LoRAFusion", f"{k}", m, k, k, ea=ea) for k in (4096, 5120, 8192) for m in (2048, 4096, 8192)]
    gpt2 = (("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072), ("mlp.c_proj", 3072, 768))
    out += [Shape("GPT-2", n, m, k, nn, bias=True, ea=ea) for m in (1024, 4096) for n, k, nn in gpt2]
    gemma = (("q/o_proj", 2048, 2048), ("k/v_proj", 2048, 256), ("gate/up_proj", 2048, 16384),
             ("down_proj", 16384, 2048))
    out += [Shape("Gemma-2B", n, 4096, k, nn, ea=ea) for n, k, nn in gemma]
    gemma2 = (("q_proj", 2304, 2048), ("k/v_proj", 2304, 1024), ("o_proj", 2048, 2304), ("gate/up_proj", 2304, 9216),
              ("down_proj", 9216, 2304))
    out += [Shape("Gemma-2-2B", n, 4096, k, nn, ea=ea) for n, k, nn in gemma2]
    return out


@dataclass
class Kernel:
    name: str
    read: float
    write: float
    flops: float = 0.0
    launches: int = 1  # GPU launches it stands for (0: counted per step elsewhere, not per layer)

    @property
    def bytes(self) -> float:
        return self.read + self.write


def _usable_l2(d: Device) -> float:
    return d.l2 * d.l2_share


def _operand_reads(M: int, N: int, K: int, e: int, d: Device | None, tile: tuple[int, int, int]) -> float:
    """DRAM bytes of A[M×K] and B[K×N] read by a grouped-order GEMM with ``tile`` (assumption 2)."""
    a_reads, b_reads = _operand_reread(M, N, K, e, d, tile)
    return M * K * e * a_reads + K * N * e * b_reads


def _operand_reread(M: int, N: int, K: int, e: int, d: Device | None, tile: tuple[int, int, int]) -> tuple[int, int]:
    """How many times a grouped-order GEMM with ``tile`` reads A[M×K] (the activation) and B[K×N] (the weight) from
    DRAM (assumption 2): (1, 1) without a device."""
    if d is None:
        return 1, 1
    bm, bn, group = tile
    b = K * N * e
    rows, n_tiles = min(group, math.ceil(M / bm)), math.ceil(N / bn)
    panel, w_wave = rows * bm * K * e, min(n_tiles, math.ceil(d.sms / rows)) * bn * K * e
    rb = 1 if b + panel <= _usable_l2(d) else math.ceil(M / (bm * group))
    ra = 1 if panel + w_wave <= _usable_l2(d) else math.ceil(rows * n_tiles / d.sms)
    return ra, rb


def weight_reads(M: int, N: int, K: int, e: int, d: Device | None, tile: tuple[int, int, int] = FUSED_TILE[0]) -> float:
    """DRAM bytes of the frozen weight (K×N, ``e`` bytes) read by one of fused-lora's GEMMs over M rows."""
    return K * N * e * _operand_reread(M, N, K, e, d, tile)[1]


def _gemm(name: str, M: int, N: int, K: int, e: int, d: Device | None, tiles: tuple[tuple[int, int, int], ...],
          extra_read: float = 0, extra_flops: float = 0) -> Kernel:
    """C[M×N] = A[M×K] · B[K×N] with A the activation (x or dY) and B the weight, both ``e`` bytes: reads A and B
    (with the re-reads of the best of ``tiles``) and ``extra_read``; writes C."""
    ab = min(_operand_reads(M, N, K, e, d, t) for t in tiles)
    return Kernel(name, ab + extra_read, M * N * e, 2 * M * N * K + extra_flops)


def _stream(nbytes: float, chunks: int, d: Device | None) -> float:
    """An M×K or M×N operand read by ``chunks`` program columns of a skinny kernel (assumption 2)."""
    return nbytes if d is None or chunks == 1 or nbytes <= _usable_l2(d) else nbytes * chunks


def _rank_chunks(s: Shape, d: Device | None) -> int:
    """Rank-chunk program columns of a skinny kernel (triton_launch.skinny_rank_block), whatever the adapters' dtype."""
    if d is not None and d.fma_dots:
        return math.ceil(s.r / BLOCK_R_MIN)
    return math.ceil(s.r / min(BLOCK_R_MAX, max(BLOCK_R_MIN, 1 << (s.r - 1).bit_length())))


def lora_down(s: Shape, d: Device | None, n: int = 1) -> Kernel:
    """S = (m⊙x)Aᵀ: reads x (once per rank chunk) and A; writes S (M×r fp32). Mask from the seed: no traffic.
    ``n`` adapters on segments of the M rows (the segmented kernel): each tile reads its own adapter's A."""
    M, K, r = s.M, s.K, s.r
    return Kernel("lora_down_kernel: S = (m⊙x)Aᵀ", _stream(M * K * s.e, _rank_chunks(s, d), d) + n * r * K * s.ea,
                  M * r * 4, 2 * M * K * r)


def lora_dy(s: Shape, d: Device | None, n: int = 1) -> Kernel:
    """One pass over dY: reads dY (once per rank chunk), S, B; writes dS (M×r fp32) and dB (N×r fp32, atomics in L2);
    per adapter with ``n`` segments."""
    M, N, r = s.M, s.N, s.r
    return Kernel("lora_dy_kernel: dS, dB",
                  _stream(M * N * s.e, _rank_chunks(s, d), d) + M * r * 4 + n * N * r * s.ea,
                  M * r * 4 + n * N * r * 4, 4 * M * N * r)


def lora_da(s: Shape, d: Device | None, n: int = 1) -> Kernel:
    """dA = dSᵀ(m⊙x): reads dS and x (once per rank chunk; mask regenerated); writes dA (r×K fp32) per adapter."""
    M, K, r = s.M, s.K, s.r
    return Kernel("lora_da_kernel: dA = dSᵀ(m⊙x)", M * r * 4 + _stream(M * K * s.e, _rank_chunks(s, d), d),
                  n * r * K * 4, 2 * M * K * r)


def path_base(s: Shape, d: Device | None) -> list[Kernel]:
    """The frozen layer alone: cuBLAS y = xWᵀ + b and dX = dY W (no activation saved)."""
    M, K, N = s.M, s.K, s.N
    return [_gemm("cuBLAS y = xWᵀ + b", M, N, K, s.e, d, CUBLAS_TILE, extra_read=N * s.e * s.bias),
            _gemm("cuBLAS dX = dY W", M, K, N, s.e, d, CUBLAS_TILE)]


def path_fused(s: Shape, d: Device | None, n: int = 1) -> list[Kernel]:
    """fused-lora: lora_down, lora_fwd (x, W, S, B in; y out), lora_dy, lora_dx (dY, W, dS, A in; dX out), lora_da.
    ``n`` > 1: the segmented kernels (kernels/multi_lora.py) of ``n`` adapters of rank r on segments of the M rows:
    the same five launches, W read as for one adapter over M rows, every adapter tensor n times."""
    M, K, N, r, e, ea = s.M, s.K, s.N, s.r, s.e, s.ea
    return [
        lora_down(s, d, n),
        _gemm("lora_fwd_kernel: y = xWᵀ + b + s·S Bᵀ", M, N, K, e, d, FUSED_TILE,
              extra_read=M * r * 4 + n * N * r * ea + N * e * s.bias, extra_flops=2 * M * N * r),
        lora_dy(s, d, n),
        _gemm("lora_dx_kernel: dX = dY W + m⊙(dS A)", M, K, N, e, d, FUSED_TILE,
              extra_read=M * r * 4 + n * r * K * ea, extra_flops=2 * M * K * r),
        lora_da(s, d, n),
    ]


def path_composed(s: Shape, d: Device | None) -> list[Kernel]:
    """cuBLAS base GEMMs; kernels/lora_compose.py adds the rank-r terms in place (one more read + write of y, dX)."""
    M, K, N, r, e, ea = s.M, s.K, s.N, s.r, s.e, s.ea
    fwd, bwd = path_base(s, d)
    return [
        fwd, lora_down(s, d),
        Kernel("lora_up_add_kernel: y += s·S Bᵀ", M * N * e + M * r * 4 + N * r * ea, M * N * e, 2 * M * N * r),
        lora_dy(s, d), bwd,
        Kernel("lora_dx_add_kernel: dX += m⊙(dS A)", M * K * e + M * r * 4 + r * K * ea, M * K * e, 2 * M * K * r),
        lora_da(s, d),
    ]


def path_peft(s: Shape, d: Device | None) -> list[Kernel]:
    """PEFT's eager ops (assumption 5), one kernel each; casts only when the adapters' dtype differs."""
    M, K, N, r, e, ea = s.M, s.K, s.N, s.r, s.e, s.ea
    x, y, cast, drop, eo = M * K, M * N, ea != e, s.p > 0, max(s.e, s.ea)
    fwd, bwd = path_base(s, d)
    ks = [fwd]
    ks += [Kernel("x.to(adapter dtype)", x * e, x * ea)] * cast
    ks += [Kernel("dropout: x_d, bool mask (saved)", x * ea, x * ea + x)] * drop
    ks += [
        Kernel("lora_A: U = x_d Aᵀ", x * ea + r * K * ea, M * r * ea, 2 * M * K * r),
        Kernel("lora_B: T = U Bᵀ (M×N)", M * r * ea + N * r * ea, y * ea, 2 * M * N * r),
        Kernel("T * scaling (M×N)", y * ea, y * ea),
        Kernel("result + T (M×N)", y * e + y * ea, y * eo),
    ]
    ks += [Kernel("result.to(x dtype)", y * eo, y * e), Kernel("bwd .to: dY → fp32", y * e, y * ea),
           Kernel("bwd +: grad of result → x dtype", y * ea, y * e)] * cast
    ks += [
        Kernel("bwd *scaling: dT", y * ea, y * ea),
        Kernel("bwd lora_B: dU = dT B", y * ea + N * r * ea, M * r * ea, 2 * M * N * r),
        Kernel("bwd lora_B: dB = dTᵀ U", y * ea + M * r * ea, N * r * ea, 2 * M * N * r),
        Kernel("bwd lora_A: dx_d = dU A (M×K)", M * r * ea + r * K * ea, x * ea, 2 * M * K * r),
        Kernel("bwd lora_A: dA = dUᵀ x_d", M * r * ea + x * ea, r * K * ea, 2 * M * K * r),
    ]
    ks += [Kernel("bwd dropout: dx_d ⊙ mask", x * ea + x, x * ea)] * drop
    ks += [Kernel("bwd x.to: → x dtype", x * ea, x * e)] * cast
    return ks + [bwd, Kernel("autograd: dX = dX_base + dX_lora", 2 * x * e, x * e)]


def path_compile(s: Shape, d: Device | None) -> list[Kernel]:
    """torch.compile(naive) per assumption 4: cuBLAS matmuls, fused pointwise kernels, bool mask saved."""
    M, K, N, r, e, ea = s.M, s.K, s.N, s.r, s.e, s.ea
    x, y, drop = M * K, M * N, s.p > 0
    fwd, bwd = path_base(s, d)
    ks = [Kernel("pointwise: rand → bool mask (saved), x_d", x * e, x * ea + x)] * drop
    ks += [
        Kernel("mm: U = x_d Aᵀ", x * ea + r * K * ea, M * r * ea, 2 * M * K * r),
        Kernel("mm: T = U Bᵀ (M×N)", M * r * ea + N * r * ea, y * ea, 2 * M * N * r), fwd,
        Kernel("pointwise: out = y0 + s·T", y * e + y * ea, y * e),
        Kernel("pointwise bwd: dT = s·dY", y * e, y * ea),
        Kernel("mm: dU = dT B", y * ea + N * r * ea, M * r * ea, 2 * M * N * r),
        Kernel("mm: dB = dTᵀ U", y * ea + M * r * ea, N * r * ea, 2 * M * N * r),
        Kernel("mm: dx_d = dU A (M×K)", M * r * ea + r * K * ea, x * ea, 2 * M * K * r),
    ]
    return ks + [bwd,  # then one pointwise kernel recomputes x_d for dA and finishes dX, reading the mask once
                 Kernel("pointwise: x_d = x⊙mask; dX = dX0 + mask⊙dx_d", x * (e + 1 + e + ea) if drop else x * (e + ea),
                        x * (ea + e) if drop else x * e),
                 Kernel("mm: dA = dUᵀ x_d", M * r * ea + x * ea, r * K * ea, 2 * M * K * r)]


def path_lorafusion(s: Shape, d: Device | None) -> list[Kernel]:
    """LoRAFusion lora_v1 (half adapters): dropout kernel (x_d + bool mask, both saved), S = x_d Aᵀ by torch, fused
    xW + s·S B GEMM; backward: dS/dB split kernel (fp32 atomics, cast back), dA = dSᵀ x_d by torch, fused dX GEMM
    reading the mask."""
    M, K, N, r, e = s.M, s.K, s.N, s.r, s.e
    x, drop = M * K, s.p > 0
    ks = [Kernel("seeded_dropout: x_d, bool mask", x * e, x * e + x)] * drop
    return ks + [
        Kernel("torch: S = x_d Aᵀ", x * e + r * K * e, M * r * e, 2 * M * K * r),
        _gemm("fused_lora_xw_sb: y = xWᵀ + s·S Bᵀ", M, N, K, e, d, LORAFUSION_TILE,
              extra_read=M * r * e + N * r * e + N * e * s.bias, extra_flops=2 * M * N * r),
        Kernel("fused_lora_dys_dyb: dS, dB (+ casts)", M * N * e + M * r * e + N * r * e + (M + N) * r * 4,
               (M + N) * r * (4 + e), 4 * M * N * r),
        Kernel("torch: dA = dSᵀ x_d", M * r * e + x * e, r * K * e, 2 * M * K * r),
        _gemm("fused_lora_dyw_dsa: dX = dY W + mask⊙dS A", M, K, N, e, d, LORAFUSION_TILE,
              extra_read=M * r * e + r * K * e + x * drop, extra_flops=2 * M * K * r),
    ]


PATHS = {"base": path_base, "fused": path_fused, "composed": path_composed, "peft": path_peft,
         "compile": path_compile, "lorafusion": path_lorafusion}


def model(s: Shape) -> dict:
    """Everything for one shape: per path compulsory bytes, FLOPs, launches, and per device bytes and ms."""
    out = {}
    for name, fn in PATHS.items():
        once = fn(s, None)
        entry = {"launches": len(once), "flops": sum(k.flops for k in once), "bytes_once": sum(k.bytes for k in once),
                 "kernels": [asdict(k) for k in once], "devices": {}}
        for d in DEVICES:  # roofline: assumption 3
            ks = fn(s, d)
            entry["devices"][d.name] = {"bytes": sum(k.bytes for k in ks), "kernel_bytes": [k.bytes for k in ks],
                                        "ms": 1e3 * sum(max(k.bytes / d.bw, k.flops / d.peak) for k in ks)}
        out[name] = entry
    return out


LORAFUSION_PUBLISHED = {  # GiB fwd+bwd, ncu on H100: (Torch LoRA, Fused LoRA); their kernels' speedup over eager
    "8192x4096x4096": (2.008, 1.258), "8192x5120x5120": (2.771, 1.836), "8192x8192x8192": (5.289, 4.044)}
LORAFUSION_SPEEDUP_AVG, LORAFUSION_SPEEDUP_BEST = 1.27, 1.39
ORDER = ("base", "fused", "composed", "peft", "compile", "lorafusion")
HEAD = DEVICES[0].name
BANNER = "MODEL, not a measurement: bytes and roofline times computed from the kernels' code (bench/traffic_model.py)."


# ---------------------------------------------------------------------- several adapters on one frozen base
# MULTI-ADAPTER MODEL (``multi_model``; ``python bench/traffic_model.py --multi``). n adapters of rank r, the same
# tokens each (Shape.M = tokens PER ADAPTER), one training step of one adapted layer (forward + backward + AdamW):
#
# - concurrent: the segmented kernels (kernels/multi_lora.py) over all n·M rows, one call: the same five launches as
#   one adapter, the frozen W read by the two GEMMs as for one adapter over n·M rows (compulsory: once each; with the
#   L2/tile model of assumption 2: ceil(n·M/(BLOCK_M·GROUP_M)) sweeps when W + a row panel exceed the usable L2);
#   every adapter tensor (A_i, B_i, dA_i, dB_i) once per adapter; S, dS packed over all rows (M×r fp32 per adapter).
# - sequential: n separate single-adapter runs of M rows one after the other (what n separate trainings do on one
#   GPU): n × path_fused(M), so W is read 2n times (compulsory), each run with its own five launches.
# - both: AdamW (torch.optim, states in the adapters' dtype: param, grad, exp_avg, exp_avg_sq read; param, exp_avg,
#   exp_avg_sq written) on the adapters' r·(K+N) parameters each; bytes only, no launch per layer (a foreach/fused
#   AdamW launches per step over all of a run's layers).
# - time: the roofline of assumption 3 (Σ max(bytes/BW, FLOPs/peak)); the FLOPs are the same both ways, so the ratio
#   moves only where a kernel is memory-bound: the base GEMMs at small M (W read n times) and nothing else (the
#   skinny kernels move the same bytes both ways). Two floors the roofline leaves out, shown beside it and stated:
#   "launch floor": no kernel takes less than LAUNCH_US (the launch rate of an eager host, bench/host_gpu.py's
#   TRITON_LAUNCH_US: tritonbench's launch latency of a no-op Triton kernel); "host floor": a layer's fwd+bwd takes at
#   least its host (Python) work, HOST.single per single-adapter call, HOST.multi + (n - 1)·HOST.per_extra_adapter for
#   the concurrent call (the values and where they come from: below). On a GPU the step is the larger of the device's
#   and the host's time when the host runs ahead asynchronously (a block: max(Σ device, Σ host) over its layers).

LAUNCH_US = 5.6  # bench/host_gpu.py's TRITON_LAUNCH_US (tritonbench launch_latency, meta-pytorch/tritonbench #1017)


@dataclass(frozen=True)
class Host:
    """Host µs per layer fwd+bwd on the Triton path: measured by bench/multi_bench.py on this 2-core shared EPYC with
    every kernel stubbed out (thread CPU time; its "GPU path" table, bench/results/cpu-2026-12-06/multi/), plus
    LAUNCH_US per Triton launch (5 both ways, which the stubs skip). A GPU host's CPU is usually faster: both floors
    drop, their ratio much less."""

    # Measured 2026-12-06 on a quiet machine (load ~1), after the multi call's per-call tables were kept
    # (bench/results/cpu-2026-12-06/multi/README.md, "After"): `python bench/multi_bench.py --stub-child --ns 1 2 4 8`
    # and two n = 1, 8 runs, min of 7 × 200 calls. (Under load 6-9, before that change: 185-222, 499-544, 51-55.)
    single: float = 175 + 5 * LAUNCH_US  # fused_lora_linear (LoRALinear), one adapter: 162-187 µs stubbed (min)
    multi: float = 360 + 5 * LAUNCH_US  # multi_lora_linear (MultiLoRALinear) with one adapter: 337-384 µs stubbed
    per_extra_adapter: float = 25  # each adapter after the first (A, B copies, dA, dB split): 22-28 µs (n = 1 → 8)


HOST = Host()
# A GPU host's CPU is likely faster than this loaded 2-core EPYC: the host floor with host work at HOST_FAST of HOST's
# (the sensitivity of the prediction to the one assumption it rests on, printed beside it).
HOST_FAST = 0.5
FAST_HOST = Host(HOST.single * HOST_FAST, HOST.multi * HOST_FAST, HOST.per_extra_adapter * HOST_FAST)

# Per-block projections (name, in, out, how many per block) and whether they carry a bias, of the two stated shapes.
MULTI_FAMILIES = {
    # Llama-7B (Llama-2-7B config: hidden 4096, intermediate 11008, 32 heads × 128, no bias)
    "Llama-7B": ((("q/k/v/o_proj", 4096, 4096, 4), ("gate/up_proj", 4096, 11008, 2), ("down_proj", 11008, 4096, 1)),
                 False),
    # OPT-350m (facebook/opt-350m config: hidden 1024, ffn_dim 4096, biases on every projection)
    "OPT-350m": ((("q/k/v/out_proj", 1024, 1024, 4), ("fc1", 1024, 4096, 1), ("fc2", 4096, 1024, 1)), True),
}
MULTI_WAYS = ("concurrent", "sequential")


def adamw(s: Shape, n: int) -> Kernel:
    """torch.optim.AdamW on n adapters' A (r×K) and B (N×r), states in the adapters' dtype (zeros_like the params):
    reads param, grad, exp_avg, exp_avg_sq, writes param, exp_avg, exp_avg_sq. Bytes only (launches=0)."""
    params = n * s.r * (s.K + s.N)
    return Kernel("AdamW on the adapters", 4 * params * s.ea, 3 * params * s.ea, 0.0, launches=0)


def multi_paths(s: Shape, n: int, d: Device | None) -> dict[str, list[Kernel]]:
    """The kernels of one training step of one layer with n adapters of s.M tokens each, both ways."""
    return {"concurrent": path_fused(replace(s, M=n * s.M), d, n) + [adamw(s, n)],
            "sequential": (path_fused(s, d) + [adamw(s, 1)]) * n}


def multi_base_bytes(s: Shape, n: int, d: Device | None) -> dict[str, float]:
    """DRAM bytes of the frozen weight read by the two GEMMs (y = xWᵀ: out M×N; dX = dY W: out M×K), both ways."""
    one = lambda m: weight_reads(m, s.N, s.K, s.e, d) + weight_reads(m, s.K, s.N, s.e, d)  # noqa: E731
    return {"concurrent": one(n * s.M), "sequential": n * one(s.M)}


def _gemm_core_bytes(s: Shape, rows: int, d: Device | None) -> float:
    """The two base GEMMs' own bytes (activation and weight reads, output writes), the rank-r extras left out."""
    tile = FUSED_TILE[0]
    return (_operand_reads(rows, s.N, s.K, s.e, d, tile) + rows * s.N * s.e
            + _operand_reads(rows, s.K, s.N, s.e, d, tile) + rows * s.K * s.e)


def _floor_ms(ks: list[Kernel], d: Device, launch_us: float) -> float:
    return 1e3 * sum(max(k.bytes / d.bw, k.flops / d.peak, k.launches * launch_us * 1e-6) for k in ks)


def host_us(way: str, n: int, host: Host = HOST) -> float:
    """The host floor of one layer's fwd+bwd (stated assumption, module comment above)."""
    return host.multi + (n - 1) * host.per_extra_adapter if way == "concurrent" else n * host.single


def multi_model(s: Shape, n: int, *, launch_us: float = LAUNCH_US, host: Host = HOST) -> dict:
    """One adapted layer, n adapters of s.M tokens each, one training step, concurrent vs sequential: per way the
    launches, FLOPs, compulsory bytes (total, frozen weight, rank-r terms) and per device the bytes with the L2 model
    and three times (roofline, with the launch floor, with the host floor); and per device the time ratios."""
    out: dict = {"n": n, "tokens_per_adapter": s.M, "ways": {}, "ratio": {}}
    for way in MULTI_WAYS:
        rows, runs = (n * s.M, 1) if way == "concurrent" else (s.M, n)
        once = multi_paths(s, n, None)[way]
        total = sum(k.bytes for k in once)
        entry = {"launches": sum(k.launches for k in once), "flops": sum(k.flops for k in once), "bytes_once": total,
                 "base_bytes_once": multi_base_bytes(s, n, None)[way],
                 "rank_r_bytes_once": total - runs * _gemm_core_bytes(s, rows, None), "devices": {}}
        for d in DEVICES:
            ks = multi_paths(s, n, d)[way]
            roof = _floor_ms(ks, d, 0.0)
            entry["devices"][d.name] = {
                "bytes": sum(k.bytes for k in ks), "base_bytes": multi_base_bytes(s, n, d)[way], "ms": roof,
                "ms_launch_floor": _floor_ms(ks, d, launch_us),
                "ms_host_floor": max(roof, 1e-3 * host_us(way, n, host))}
        out["ways"][way] = entry
    for d in DEVICES:
        c, q = (out["ways"][w]["devices"][d.name] for w in MULTI_WAYS)
        out["ratio"][d.name] = {k: c[k] / q[k] for k in ("ms", "ms_launch_floor", "ms_host_floor")}
    return out


def multi_block(family: str, tokens: int, n: int, r: int = 16, ea: int = 2, **kw) -> dict:
    """``multi_model`` summed over one transformer block's adapted projections (MULTI_FAMILIES) for each device. The
    host floor of a block is max(Σ roofline, Σ host work): the host runs ahead of the device across layers."""
    projections, bias = MULTI_FAMILIES[family]
    layers = [(name, count, multi_model(Shape(family, name, tokens, K, N, r=r, p=0.0, bias=bias, ea=ea), n, **kw))
              for name, K, N, count in projections]
    out: dict = {"family": family, "n": n, "tokens_per_adapter": tokens, "layers": {}, "ways": {}, "ratio": {}}
    for name, count, res in layers:
        out["layers"][name] = {"count": count, **res}
    for way in MULTI_WAYS:
        add = lambda key, way=way: sum(c * res["ways"][way][key] for _, c, res in layers)  # noqa: E731
        dev = {d.name: {k: sum(c * res["ways"][way]["devices"][d.name][k] for _, c, res in layers)
                        for k in ("bytes", "base_bytes", "ms", "ms_launch_floor")} for d in DEVICES}
        host_ms = 1e-3 * sum(c * host_us(way, n, kw.get("host", HOST)) for _, c, _ in layers)
        for v in dev.values():
            v["ms_host_floor"] = max(v["ms"], host_ms)
        out["ways"][way] = {k: add(k) for k in ("launches", "flops", "bytes_once", "base_bytes_once",
                                                   "rank_r_bytes_once")} | {"devices": dev}
    for d in DEVICES:
        c, q = (out["ways"][w]["devices"][d.name] for w in MULTI_WAYS)
        out["ratio"][d.name] = {k: c[k] / q[k] for k in ("ms", "ms_launch_floor", "ms_host_floor")}
    return out


MULTI_GOAL = 0.5  # concurrent ≤ 0.5 × sequential at n = 8, 512 tokens per adapter (the goal stated for the GPU)


def multi_table(results: list[dict], device: str = HEAD) -> tuple[list[str], list[list[str]]]:
    cols = ["block", "layer", "n", "launches c/s", "GiB once c/s", "W GiB once c/s", "rank-r GiB once c/s",
            f"W GiB {device} c/s", f"ms {device} c/s", "ratio roofline", f"ratio +{LAUNCH_US:g}µs/launch",
            "ratio +host floor"]
    rows = []
    for blk in results:
        entries = [(name, res) for name, res in blk["layers"].items()] + [("block total", blk)]
        for name, res in entries:
            c, q = (res["ways"][w] for w in MULTI_WAYS)
            cd, qd = c["devices"][device], q["devices"][device]
            rt = res["ratio"][device]
            pair = lambda a, b, f: f"{format(a, f)} / {format(b, f)}"  # noqa: E731
            rows.append([blk["family"], name, str(blk["n"]), pair(c["launches"], q["launches"], "d"),
                         pair(c["bytes_once"] / GIB, q["bytes_once"] / GIB, ".3f"),
                         pair(c["base_bytes_once"] / GIB, q["base_bytes_once"] / GIB, ".3f"),
                         pair(c["rank_r_bytes_once"] / GIB, q["rank_r_bytes_once"] / GIB, ".3f"),
                         pair(cd["base_bytes"] / GIB, qd["base_bytes"] / GIB, ".3f"),
                         pair(cd["ms"], qd["ms"], ".3f"), f"{rt['ms']:.2f}", f"{rt['ms_launch_floor']:.2f}",
                         f"{rt['ms_host_floor']:.2f}"])
    return cols, rows


def multi_assumptions(tokens: int, r: int, ea: int) -> list[str]:
    d = DEVICES[0]
    return [
        BANNER,
        f"Several adapters on one frozen base: n adapters × {tokens} tokens each, r={r}, bf16 base, "
        f"{'bf16' if ea == 2 else 'fp32'} adapters, p=0, one training step (fwd + bwd + AdamW) of each adapted "
        "projection; c = concurrent (one segmented call, W read once per GEMM), s = sequential (n single-adapter runs, "
        "W read n times per GEMM). ratio = concurrent ms ÷ sequential ms; goal at n=8, 512 tokens: ≤ "
        f"{MULTI_GOAL}.",
        f"{d.name}: {d.bw / 1e12:.2f} TB/s, {d.peak / 1e12:.1f} dense bf16 TFLOP/s, {d.l2 / 1e6:.0f} MB L2 "
        f"({d.l2_share:.0%} usable for shared data). roofline = Σ max(bytes/BW, FLOPs/peak) (equal FLOPs both ways); "
        f"+launch floor: no kernel under {LAUNCH_US} µs; +host floor: a layer's fwd+bwd takes at least its host work, "
        f"{HOST.single:g} µs per single-adapter call, concurrent {HOST.multi:g} + {HOST.per_extra_adapter:g} µs per "
        "extra adapter (measured on this CPU with the kernels stubbed: bench/traffic_model.py's Host).",
    ]


def shape_table(res: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["path", "launches", "GFLOP", "GiB once", f"GiB {HEAD}", *(f"ms {d.name}" for d in DEVICES),
            f"× base ({HEAD})", f"PEFT ÷ ({HEAD})"]
    ms = {p: res[p]["devices"][HEAD]["ms"] for p in ORDER}
    rows = [[p, str(e["launches"]), f"{e['flops'] / 1e9:.1f}", f"{e['bytes_once'] / GIB:.3f}",
             f"{e['devices'][HEAD]['bytes'] / GIB:.3f}", *(f"{e['devices'][d.name]['ms']:.3f}" for d in DEVICES),
             f"{ms[p] / ms['base']:.2f}", f"{ms['peft'] / ms[p]:.2f}"] for p, e in ((p, res[p]) for p in ORDER)]
    return cols, rows


def kernel_table(res: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["path", "kernel", "GiB read (once)", "GiB write", f"GiB {HEAD}", "GFLOP"]
    dev = {p: res[p]["devices"][HEAD]["kernel_bytes"] for p in ORDER}
    pairs = [(p, k, b) for p in ORDER for k, b in zip(res[p]["kernels"], dev[p], strict=True)]
    return cols, [[p, k["name"], f"{k['read'] / GIB:.4f}", f"{k['write'] / GIB:.4f}", f"{b / GIB:.4f}",
                   f"{k['flops'] / 1e9:.2f}"] for p, k, b in pairs]


def anchor_lines(results: list[tuple[Shape, dict]]) -> list[str]:
    """The model beside LoRAFusion's published figures (only for their setting: half adapters, r=16, p=0.1)."""
    lf = [(s, r) for s, r in results if s.family == "LoRAFusion" and s.ea == s.e and s.r == 16 and s.p == 0.1]
    lines = [BANNER, f"LoRAFusion's published figures (H100, ncu) beside the model ({HEAD}; once = compulsory):"]
    for s, res in lf:
        key = f"{s.M}x{s.K}x{s.N}"
        if key in LORAFUSION_PUBLISHED:
            g = {p: f"{res[p]['devices'][HEAD]['bytes'] / GIB:.3f} (once {res[p]['bytes_once'] / GIB:.3f})"
                 for p in ORDER}
            lines.append(f"  {key}: published Fused LoRA {LORAFUSION_PUBLISHED[key][1]:.3f} / Torch LoRA "
                         f"{LORAFUSION_PUBLISHED[key][0]:.3f} GiB; model: lorafusion {g['lorafusion']}, eager "
                         f"{g['peft']}; fused-lora {g['fused']}, composed {g['composed']}, compile {g['compile']}")
            lines.append(f"    fused-lora writes no x_d or mask and reads none back: "
                         f"{(res['lorafusion']['bytes_once'] - res['fused']['bytes_once']) / GIB:.3f} GiB less"
                         " compulsory traffic than their design")
    for p in ("lorafusion", "fused", "composed", "compile") if lf else ():
        rs = [r["peft"]["devices"][HEAD]["ms"] / r[p]["devices"][HEAD]["ms"] for _, r in lf]
        pub = f" (published, measured: {LORAFUSION_SPEEDUP_AVG}× avg, {LORAFUSION_SPEEDUP_BEST}× best)"
        lines.append(f"  roofline eager ÷ {p} on {HEAD}, {len(rs)} LoRAFusion shapes: {sum(rs) / len(rs):.2f}× avg,"
                     f" {max(rs):.2f}× best{pub if p == 'lorafusion' else ''}")
    return lines if lf else []


def _fmt_text(cols: list[str], rows: list[list[str]]) -> str:
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    pad = lambda i, c: c.ljust(w[i]) if i == 0 else c.rjust(w[i])
    return "\n".join("  ".join(pad(i, c) for i, c in enumerate(r)) for r in [cols, *rows])


def _fmt_md(cols: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [cols, ["---"] * len(cols), *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="keep shapes whose label contains this (case-insensitive)")
    ap.add_argument("--adapter-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="adapters' dtype (bf16: LoRAFusion's setting; fp32: PEFT's and LoRALinear's default)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--kernels", action="store_true", help="also print each kernel's bytes")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--markdown", metavar="PATH")
    ap.add_argument("--multi", action="store_true",
                    help="the multi-adapter model: n adapters concurrent vs n sequential runs (--adapters, --tokens)")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8], help="--multi: adapter counts n")
    ap.add_argument("--tokens", type=int, default=512, help="--multi: tokens per adapter")
    ap.add_argument("--families", nargs="+", choices=list(MULTI_FAMILIES), default=list(MULTI_FAMILIES))
    args = ap.parse_args(argv)
    ea = 4 if args.adapter_dtype == "fp32" else 2
    if args.multi:
        return multi_main(args, ea)
    chosen = [Shape(**{**asdict(s), "r": args.rank}) for s in shapes(ea) if args.only.lower() in s.label.lower()]
    if not chosen:
        ap.error(f"no shape matches --only {args.only!r}")
    results = [(s, model(s)) for s in chosen]
    setting = (f"bf16 base, {args.adapter_dtype} adapters, r={args.rank}. 'GiB once': each tensor read once per kernel;"
               f" 'GiB {HEAD}' and the ms columns: with the L2/tile model (module docstring).")
    text, md = [BANNER, setting, ""], ["# LoRA layer traffic model", "", f"**{BANNER}**", "", setting, ""]
    for s, res in results:
        title = f"{s.label}, r={s.r}, p={s.p}, bias={s.bias}"
        tables = [shape_table(res)] + [kernel_table(res)] * args.kernels
        text += [f"== {title} ==", *(_fmt_text(*t) + "\n" for t in tables)]
        md += [f"## {title}", "", *(_fmt_md(*t) + "\n" for t in tables)]
    anchors = anchor_lines(results)
    text += anchors
    md += ["## Against LoRAFusion's published figures", "", *(f"- {a.strip()}" for a in anchors[2:])] * bool(anchors)
    print("\n".join(text))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        payload = {"note": BANNER, "devices": [asdict(d) for d in DEVICES],
                   "shapes": [{"shape": asdict(s), "label": s.label, "paths": res} for s, res in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


def multi_main(args: argparse.Namespace, ea: int) -> int:
    """--multi: the multi-adapter model's table per block family and n; the goal line at n = 8."""
    results = [multi_block(f, args.tokens, n, r=args.rank, ea=ea) for f in args.families for n in args.adapters]
    lines = multi_assumptions(args.tokens, args.rank, ea)
    cols, rows = multi_table(results)
    fast = {f: multi_block(f, args.tokens, 8, r=args.rank, ea=ea, host=FAST_HOST)["ratio"][HEAD]["ms_host_floor"]
            for f in args.families}
    goal = [f"goal (n=8, {args.tokens} tokens each, {HEAD}: concurrent ≤ {MULTI_GOAL} × sequential): {b['family']} "
            f"block: roofline {b['ratio'][HEAD]['ms']:.2f}, +launch floor {b['ratio'][HEAD]['ms_launch_floor']:.2f}, "
            f"+host floor {b['ratio'][HEAD]['ms_host_floor']:.2f} (a host {1 / HOST_FAST:g}× faster than the one "
            f"measured: {fast[b['family']]:.2f})" for b in results if b["n"] == 8]
    print("\n".join([*lines, "", _fmt_text(cols, rows), "", *goal]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(["# Several adapters on one base: traffic model", "", *(f"{x}\n" for x in lines),
                               _fmt_md(cols, rows), "", *(f"- {g}" for g in goal)]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": BANNER, "assumptions": lines, "devices": [asdict(d) for d in DEVICES],
                       "launch_us": LAUNCH_US, "host_us": asdict(HOST), "blocks": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
