"""Fixtures of the compile-check tests."""

import pytest

from eurocore.kernels import compile_engine as engine


@pytest.fixture
def need_backend():
    """``need_backend(*targets)`` skips the test unless this Triton can compile for each."""

    def need(*targets: str) -> None:
        for target in targets:
            if not engine.has_backend(engine.TARGETS[target]):  # e.g. pytorch-triton-rocm
                pytest.skip(f"this Triton build has no backend for {target}")

    return need
