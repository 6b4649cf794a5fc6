"""Test session setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on before
fused_lora (and so triton.jit) is imported. The default backend is then the PyTorch path, so model-level
tests stay fast; kernel tests ask for ``backend="triton"`` explicitly (see ``BACKENDS`` in helpers.py).
Export FUSED_LORA_BACKEND=triton to push every test through the interpreted kernels.

With a GPU the interpreter stays off: tests that run the kernels put their tensors on ``helpers.DEVICE`` (CUDA
there), the CPU-only modules below are skipped, and ``bench/run_gpu.sh`` runs the suite (``-m check`` first).
"""

import os

# Under pytest-xdist (pyproject's addopts) the workers share the cores: each gets its share for torch's and OpenMP's
# threads, set before torch is imported and inherited by the processes the tests start. Measured on 2 cores with 2
# workers and the default 2 threads each: OpenMP's waiting threads made the GPT-2 example's test 40x slower (980 s).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSED_LORA_BACKEND", "torch")

import pytest  # noqa: E402

import fused_lora  # noqa: E402,F401  (imported after the environment is set)

# Modules that test the CPU machinery, not the kernels on a device: skipped when CUDA is there (bench/run_gpu.sh
# leaves them out of its runs too).
CPU_ONLY_MODULES = {
    "test_compile_targets.py": "compiles the kernels for sm_75..sm_120 without a GPU (the CPU CI's check); on a GPU "
                               "the suite compiles and runs them for real",
    "test_traffic_model.py": "a DRAM-traffic model in plain Python, nothing device-dependent: CPU CI covers it",
    "test_run_gpu_script.py": "the CPU dry run of bench/run_gpu.sh (RUN_GPU_DEVICE=cpu); on a GPU run the script",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "check: the first GPU minutes, most telling first (tests/test_gpu.py; "
                                       "bench/run_gpu.sh check runs `-m check`)")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        for item in items:
            reason = CPU_ONLY_MODULES.get(item.path.name)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"CPU-only: {reason}"))
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
