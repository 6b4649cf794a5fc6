"""The project root works as a working directory: its ``kernels/`` folder (the Triton kernels, installed as
``fused_lora.kernels``) has no ``__init__.py``, so HF's ``kernels`` package, which transformers 5 imports, wins even
when the root is first on ``sys.path`` (``python -c``, ``python -m``, a notebook opened there)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "lora_forward.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a kernels/__init__.py shadows HF's kernels package"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="HF's kernels package is not installed")
def test_transformers_imports_from_the_project_root():
    code = ("import sys, fused_lora, fused_lora.kernels.lora_forward as k, transformers\n"
            "from transformers import GPT2Model\n"
            "import kernels\n"
            "assert sys.path[0] == '', sys.path[0]\n"  # the root (the cwd) is first on the path, as with python -c
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("lora_forward.py")
