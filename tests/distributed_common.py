"""What every multi-process test of tests/test_distributed*.py shares, in the parent test and in the workers: the model
and data, the backend settings that force the fused autograd Function, the proof that it ran, the training loop and
the single-process reference.

Imported by spawned workers before fused_lora: fused_lora is imported inside functions only, after the worker has put
the backend environment (``TRITON_INTERPRET``) in place.

**Why the backend settings.** On CPU with dropout p = 0 and adapters in x's dtype the router takes a native-ops shortcut
and never runs the autograd Function; a test that means the Function must switch it off (``FUSED_LORA_NATIVE=0`` on the
PyTorch backend) or run the Triton kernels (under Triton's interpreter on CPU), and show that it did:
:func:`prove_fused_function`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
from torch import nn

# The autograd Functions' backward node names (type(loss.grad_fn…).__name__): one of them in the loss's graph proves
# the Function ran. One place to update when the Functions are renamed.
FUNCTION_NODES = ("FusedLoRAFunctionBackward",)
# The paths of the Triton backend that run its kernels (path_report's "runs"); "torch" would be the PyTorch path.
KERNEL_PATHS = ("fused", "composed")

# Per backend, the environment that makes every LoRA call run the autograd Function: the PyTorch backend without its
# native-ops shortcut; the Triton kernels (under TRITON_INTERPRET=1 on CPU, which must be set before the import) with
# the fused GEMM (no timing on CPU).
BACKEND_ENV = {
    "torch": {"FUSED_LORA_BACKEND": "torch", "FUSED_LORA_NATIVE": "0"},
    "triton": {"FUSED_LORA_BACKEND": "triton", "FUSED_LORA_GEMM": "fused"},
}
BACKEND_NAMES = tuple(BACKEND_ENV)
_BACKEND_KEYS = sorted({k for env in BACKEND_ENV.values() for k in env})

STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 6
WORLD_SIZE = 2
# LoRA on GPT-2's c_proj and c_fc (Conv1D) with their biases trainable, the score head trained in full. Not c_attn: the
# key bias (and the key rows of lora_B) get a gradient that is zero in exact arithmetic (softmax ignores a per-query
# constant), so AdamW turns float noise into full-size steps and no two runs agree.
LORA = dict(r=4, lora_alpha=8, target_modules=["c_proj", "c_fc"], bias="lora_only", task_type="SEQ_CLS",
            init_lora_weights=False)
LORA_LAYERS = 2 * 3  # 2 blocks × (attn.c_proj, mlp.c_fc, mlp.c_proj)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ backend and proof


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``BACKEND_ENV[name]`` in the environment for the block (the router reads it per call), with fused_lora's record
    of the paths run emptied first, so that :func:`prove_fused_function` sees this block's calls only."""
    from fused_lora import diagnostics

    saved = {k: os.environ.get(k) for k in _BACKEND_KEYS}
    for k in _BACKEND_KEYS:
        os.environ.pop(k, None)
    os.environ.update(BACKEND_ENV[name])
    diagnostics.clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prove_fused_function(loss: torch.Tensor, backend_name: str, layers: int, where: str) -> int:
    """Raises AssertionError unless the graph of ``loss`` holds at least ``layers`` nodes of the fused autograd Function
    (one per LoRA layer call: a layer that took the native shortcut or PEFT's unfused forward adds none) and, on the
    Triton backend, every key fused_lora recorded since :func:`backend` ran a kernel path (path_report's "runs"), not
    the PyTorch path. Returns the number of Function nodes."""
    import fused_lora

    assert loss.grad_fn is not None, f"{where}: the loss has no autograd graph"
    names: dict[str, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] = names.get(type(node).__name__, 0) + 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    nodes = sum(names.get(n, 0) for n in FUNCTION_NODES)
    assert nodes >= layers, (
        f"{where} ({backend_name} backend): the loss's graph holds {nodes} nodes of the fused Function "
        f"{FUNCTION_NODES}, expected one per LoRA layer ({layers}): the router took the native shortcut or PEFT's "
        f"unfused forward. Settings: { {k: os.environ.get(k) for k in _BACKEND_KEYS} }")
    if backend_name == "triton":
        runs = {key: entry["runs"] for key, entry in fused_lora.path_report().items()}
        assert runs and all(path in KERNEL_PATHS for path in runs.values()), (
            f"{where} (triton backend): path_report() says the keys ran {runs}; expected the kernels' paths "
            f"{KERNEL_PATHS} for every key")
    return nodes


# ------------------------------------------------------------------------------------------------- models and data


