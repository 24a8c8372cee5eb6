"""Test set-up: without a GPU, Triton kernels run on Triton's CPU interpreter and the C++
kernels on their CPU emulator (eurocore._C_emulated).

TRITON_INTERPRET is read when a ``@triton.jit`` function is defined, so it is set here,
before any eurocore module is imported.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EUROCORE_CUDA_EMULATION", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The fuzzer's profiles (tests/reliability): "ci", the default, is reproducible (a fixed
# derivation of examples from each test, no example database) and bounded, each test's
# own example count; "long" (pytest --hypothesis-profile=long) draws fresh examples for
# hours. Kernels on the CPU are slow: no deadline.
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("long", max_examples=10_000_000, deadline=None,
                          suppress_health_check=_SLOW_IS_FINE)
settings.load_profile("ci")


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
