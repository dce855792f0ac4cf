"""Kernel-test setup: Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before ``llmquant.kernels`` is imported (``triton.jit`` picks the
interpreter when the kernel is decorated); ``tests/conftest.py`` does the same for the whole suite.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for test inputs."""
    return torch.Generator().manual_seed(1234)