def injected_model(lora_dropout: float = 0.0) -> nn.Module:
    """A tiny GPT-2 classifier (random weights from a config) with fused LoRA layers, A and B random."""
    from tiny_models import build

    from fused_lora import LoRAConfig, inject_lora

    model = build("gpt2_cls")
    torch.manual_seed(0)
    return inject_lora(model, LoRAConfig(**LORA, lora_dropout=lora_dropout))


def peft_model(base: nn.Module | None = None) -> nn.Module:
    """The same model made by PEFT (``fused_lora.peft.enable()`` in effect or not, as the caller set it), with the
    trainable values of :func:`injected_model`."""
    import peft
    from tiny_models import build, peft_name_to_ours

    model = peft.get_peft_model(base if base is not None else build("gpt2_cls"),
                                peft.LoraConfig(**LORA, fan_in_fan_out=True))
    ours = dict(injected_model().named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(ours[peft_name_to_ours(name)])
    return model


# QLoRA: a tiny Llama classifier loaded in 4 bits (NF4, double quantization, fp32 compute; the head unquantized), PEFT's
# LoRA on q_proj, v_proj and down_proj of its 2 layers. Sizes multiples of 64: bitsandbytes' CPU repack (the thing the
# QLoRA test makes sure never happens) needs them.
QLORA_STORAGES = ("uint8", "bfloat16", "float16", "float32")
# The Triton backend's 4-bit kernels under the interpreter cost ~6 s of CPU per rank and storage (3 steps): in CI they
# run on the integer storage and on bf16 (the one accelerate shards); the storage only changes the dtype the packed
# bytes are viewed as. FUSED_LORA_TEST_ALL_STORAGES=1 runs all four on both backends.
TRITON_QLORA_STORAGES = QLORA_STORAGES if os.environ.get("FUSED_LORA_TEST_ALL_STORAGES") == "1" else ("uint8",
                                                                                                     "bfloat16")
QLORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="SEQ_CLS",
             init_lora_weights=False)
QLORA_LAYERS = 2 * 3


def save_llama_base(path: str) -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=2,
                                   pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path)


def llama_4bit(path: str, storage: str) -> nn.Module:
    """The base in 4 bits (``bnb_4bit_quant_storage=storage``), as ``from_pretrained`` leaves it (in eval mode)."""
    import transformers

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=getattr(torch, storage),
        llm_int8_skip_modules=["score"])
    return transformers.LlamaForSequenceClassification.from_pretrained(
        path, quantization_config=quantization, device_map="cpu", dtype=torch.float32)


def qlora_model(path: str, storage: str) -> nn.Module:
    """The 4-bit base (``bnb_4bit_quant_storage=storage``) as ``from_pretrained`` leaves it (in eval mode), with
    PEFT's LoRA (A and B random, the same for every call); ``fused_lora.peft.enable()`` in effect or not, as the
    caller set it."""
    import peft

    base = llama_4bit(path, storage)
    torch.manual_seed(3)
    return peft.get_peft_model(base, peft.LoraConfig(**QLORA))


def qlora_injected(path: str, storage: str) -> nn.Module:
    """The same 4-bit base with fused_lora's own layers (``inject_lora``), starting from :func:`qlora_model`'s
    values."""
    from fused_lora import LoRAConfig, inject_lora

    peft_values = trainable_state(qlora_model(path, storage))
    model = inject_lora(llama_4bit(path, storage), LoRAConfig(**QLORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(peft_values[name])
    return model


def qlora_reference(path: str) -> dict[str, torch.Tensor]:
    """Plain PEFT QLoRA in one process on the whole batch (switched to train mode first, as a training script does)."""
    model = qlora_model(path, "uint8").train()
    train(model, *batch())
    return trainable_state(model)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (GLOBAL_BATCH, SEQ), generator=g)  # no pad token (0): the last token is pooled
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    return ids, labels


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.chunk(WORLD_SIZE)[rank] for t in batch())


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, without weight decay (as the Trainer runs are configured)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


