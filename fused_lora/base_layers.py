"""The kinds of frozen base layer LoRA can sit on, in one place: how to recognise each, its forward, its input
gradient, and (for quantized ones) how to dequantize and quantize again.

    kind        layers                                        weight
    "dense"     nn.Linear ("linear" layout), GPT-2 Conv1D     float, N×K ("linear") or K×N ("conv1d")
    "bnb-4bit"  bitsandbytes Linear4bit (NF4/FP4)              packed 4-bit + quant_state
    "bnb-8bit"  bitsandbytes Linear8bitLt                      int8 + per-row scales

    y  = base(x)                  forward
    dX = dY · ∂base/∂x            backward (the weight is frozen: no weight gradient)

The composed path (``backends.lora_triton.composed_forward`` / ``backends.lora_torch.composed_forward``) adds the LoRA
branch to ``y`` and to ``dX`` in place. Each base here computes exactly what its layer computes (the same dtype casts
and rounding) and keeps nothing for backward beyond the layer's own weight: a bitsandbytes 4-bit base dequantizes W
again in backward, as bitsandbytes' own ``MatMul4Bit`` does, and no dequantized copy outlives the call. A 4-bit layer
is kept in bitsandbytes' standard packing (:func:`standard_4bit_packing`): on CPU its eval-mode forward would otherwise
repack W for a bf16 inference kernel that is neither exact nor differentiable.

A new base kind (GPTQ, say) starts here: its detection in :func:`base_kind`, a base class with ``forward`` /
``input_grad`` / ``dequantized`` in :func:`quantized_base`, its requantization in :func:`requantized`; then a row in
the router's table (``dispatch.py``).

bitsandbytes is optional: it is imported only when a bitsandbytes layer is handed over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DENSE, BNB_4BIT, BNB_8BIT = "dense", "bnb-4bit", "bnb-8bit"

_conv1d: list[type | None] = []  # transformers' Conv1D, looked up once (this runs per call in fused_lora.peft)


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight in×out), or None without transformers."""
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # transformers is a dependency, but the layers themselves do not need it
            Conv1D = None
        _conv1d.append(Conv1D)
    return _conv1d[0]


def quantized_kind(module: nn.Module) -> str | None:
    """``BNB_4BIT`` / ``BNB_8BIT`` for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (and their subclasses), else
    None. By class name along the MRO, so bitsandbytes need not be importable to ask."""
    names = {(cls.__module__.split(".")[0], cls.__name__) for cls in type(module).__mro__}
    if ("bitsandbytes", "Linear4bit") in names:
        return BNB_4BIT
    if ("bitsandbytes", "Linear8bitLt") in names:
        return BNB_8BIT
    return None


def looks_quantized(module: nn.Module) -> bool:
    """A layer whose weight is not floating point (GPTQ/AWQ/HQQ/torchao and other packed formats)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point


def dense_layout(module: nn.Module) -> str | None:
    """"linear" for an ``nn.Linear`` (and subclasses that are not quantized), "conv1d" for transformers' ``Conv1D``,
    else None."""
    if quantized_kind(module) is not None:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def base_kind(module: nn.Module) -> str | None:
    """``DENSE``, ``BNB_4BIT`` or ``BNB_8BIT`` for a layer LoRA can sit on, else None."""
    kind = quantized_kind(module)
    if kind is not None:
        return kind
    return DENSE if dense_layout(module) is not None else None


def unsupported_quantized_message(where: str, type_name: str, dtype: torch.dtype) -> str:
    return (f"{where}: {type_name} holds a {dtype} weight; fused_lora serves floating-point nn.Linear / Conv1D layers "
            "and bitsandbytes Linear4bit / Linear8bitLt (QLoRA). Other quantized formats (GPTQ, AWQ, HQQ, torchao, …) "
            "are not supported: load the model in floating point or with a BitsAndBytesConfig, or leave this layer "
            "out of target_modules")


@dataclass(frozen=True)
class DenseBase:
    """``nn.Linear`` (weight N×K) or GPT-2 ``Conv1D`` (weight K×N) through cuBLAS, in x's dtype."""

    kind = DENSE
    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str

    def _w_t(self) -> torch.Tensor:  # Wᵀ, K×N, as a view
        return self.weight.t() if self.layout == "linear" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_t = self._w_t()
        return torch.addmm(self.bias.to(x.dtype), x, w_t) if self.bias is not None else x @ w_t

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return (dy @ self._w_t().t()).to(x_dtype)


