"""The package list, which pyproject.toml cannot state: every package under fused_lora/ (found, so a new subpackage
ships without an edit here) and fused_lora.kernels, which is the top-level kernels/ folder (pyproject.toml's
package-dir). A [tool.setuptools.packages.find] table names packages after the folders it finds, and no folder
fused_lora/kernels/ exists; kernels/ found as a folder would ship as a top-level `kernels` package, which would shadow
HF's `kernels` (transformers imports it). Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["fused_lora", "fused_lora.*"]), "fused_lora.kernels"])