def train(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, prove=None, opt=None) -> None:
    """STEPS AdamW steps on a mean loss: with equal shards, the data-parallel average of the ranks' gradients equals the
    single-process gradient on the whole batch. ``prove(loss)`` is called on the first step's loss."""
    opt = opt if opt is not None else optimizer(model)
    for step in range(STEPS):
        loss = model(input_ids=ids, labels=labels).loss
        if step == 0 and prove is not None:
            prove(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()


def ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names of a PEFT model (or ours) → ours."""
    from tiny_models import peft_name_to_ours

    return {peft_name_to_ours(n): t for n, t in state.items()}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return ours({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def reference() -> dict[str, torch.Tensor]:
    """The single-process run on the whole batch, computed as the caller's settings say: in a test process (the PyTorch
    backend, p = 0) the native autograd ops, independent of the Function; under :func:`backend` the Function on that
    backend."""
    model = injected_model()
    train(model, *batch())
    return trainable_state(model)


class Examples(torch.utils.data.Dataset):
    """The global batch, one example per item, for the Trainer."""

    def __init__(self) -> None:
        self.ids, self.labels = batch()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def training_arguments(output_dir: str, world_size: int, **overrides):
    """The Trainer's run: the global batch of GLOBAL_BATCH examples split over ``world_size`` processes, one step per
    epoch (every step sees all of them, as the single-process run), constant learning rate, no weight decay, no
    clipping, nothing saved unless asked.

    ``average_tokens_across_devices=False``: transformers 5.25 multiplies the loss by the number of processes for a
    model whose forward takes ``**kwargs`` (GPT-2's classifier does), assuming the model divided it by the token count
    of all processes; the classifier's loss is a plain mean, so its gradients would double under 2 processes (AdamW
    almost hides it: 7.6e-4 apart after 3 steps, where the gradients are near its eps)."""
    import transformers

    kw = dict(output_dir=output_dir, per_device_train_batch_size=GLOBAL_BATCH // world_size, max_steps=STEPS,
              learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
              optim="adamw_torch", save_strategy="no", report_to=[], seed=0, logging_strategy="no",
              disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
              average_tokens_across_devices=False)
    return transformers.TrainingArguments(**{**kw, **overrides})


def trainer_reference(output_dir: str) -> dict[str, torch.Tensor]:
    """The single-process Trainer run on the whole batch (native autograd ops), for the distributed Trainer runs: the
    Trainer's own loss bookkeeping (the mean over the examples of all processes) is part of what they compare."""
    import transformers

    model = injected_model()
    transformers.Trainer(model=model, args=training_arguments(output_dir, 1, use_cpu=True),
                         train_dataset=Examples()).train()
    return trainable_state(model)


def max_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[n].double() - t.double()).abs().max().item() for n, t in want.items())


def assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                         tight: bool = False) -> float:
    """Every trainable parameter equal to fp32 noise; returns the largest absolute difference. ``tight``: against a
    single-process run of the same computation (the same backend), where only the order of the gradient sums differs
    (measured: ≤ 4e-7 after 3 AdamW steps). Loose: against another computation (the native ops, the other backend,
    PEFT's own layers), whose fp32 rounding AdamW amplifies where a gradient is near its eps (measured: ≤ 1.4e-5)."""
    assert set(got) == set(want), f"{what}: trainable parameters {sorted(got)} != {sorted(want)}"
    rtol, atol = (1e-5, 1e-6) if tight else (1e-4, 1e-5)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")
    return max_difference(got, want)


# ------------------------------------------------------------------------------------------------- process groups


def torch_extensions_dir() -> str:
    """Where DeepSpeed's CPU communication op is built (g++, ~40-55 s) and then found by every later process group, in
    this CI run and the next: ``$TORCH_EXTENSIONS_DIR`` when set, else a folder under ~/.cache named after the torch,
    DeepSpeed and Python versions (torch's extension cache checks the sources, not the torch it was built against)."""
    import importlib.metadata
    import sys

    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given:
        return given
    versions = f"torch{torch.__version__}-deepspeed{importlib.metadata.version('deepspeed')}-py{sys.version_info[0]}" \
               f"{sys.version_info[1]}"
    return os.path.join(os.path.expanduser("~"), ".cache", "fused_lora_tests", "torch_extensions", versions)


def worker_env() -> dict[str, str]:
    """The environment a worker process group starts with (before anything is imported): the interpreter on (the
    Triton backend's kernels run under it on CPU), DeepSpeed on its CPU accelerator with the shared extension folder,
    one thread per rank (two ranks share two cores; more threads only spin against each other, in torch and in the
    interpreter's numpy), fused_lora's backend settings left to each scenario (:func:`backend`)."""
    return {"TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(command: list[str], timeout_s: float, what: str) -> None:
    """Runs a launcher (``torchrun``, ``accelerate launch``) with :func:`worker_env` added to this environment, in a
    session of its own; fails the test with the end of its output when it fails, or when it outlives ``timeout_s``,
    after killing that session (the launcher and the workers it started, nothing else)."""
    import signal
    import subprocess

    import pytest

    env = {**os.environ, **worker_env()}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{what} did not finish within {timeout_s} s:\n{stderr[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{what} failed (exit {process.returncode}):\n{stderr[-8000:]}")