# bitsandbytes' CPU inference packing (0.50, read from its source). On a CPU with AVX512-BF16, ``Linear4bit.forward``
# in eval mode on an input without grad repacks the weight in place for its bf16 kernel
# (``functional._convert_weight_packed_for_cpu``, gated by the layer's ``support_avx512bf16_for_cpu``;
# ``quant_state.packing_format_for_cpu`` becomes True): the codes regrouped in blocks of 32 rows, the block scales
# (double quantization undone) rounded to bf16 and transposed. From then on its forward runs
# ``bitsandbytes::gemv_4bit`` in every mode: x rounded to bf16 (~0.3% off), and no input gradient (the op has no
# autograd kernel). bitsandbytes' own way back (``_convert_weight_packed_for_cpu_inverse``, private) quantizes the
# scales again (another 0.3-0.6%) and, without double quantization, leaves them transposed (W ~40% off). The functions
# below keep a layer LoRA sits on in the standard packing, and read a weight already repacked back into it without
# loss: what it holds then is W with bf16 scales. The layout is bitsandbytes' private format: it is validated, and
# tests/test_qlora_cpu_packing.py checks the reading against bitsandbytes' own repack bit for bit.
CPU_PACKING_BLOCK_N = 32  # the row block of the CPU packing (_convert_weight_packed_for_cpu's block_n)


def in_cpu_packing(weight, state=None) -> bool:
    """Whether a bitsandbytes 4-bit weight is in bitsandbytes' CPU inference packing, by its quantization state
    (``state``, default the weight's own)."""
    state = state if state is not None else getattr(weight, "quant_state", None)
    # The repack sets the flag on the instance: read from there, since a missing attribute would go through
    # QuantState's Python __getattr__ (~2 µs, and this runs on every call of a 4-bit layer).
    return bool(getattr(state, "__dict__", {}).get("packing_format_for_cpu", False))


