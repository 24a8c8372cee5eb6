"""eurocore.nn.RMSNorm / LlamaRMSNorm as drop-ins for torch.nn.RMSNorm and HF LlamaRMSNorm."""

import pytest
import torch

from eurocore.nn import LlamaRMSNorm, RMSNorm
from tests.conftest import DEVICE
from tests.ops.test_rms_norm import KERNEL_BACKENDS


def hf_llama_rms_norm(weight, x, eps):
    """HF transformers' LlamaRMSNorm.forward, written out (transformers is not a dependency)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


@pytest.mark.parametrize(
    "args, kwargs",
    [((64,), {}), ((64,), {"eps": 1e-5}), (((4, 16),), {}), ((64,), {"elementwise_affine": False})],
    ids=["default", "eps", "2d-shape", "no-affine"],
)
def test_matches_torch_rmsnorm_and_its_state_dict(args, kwargs):
    gen = torch.Generator().manual_seed(0)
    ours, theirs = RMSNorm(*args, **kwargs), torch.nn.RMSNorm(*args, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if ours.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=gen))
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 64, generator=gen).reshape(3, 5, *theirs.normalized_shape)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())  # and back


def test_llama_rmsnorm_is_hf_bitwise_on_the_reference_backend():
    norm = LlamaRMSNorm(96, eps=1e-5, dtype=torch.bfloat16, backend="torch")
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    assert norm.variance_epsilon == 1e-5
    assert torch.equal(norm(x), hf_llama_rms_norm(norm.weight, x, 1e-5))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_module_with_residual_and_backend(backend):
    norm = RMSNorm(40, eps=1e-6, device=DEVICE, backend=backend)
    x, res = torch.randn(2, 3, 40, device=DEVICE), torch.randn(2, 3, 40, device=DEVICE)
    y, h = norm(x, res)
    torch.testing.assert_close(h, x + res)
    torch.testing.assert_close(y, RMSNorm(40, eps=1e-6, device=DEVICE, backend="torch")(x + res))


def test_zero_centered_weight_starts_as_identity_scale():
    norm = RMSNorm(16, zero_centered_weight=True)
    assert torch.equal(norm.weight, torch.zeros(16))
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), RMSNorm(16)(x))


def test_wrong_trailing_shape_names_x():
    with pytest.raises(ValueError, match=r"^x\b"):
        RMSNorm(16)(torch.randn(4, 15))
