"""The bitsandbytes 4-bit base kind (``bitsandbytes.nn.Linear4bit``, NF4/FP4: QLoRA).

    LoRA: fused (the 4-bit weight dequantized in registers inside the base GEMM, ``bnb4_triton.FUSED``), composed
          (bitsandbytes' own matmul + the in-place rank-r kernels), PyTorch (bitsandbytes' matmul + the rank-r term)
    DoRA: refused (PEFT for DoRA on a quantized base)
    multi (several adapters, one per segment of rows): fused (multi_bnb4_triton.FUSED: W read once, 4-bit, for every
          segment), composed (multi_triton.COMPOSED), PyTorch (multi_torch.COMPOSED)

The base object (:class:`Bnb4Base`) computes exactly what the layer computes: its own forward (x and the bias cast to
``compute_dtype``, ``matmul_4bit``), and in backward ``dY · dequantize_4bit(W)`` in the compute dtype, as bitsandbytes'
``MatMul4Bit.backward``; nothing is kept for backward beyond the layer's own weight. The layer is kept in bitsandbytes'
standard packing (:func:`standard_4bit_packing`): on CPU its eval-mode forward would otherwise repack W for a bf16
inference kernel that is neither exact nor differentiable (NOTES: bitsandbytes on CPU). A merge dequantizes, adds and
quantizes again, like PEFT's (lossy). bitsandbytes is optional: layers are recognised by class name, and it is
imported only when a layer is handed over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import bnb4_triton, lora_torch, lora_triton, multi_bnb4_triton, multi_torch, multi_triton
from ..backends.bnb4_triton import in_cpu_packing, quant_state_of, unpack_cpu_packing
from ..quantized import QuantizedLoRALinear
from . import BaseKind, register

NAME = "bnb-4bit"


def detect(module: nn.Module) -> bool:
    """``bitsandbytes.nn.Linear4bit`` and its subclasses, by class name along the MRO (bitsandbytes need not be
    importable to ask)."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.split(".")[0] == "bitsandbytes"
               for cls in type(module).__mro__)


def standard_4bit_packing(layer: nn.Module) -> nn.Parameter:
    """Keeps a bitsandbytes ``Linear4bit`` in bitsandbytes' standard 4-bit packing and returns its weight: its forward
    will not repack the weight for the CPU inference kernel any more (``support_avx512bf16_for_cpu`` set to False:
    its eval-mode forward then runs the same dequantize-and-matmul as in training, exact and differentiable), and a
    weight already repacked is read back without loss (``bnb4_triton.unpack_cpu_packing``; its double quantization,
    undone by the repack, stays undone: fp32 scales). Cheap when there is nothing to do; nothing changes on a GPU."""
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


@dataclass(frozen=True, eq=False)
class Bnb4Base:
    """A ``Linear4bit`` as the paths compute with it (see the module docstring)."""

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


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replaces the layer's 4-bit weight by ``weight`` (N×K, float) quantized like the old one, as PEFT's merge does
    (``peft.tuners.lora.bnb``)."""
    import bitsandbytes as bnb

    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs["requires_grad"] = False
    kwargs["bnb_quantized"] = False
    kwargs.pop("quant_state", None)
    layer.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)


def fused_fits(x: torch.Tensor, base: Bnb4Base) -> bool:
    """Whether the fused 4-bit GEMM can serve a call: it reads x in the layer's compute dtype, and on a GPU a K
    (in_features) that is not a multiple of the blocksize (no projection of GPT-2 or Gemma) takes bitsandbytes'
    matmul: the kernels' per-element scale gathers spilled or passed 99 KiB of shared memory on several GPUs
    (kernels/configs.py). The interpreter runs them."""
    return x.dtype == base.compute_dtype and not (x.device.type == "cuda"
                                                   and x.shape[-1] % quant_state_of(base.layer).blocksize)


def not_ready(layer: nn.Module) -> str | None:
    if quant_state_of(layer) is None:
        return (f"the {type(layer).__name__} has no quant_state: its weight was never quantized (bitsandbytes "
                "quantizes a Linear4bit when it is moved to a device: layer.to('cuda') or layer.to('cpu'), or load the "
                "model with a BitsAndBytesConfig)")
    return None


def _peft_layers() -> tuple[type, ...]:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes absent: PEFT defines no such class
        return ()
    return (Linear4bit,)


KIND = register(BaseKind(
    name=NAME,
    describe="bitsandbytes Linear4bit",
    detect=detect,
    passes={
        ("lora", "torch"): lora_torch.COMPOSED,
        ("lora", "fused"): bnb4_triton.FUSED,
        ("lora", "composed"): lora_triton.COMPOSED,
        ("multi", "torch"): multi_torch.COMPOSED,
        ("multi", "fused"): multi_bnb4_triton.FUSED,
        ("multi", "composed"): multi_triton.COMPOSED,
    },
    refusals={"dora": "use_dora=True on a bitsandbytes Linear4bit (a quantized base): fused_lora runs DoRA "
                      "(weight-decomposed LoRA) on floating-point nn.Linear / Conv1D bases only. Use plain LoRA on "
                      "this layer, or PEFT for DoRA on a quantized base"},
    base=Bnb4Base,
    fused_fits=fused_fits,
    not_ready=not_ready,
    prepare=standard_4bit_packing,
    requantize=requantize,
    wrap=QuantizedLoRALinear.wrap,
    peft_layers=_peft_layers,
))
