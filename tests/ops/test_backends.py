"""Backend choice: argument, then EUROCORE_BACKEND, then auto; explicit choices never fall back."""

import pytest
import torch

import eurocore.ops.backends as backends
from eurocore.ops import (
    BackendUnavailableError,
    available_backends,
    flash_attention,
    rms_norm,
    rms_norm_reference,
)
from tests.conftest import DEVICE


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts forward launches of the Triton RMSNorm kernel."""
    from eurocore.kernels import rms_norm as launchers

    calls = []
    original = launchers.rms_norm_fwd

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(launchers, "rms_norm_fwd", counted)
    return calls


def test_available_backends_explains_each():
    status = available_backends()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available
    for name, s in status.items():
        assert s.reason, f"{name} has no reason"
    if not torch.cuda.is_available():
        if backends.cuda_emulation_active():  # the tests' default without a GPU
            assert status["cuda"].available
            assert "emulator" in status["cuda"].reason
        else:
            assert not status["cuda"].available
            assert "GPU" in status["cuda"].reason or "not built" in status["cuda"].reason


def test_auto_uses_torch_on_cpu(triton_launches, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(3, 8)
    assert torch.equal(rms_norm(x), rms_norm_reference(x))
    assert triton_launches == []


@pytest.mark.gpu
def test_auto_uses_triton_on_gpu(triton_launches, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    rms_norm(torch.randn(3, 8, device="cuda"))
    assert triton_launches == [1]


def test_environment_variable_chooses(triton_launches, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    rms_norm(torch.randn(3, 8, device=DEVICE))
    assert triton_launches == [1]
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    rms_norm(torch.randn(3, 8, device=DEVICE))
    assert triton_launches == [1]


def test_argument_beats_environment(triton_launches, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    rms_norm(torch.randn(3, 8, device=DEVICE), backend="triton")
    assert triton_launches == [1]


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"^backend\b"):
        rms_norm(torch.randn(3, 8), backend="cudnn")
    monkeypatch.setenv(backends.ENV_VAR, "tritn")
    with pytest.raises(ValueError, match=rf"^{backends.ENV_VAR}\b"):
        rms_norm(torch.randn(3, 8))


def test_explicit_backend_without_kernel_raises():
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match=r"flash_attention.*'cuda'.*no kernel"):
        flash_attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("op", sorted(backends.AUTO_ORDER))
@pytest.mark.parametrize("vendor", ["nvidia", "amd"])
def test_auto_takes_the_first_available_of_the_measured_order(op, vendor, monkeypatch):
    """Auto on a GPU walks AUTO_ORDER (fastest measured first) and never picks a backend
    that is not built or not available; with none, it falls back to torch."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "gpu_vendor", lambda: vendor)
    order = backends.AUTO_ORDER[op][vendor]
    assert set(order) == {"triton", "cuda"}
    gpu = torch.device("cuda")
    implemented = ("torch", "triton", "cuda")
    for available in [set(order), set(order[1:]), set(order[:1]), set()]:
        monkeypatch.setattr(backends, "backend_status", lambda name, ok=available:
                            backends.BackendStatus(name in ok or name == "torch", "test"))
        expected = next((name for name in order if name in available), "torch")
        assert backends.resolve_backend(op, gpu, None, implemented) == expected, available


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch, triton_launches):
    monkeypatch.setattr(backends, "triton_interpreter_active", lambda: False)
    with pytest.raises(BackendUnavailableError, match="cpu"):
        rms_norm(torch.randn(3, 8), backend="triton")
    assert triton_launches == []
