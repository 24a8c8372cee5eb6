"""Test set-up: without a GPU, Triton kernels run on Triton's CPU interpreter and the C++
kernels on their CPU emulator (eurocore._C_emulated).

TRITON_INTERPRET is read when a ``@triton.jit`` function is defined, so it is set here,
before any eurocore module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EUROCORE_CUDA_EMULATION", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA or ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels under test run on: the GPU if there is one, else the CPU."""
    return DEVICE
