"""Fixed regression corpus for ``tests/test_properties.py``.

Every entry is a ``Case`` run through the same check as the hypothesis examples, on both backends.
Add a case here whenever a property test (in CI or in a longer local run, ``HYPOTHESIS_PROFILE=dev``)
finds a failure, with one line saying why it is here; keep the hand-picked edge cases too. Entries are
never removed: a case that once failed stays a regression test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One fully determined problem: shapes, dtypes, memory layouts of the inputs, flags and seeds.

    ``lead`` is x's shape without its last dim (``()`` makes x 1-D); M = prod(lead).
    x_view: "contiguous" | "transposed" (the K dim has the largest stride) | "strided" (every other
    row and column of a larger buffer, non-zero offset) | "expanded_rows" (stride 0 between rows) |
    "expanded_cols" (stride 0 along K). weight_view: "contiguous" | "transposed" | "strided".
    adapter_view: "contiguous" | "transposed" (A and B are non-contiguous leaves).
    bias_view: "contiguous" | "strided" (every other element of a larger buffer, offset 1).
    """

    lead: tuple[int, ...]
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.float32
    adapter_fp32: bool = False
    layout: str = "linear"
    bias: bool = True
    bias_fp32: bool = False
    p: float = 0.0
    training: bool = True
    scaling: float = 2.0
    x_view: str = "contiguous"
    weight_view: str = "contiguous"
    adapter_view: str = "contiguous"
    bias_view: str = "contiguous"
    x_grad: bool = True
    bias_grad: bool = True
    A_grad: bool = True
    B_grad: bool = True
    data_seed: int = 0
    dropout_seed: int = 1234


# (case, why it is in the corpus)
REGRESSIONS: list[tuple[Case, str]] = [
    (Case(lead=(0,), K=7, N=5, r=3, p=0.3),
     "zero rows: the kernels' grids would have a zero dimension; dA, dB and dbias must be zeros"),
    (Case(lead=(), K=9, N=4, r=1, p=0.5, bias=False),
     "1-D x (M=1) and rank 1: the smallest problem, every tile mostly masked"),
    (Case(lead=(1,), K=1, N=1, r=1, dtype=torch.float16, p=0.2),
     "K=N=r=1 in fp16: all dimensions far below tl.dot's 16"),
    (Case(lead=(2, 0, 3), K=11, N=6, r=2, layout="conv1d"),
     "a zero leading dim in the middle of a 4-D x"),
    (Case(lead=(67,), K=100, N=99, r=40, dtype=torch.bfloat16, p=0.85, layout="conv1d"),
     "largest interpreted sizes, odd everywhere, bf16 (the interpreter's broken dtype), high p"),
    (Case(lead=(33,), K=65, N=17, r=33, x_view="transposed", weight_view="transposed", layout="conv1d"),
     "x read through (1, M) strides and a conv1d weight stored out×in: both GEMMs read 'the wrong way'"),
    (Case(lead=(5, 7), K=30, N=20, r=5, x_view="strided", weight_view="strided", p=0.4),
     "every other row and column of larger buffers, with a storage offset"),
    (Case(lead=(4, 9), K=24, N=18, r=6, x_view="expanded_rows", p=0.25),
     "stride-0 rows (a broadcast x): the mask must still differ between the equal rows"),
    (Case(lead=(13,), K=40, N=20, r=7, x_view="expanded_cols", p=0.1),
     "stride 0 along K: the kernels read one column K times"),
    (Case(lead=(3, 11), K=48, N=36, r=9, dtype=torch.float16, adapter_fp32=True, bias_fp32=True, p=0.3,
          adapter_view="transposed"),
     "fp32 transposed adapters and an fp32 bias on an fp16 base (PEFT's default dtypes)"),
    (Case(lead=(21,), K=50, N=31, r=4, dtype=torch.bfloat16, adapter_fp32=True, x_grad=False, bias_grad=False),
     "frozen x and bias: only the adapter gradients are computed (need_dx=False path)"),
    (Case(lead=(17,), K=35, N=29, r=3, A_grad=False, p=0.2),
     "frozen lora_A: dB and dX only (need_da=False) with dropout"),
    (Case(lead=(17,), K=35, N=29, r=3, B_grad=False, bias=False, x_grad=False, p=0.2),
     "frozen lora_B and x: only dA, the dS pass without dB"),
    (Case(lead=(19,), K=28, N=14, r=5, p=0.6, training=False),
     "eval mode with p > 0: no mask at all"),
    (Case(lead=(2, 32), K=64, N=64, r=32, dtype=torch.float16, p=0.5),
     "every size an exact multiple of the tiles: no masked edge at all"),
    (Case(lead=(65,), K=65, N=65, r=17, p=0.01, layout="conv1d"),
     "one past the tiles everywhere (a tile with a single valid row/column); tiny p (the torch path rounds p)"),
    # --- found by hypothesis (HYPOTHESIS_PROFILE=dev) ---
    (Case(lead=(), K=58, N=30, r=1, dtype=torch.float16, adapter_fp32=True, training=False, scaling=1.0,
          x_grad=False, bias_grad=False, data_seed=261, dropout_seed=0),
     "failed on torch (dA 7.2e-7 vs 2x2.6e-7 + 1.2e-7): cancellation in a 30-term fp32 dS; not a bug, the atol "
     "was scaled by max|dA| and is now scaled by the terms' magnitude (test_properties.magnitudes)"),
    (Case(lead=(13,), K=40, N=37, r=5, bias_view="strided", p=0.2),
     "a strided bias: the forward kernel read bias[col] at stride 1; wrong outputs of order 1"),
]