def quant_state_of(layer: nn.Module):
    """The quantization state of a bitsandbytes ``Linear4bit``: its weight's, or, when the weight is a plain tensor, the
    layer's own copy (``Linear4bit.quant_state``). FSDP2's ``fully_shard`` turns a ``Params4bit`` into a DTensor, and at
    forward and backward time into a plain gathered Parameter without ``quant_state``; the layer keeps it (bitsandbytes'
    own forward reads it from there too). None when the layer was never quantized."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def unpack_cpu_packing(data: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A 4-bit weight in bitsandbytes' CPU inference packing (``data`` N×K/2 uint8, its ``quant_state``) in the
    standard layout, nothing lost: (the codes two a byte in row-major order, even index in the high nibble, 1-D uint8;
    the block scales, fp32, one per ``blocksize`` consecutive elements in that order: the bf16 values the CPU kernel
    uses; the dtype dequantized values are rounded to). New tensors; ``data`` and ``state`` are left as they are.
    Raises ValueError for a layout this code does not know (another bitsandbytes version): never a wrong weight."""
    N, K = (int(d) for d in state.shape)
    blocksize, absmax = int(state.blocksize), state.absmax
    dtype = getattr(state, "original_dtype", None)
    known = (data.dtype == torch.uint8 and tuple(data.shape) == (N, K // 2) and N % CPU_PACKING_BLOCK_N == 0
             and K % blocksize == 0 and tuple(absmax.shape) == (K // blocksize, N)
             and not getattr(state, "nested", False) and dtype is not None)
    if not known:
        raise ValueError(f"fused_lora: this bitsandbytes Linear4bit weight is in a CPU inference packing fused_lora "
                         f"does not know (weight {data.dtype} {tuple(data.shape)}, W {N}×{K}, scales {absmax.dtype} "
                         f"{tuple(absmax.shape)}); load the model again and keep it from CPU inference "
                         "(base_layers.standard_4bit_packing) before wrapping it")
    # Byte i of the 32 that hold rows 32·nb … 32·nb+31, columns 2·c and 2·c+1: low nibble code t = i, high t = 32 + i of
    # the 64 codes (row 32·nb + t // 2, column 2·c + t % 2).
    chunks = data.reshape(N // CPU_PACKING_BLOCK_N, K // 2, CPU_PACKING_BLOCK_N)
    codes = torch.cat([chunks & 0xF, chunks >> 4], dim=-1)
    codes = codes.reshape(N // CPU_PACKING_BLOCK_N, K // 2, CPU_PACKING_BLOCK_N, 2).transpose(1, 2).reshape(-1)
    return (codes[0::2] << 4) | codes[1::2], absmax.t().reshape(-1).float(), dtype


def standard_4bit_packing(layer: nn.Module) -> nn.Parameter:
    """Keeps a bitsandbytes ``Linear4bit`` in bitsandbytes' standard 4-bit packing and returns its weight: its forward
    will not repack the weight for the CPU inference kernel any more (``support_avx512bf16_for_cpu`` set to False:
    its eval-mode forward then runs the same dequantize-and-matmul as in training, exact and differentiable), and a
    weight already repacked is read back without loss (:func:`unpack_cpu_packing`; its double quantization, undone by
    the repack, stays undone: fp32 scales). Cheap when there is nothing to do; nothing changes on a GPU."""
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    if getattr(weight, "quant_state", None) is None and in_cpu_packing(weight, quant_state_of(layer)):
        # A weight gathered by FSDP2 (its shards hold the repacked bytes): a copy rewritten here would be dropped at
        # the next reshard, and the layer's state would then describe bytes it does not match.
        raise ValueError(f"fused_lora: this bitsandbytes {type(layer).__name__} was repacked for bitsandbytes' CPU "
                         "inference (an eval-mode forward without gradients) before FSDP sharded it; load the model "
                         "again and call model.train() (or inject / fused_lora.peft) before any inference and before "
                         "fully_shard")
    if in_cpu_packing(weight):
        import bitsandbytes.functional as F

        state = weight.quant_state
        codes, absmax, dtype = unpack_cpu_packing(weight.data, state)
        new_state = F.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                 quant_type=state.quant_type, dtype=dtype)
        codes = codes.reshape(getattr(state, "original_qshape", (-1, 1)))
        storage = getattr(state, "original_storage_type", None)
        weight.data = codes.view(storage) if storage is not None else codes
        weight.quant_state = new_state
        if getattr(layer, "quant_state", None) is state:
            layer.quant_state = new_state
    return weight


def standard_4bit_packing_everywhere(module: nn.Module) -> int:
    """:func:`standard_4bit_packing` for every bitsandbytes ``Linear4bit`` in ``module`` (itself included), LoRA on it
    or not: a model's gradient also flows through the 4-bit layers left out of ``target_modules``, and one repacked by
    eval-mode CPU inference passes none. Returns how many layers it saw."""
    layers = [m for m in module.modules() if quantized_kind(m) == BNB_4BIT]
    for layer in layers:
        standard_4bit_packing(layer)
    return len(layers)


@dataclass(frozen=True)
class Bnb4Base:
    """bitsandbytes ``Linear4bit``: its own forward (x and bias cast to ``compute_dtype``, ``matmul_4bit``, the result
    cast back to x's dtype); input gradient ``dY · dequantize_4bit(W)`` in the compute dtype, as
    ``MatMul4Bit.backward``. The layer is kept in the standard packing (:func:`standard_4bit_packing`): on CPU its
    forward would otherwise repack W for bitsandbytes' bf16 inference kernel on the first eval-mode call, after which
    it is 0.1–0.5% off and passes no gradient."""

    kind = BNB_4BIT
    layer: nn.Module

    def __post_init__(self) -> None:
        standard_4bit_packing(self.layer)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.compute_dtype or torch.float32

    def canonical_weight(self) -> nn.Parameter:
        """The layer's weight, in bitsandbytes' standard packing (:func:`standard_4bit_packing`)."""
        return standard_4bit_packing(self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layer's own forward: bitsandbytes' dequantize-and-matmul in every mode, the CPU repack being off.
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        """W (N×K) in the quantization state's dtype: a temporary."""
        import bitsandbytes.functional as F

        weight = self.canonical_weight()  # FSDP2: the gathered plain tensor, its state the layer's
        return F.dequantize_4bit(weight.data, quant_state_of(self.layer))

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        dy = dy.to(self.compute_dtype)
        return (dy @ self.dequantized().to(dy.dtype)).to(x_dtype)


@dataclass(frozen=True)
class Bnb8Base:
    """bitsandbytes ``Linear8bitLt`` (int8 weight with per-row scales): its own forward; input gradient
    ``dY · (CB · SCB / 127)`` in x's dtype, as ``MatMul8bitLt.backward``."""

    kind = BNB_8BIT
    layer: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def dequantized(self) -> torch.Tensor:
        weight = self.layer.weight
        cb = weight.CB if getattr(weight, "CB", None) is not None else self.layer.state.CB
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else self.layer.state.SCB
        return cb.float() * (scb.float().unsqueeze(1) / 127.0)

    def input_grad(self, dy: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return (dy.to(x_dtype) @ self.dequantized().to(x_dtype))


def requantized(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes weight for ``layer`` holding ``weight`` (N×K, float), quantized like the old one, as
    PEFT's merge does (``peft.tuners.lora.bnb``)."""
    import bitsandbytes as bnb

    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs["requires_grad"] = False
    if quantized_kind(layer) == BNB_4BIT:
        kwargs["bnb_quantized"] = False
        kwargs.pop("quant_state", None)
        return bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
    kwargs = {k: kwargs[k] for k in ("requires_grad", "has_fp16_weights") if k in kwargs}
    return bnb.nn.Int8Params(weight.to("cpu"), **kwargs).to(old.device)


def set_requantized(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replaces ``layer``'s quantized weight by ``weight`` (float, N×K) quantized again; an 8-bit layer's cached
    int8 state is reset so that its next forward reads the new weight."""
    layer.weight = requantized(layer, weight)
    if quantized_kind(layer) == BNB_8BIT:
        layer.state.reset_grads()
        layer.state.CB = layer.state.SCB = None


def quantized_base(module: nn.Module) -> Bnb4Base | Bnb8Base:
    kind = quantized_kind(module)
    if kind == BNB_4BIT:
        return Bnb4Base(module)
    if kind == BNB_8BIT:
        return Bnb8Base(module)
    raise TypeError(f"fused_lora: {type(module).__name__} is not a bitsandbytes Linear4bit or Linear8bitLt")
