"""Backend choice, the one dispatch path every op goes through.

Backends: ``torch`` (plain PyTorch, fp32 math: the reference and the specification),
``triton`` (``eurocore.kernels``) and ``cuda`` (the C++ extension ``eurocore._C``, built for
CUDA or HIP; on ROCm the same name serves the HIP build).

Without a GPU the kernel backends can still run for tests: Triton's interpreter
(``TRITON_INTERPRET=1``) and the C++ kernels' CPU emulator (``EUROCORE_CUDA_EMULATION=1``,
the module ``eurocore._C_emulated``) both take CPU tensors.

The choice, per call: the op's ``backend=`` argument, else the ``EUROCORE_BACKEND``
environment variable, else ``auto``: the op's preferred GPU backend for CUDA/ROCm tensors,
``torch`` elsewhere. An explicit choice that cannot serve the call raises
:class:`BackendUnavailableError` saying why; it never falls back to another backend.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "EUROCORE_BACKEND"
EMULATION_ENV_VAR = "EUROCORE_CUDA_EMULATION"


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


def cuda_emulation_active() -> bool:
    """True when the ``cuda`` backend runs its kernels on the CPU emulator
    (``EUROCORE_CUDA_EMULATION=1``; the module ``eurocore._C_emulated``)."""
    return os.environ.get(EMULATION_ENV_VAR, "0") not in ("", "0")


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


def cuda_extension():
    """The ``cuda`` backend's extension module: ``eurocore._C``, or ``eurocore._C_emulated``
    under ``EUROCORE_CUDA_EMULATION=1``.

    Raises:
        BackendUnavailableError: it is not built (the reason says what to do).
    """
    name = "eurocore._C_emulated" if cuda_emulation_active() else "eurocore._C"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise BackendUnavailableError(_missing_extension_reason(err)) from None


def _missing_extension_reason(err: ImportError) -> str:
    if cuda_emulation_active():
        return (f"the CPU emulation build eurocore._C_emulated is not built ({err}); "
                f"{EMULATION_ENV_VAR}=1 needs an install with EUROCORE_CPU_EMULATION=ON "
                "(scripts/setup_env.sh sets it)")
    return (f"the C++ extension eurocore._C is not built ({err}); it builds at install time "
            "when nvcc or hipcc is found (README: Building the cuda backend)")


@functools.cache
def _cuda_status() -> BackendStatus:
    try:
        extension = cuda_extension()
    except BackendUnavailableError as err:
        return BackendStatus(False, str(err))
    if extension.gpu_backend() == "emulation":
        return BackendStatus(True, f"eurocore._C_emulated: the C++ kernels on the CPU emulator "
                                   f"({EMULATION_ENV_VAR}=1)")
    built = f"eurocore._C built with {extension.gpu_backend()} for {extension.gpu_archs()}"
    if extension.gpu_device_count() == 0:
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


def check_backend_name(backend: str | None, arg: str = "backend") -> str | None:
    """None, "auto" or one of :data:`BACKENDS` (modules check theirs at construction, the ops
    at each call); returns it, else raises ValueError naming ``arg``."""
    if backend is not None and (not isinstance(backend, str)
                                or backend not in ("auto", *BACKENDS)):
        raise ValueError(f"{arg}: expected None, 'auto' or one of "
                         f"{', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


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
    # The C++ extension: CUDA and ROCm tensors alike, or CPU tensors on its emulator.
    return device.type == "cuda" or (device.type == "cpu" and cuda_emulation_active())


# Auto's order on GPUs, per op and vendor: the fastest backend measured on that device class
# first, then the others (auto takes the first that is built and available, so never an
# unbuilt one). Triton leads everywhere: it reached the copy bandwidth for RMSNorm and 84-89%
# of it for rotary on an H100 (benchmarks/results/2026-11-25-nvidia-h100-80gb-hbm3/); the
# C++ kernels have not been measured on a GPU yet, and nothing has run on AMD yet.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "rms_norm": {"nvidia": ("triton", "cuda"), "amd": ("triton", "cuda")},
    "apply_rotary": {"nvidia": ("triton", "cuda"), "amd": ("triton", "cuda")},
}


def kernel_launchers(op: str, kernel: str, backend: str):
    """The launcher module an op's kernels run through on ``backend``: ``eurocore.kernels.
    <kernel>`` for "triton", the C++ extension's wrappers (``eurocore.ops.cuda_launchers``)
    for "cuda". Imported on first use; callers cache the answer (an import statement per call
    costs about 1 µs of host time). ``op`` names the op in the error for any other backend,
    which ``resolve_backend`` never returns."""
    if backend == "triton":
        return importlib.import_module(f"eurocore.kernels.{kernel}")
    if backend == "cuda":
        return importlib.import_module("eurocore.ops.cuda_launchers")
    raise AssertionError(f"{op}: no launchers for backend {backend!r}")


def gpu_vendor() -> str:
    """"amd" under a ROCm build of torch, else "nvidia"."""
    return "amd" if torch.version.hip else "nvidia"


@torch.compiler.assume_constant_result
def resolve_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    implemented: tuple[str, ...],
) -> str:
    """Picks the backend for one call of ``op`` on tensors on ``device``.

    Args:
        op: the op's name, for messages.
        device: where the op's tensors are.
        requested: the caller's ``backend=`` argument (None or "auto" defers to the
            environment variable, then to auto).
        implemented: the backends that have this op. Auto on a GPU tries
            ``AUTO_ORDER[op][gpu_vendor()]`` (Triton alone for ops not listed) in order, then
            falls back to torch.

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
            for name in AUTO_ORDER.get(op, {}).get(gpu_vendor(), ("triton",)):
                if name in implemented and backend_status(name).available:
                    return name
        return "torch"
    if requested not in BACKENDS:
        check_backend_name(requested, "backend" if source == "backend=" else ENV_VAR)
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
