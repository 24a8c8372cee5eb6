"""Backend choice, the one dispatch path every op goes through.

Backends: ``torch`` (plain PyTorch, fp32 math: the reference and the specification),
``triton`` (``eurocore.kernels``) and ``cuda`` (the C++ extension ``eurocore._C``, built for
CUDA or HIP; on ROCm the same name serves the HIP build).

The choice, per call: the op's ``backend=`` argument, else the ``EUROCORE_BACKEND``
environment variable, else ``auto``: the op's preferred GPU backend for CUDA/ROCm tensors,
``torch`` elsewhere. An explicit choice that cannot serve the call raises
:class:`BackendUnavailableError` saying why; it never falls back to another backend.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "EUROCORE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot serve this call (not installed, not built,
    no GPU, or no kernel for this op)."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine, and why (or why not)."""

    available: bool
    reason: str


def triton_interpreter_active() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_status() -> BackendStatus:
    try:
        import triton
    except Exception as err:  # ImportError, or a broken install raising anything else
        return BackendStatus(False, f"triton is not importable ({err})")
    if triton_interpreter_active():
        return BackendStatus(
            True, f"triton {triton.__version__}, CPU interpreter (TRITON_INTERPRET=1)")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    return BackendStatus(
        False,
        f"triton {triton.__version__} is installed but no CUDA/ROCm GPU is visible (set "
        "TRITON_INTERPRET=1 before importing eurocore to run the kernels on the CPU interpreter)",
    )


@functools.cache
def _cuda_status() -> BackendStatus:
    try:
        from eurocore import _C
    except ImportError as err:
        return BackendStatus(
            False,
            f"the C++ extension eurocore._C is not built ({err}); it builds at install time when "
            "nvcc or hipcc is found (README: Building the cuda backend)",
        )
    built = f"eurocore._C built with {_C.gpu_backend()} for {_C.gpu_archs()}"
    if _C.gpu_device_count() == 0:
        return BackendStatus(False, f"{built}, but no GPU is visible")
    return BackendStatus(True, built)


def backend_status(name: str) -> BackendStatus:
    """The machine-level status of one backend (see :func:`available_backends`)."""
    if name == "torch":
        return BackendStatus(True, f"torch {torch.__version__}")
    if name == "triton":
        return _triton_status()
    if name == "cuda":
        return _cuda_status()
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def available_backends() -> dict[str, BackendStatus]:
    """What this machine can run: every backend with its availability and the reason.

    Returns:
        ``{"torch": BackendStatus(True, "torch 2.13.0"), "triton": ..., "cuda": ...}``.
        An available backend may still lack a kernel for a given op; the op says so.
    """
    return {name: backend_status(name) for name in BACKENDS}


def _serves_device(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_active())
    return device.type == "cuda"  # the C++ extension: CUDA and ROCm tensors alike


@torch.compiler.assume_constant_result
def resolve_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    implemented: tuple[str, ...],
    auto_order: tuple[str, ...] = ("triton",),
) -> str:
    """Picks the backend for one call of ``op`` on tensors on ``device``.

    Args:
        op: the op's name, for messages.
        device: where the op's tensors are.
        requested: the caller's ``backend=`` argument (None or "auto" defers to the
            environment variable, then to auto).
        implemented: the backends that have this op.
        auto_order: GPU backends auto tries first, in order, before falling back to torch.

    Raises:
        ValueError: ``requested`` (or the environment variable) names no backend.
        BackendUnavailableError: the explicit choice cannot serve this call.

    Under ``torch.compile`` the choice is made once, when the calling graph is traced.
    """
    source = "backend="
    if requested is None or requested == "auto":
        requested = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    if requested is None or requested == "auto":
        if device.type == "cuda":
            for name in auto_order:
                if name in implemented and backend_status(name).available:
                    return name
        return "torch"
    if requested not in BACKENDS:
        argument = "backend" if source == "backend=" else ENV_VAR
        raise ValueError(f"{argument}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {requested!r}")
    if requested not in implemented:
        raise BackendUnavailableError(
            f"{op}: the {requested!r} backend (from {source}) has no kernel for this op; "
            f"it has: {', '.join(implemented)}")
    status = backend_status(requested)
    if not status.available:
        raise BackendUnavailableError(
            f"{op}: the {requested!r} backend (from {source}) is unavailable: {status.reason}")
    if not _serves_device(requested, device):
        raise BackendUnavailableError(
            f"{op}: the {requested!r} backend (from {source}) cannot run on {device.type} tensors")
    return requested
