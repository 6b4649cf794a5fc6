"""Test session setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on before
fused_lora (and so triton.jit) is imported. The default backend is then the PyTorch path, so model-level
tests stay fast; kernel tests ask for ``backend="triton"`` explicitly (see ``BACKENDS`` in helpers.py).
Export FUSED_LORA_BACKEND=triton to push every test through the interpreted kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSED_LORA_BACKEND", "torch")

import pytest  # noqa: E402

import fused_lora  # noqa: E402,F401  (imported after the environment is set)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
