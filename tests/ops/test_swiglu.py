"""eurocore.ops.swiglu against its float64 reference, on every kernel backend."""

from __future__ import annotations

import pytest
import torch

import eurocore.ops.activation as activation
from eurocore.ops import BackendUnavailableError, swiglu, swiglu_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

KERNEL_BACKENDS = [b for b in activation.IMPLEMENTED if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 129), (3, 5, 37), (2, 4097), (7,), ()]


def _inputs(shape, dtype, seed=0, scale=3.0):
    """gate spread wide enough to reach both tails of the sigmoid; up near 1."""
    gen = torch.Generator().manual_seed(seed)
    gate = (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    return gate, up


def _forward_backward(fn, gate, up, dy):
    y = fn(gate, up)
    return [y, *torch.autograd.grad(y, (gate, up), dy)]


def _compare(backend, shape, dtype):
    gate, up = _inputs(shape, dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    def with_backend(g, u):
        return swiglu(g, u, backend=backend)

    actual = _forward_backward(with_backend, gate, up, dy)
    same_precision = _forward_backward(swiglu_reference, gate, up, dy)

    def to64(t):
        return t.detach().double().requires_grad_()

    reference64 = _forward_backward(swiglu_reference, to64(gate), to64(up), dy.double())
    for name, a, s, ref in zip(("y", "dgate", "dup"), actual, same_precision, reference64,
                               strict=True):
        assert_close_to_reference(a, ref, s, name=f"{backend} {name} {shape} {dtype}")


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(backend, shape, dtype):
    _compare(backend, shape, dtype)


def test_torch_backend_takes_float64():
    gate, up = _inputs((3, 5), torch.float64)
    y = swiglu(gate, up, backend="torch")
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, rtol=1e-14, atol=0)


def test_reference_is_silu_times_up():
    """The specification in fp32 is F.silu(gate) * up; its gradients are the closed forms
    the kernel computes."""
    gate, up = _inputs((4, 33), torch.float64)
    y = swiglu_reference(gate, up)
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    g, u, s = gate.detach(), up.detach(), torch.sigmoid(gate.detach())
    torch.testing.assert_close(dgate, dy * u * s * (1 + g * (1 - s)))
    torch.testing.assert_close(dup, dy * g * s)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_inputs_equal_contiguous(backend):
    """Halves of a fused gate/up projection (row-strided views, read in place), a transposed
    tensor (copied) and an expanded output gradient (stride-0 rows) are read correctly."""
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 11, 2 * 37, generator=gen).to(DEVICE)
    gate, up = fused.chunk(2, dim=-1)  # (2, 11, 37), row stride 74
    transposed = torch.randn(37, 11, 2, generator=gen).to(DEVICE).permute(2, 1, 0)
    dy = torch.randn(1, 1, 37, generator=gen).to(DEVICE).expand(2, 11, 37)

    def run(gate, up, dy):
        gate, up = (t.detach().requires_grad_() for t in (gate, up))
        y = swiglu(gate, up, backend=backend)
        assert y.is_contiguous()
        return [y, *torch.autograd.grad(y, (gate, up), dy)]

    for g, u in ((gate, up), (transposed, up), (gate, transposed)):
        strided = run(g, u, dy)
        contiguous = run(g.contiguous(), u.contiguous(), dy.contiguous())
        for a, b in zip(strided, contiguous, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_is_deterministic(backend):
    """Two runs, forward and backward, give bitwise identical results."""
    gate, up = _inputs((5, 4099), torch.bfloat16)
    dy = torch.randn_like(gate)
    first = _forward_backward(lambda g, u: swiglu(g, u, backend=backend), gate, up, dy)
    second = _forward_backward(lambda g, u: swiglu(g, u, backend=backend), gate, up, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 64), (3, 0), (2, 0, 5)], ids=str)
def test_empty_tensors(backend, shape):
    gate, up = _inputs(shape, torch.float32)
    y = swiglu(gate, up, backend=backend)
    assert y.shape == shape and y.dtype == torch.float32
    dgate, dup = torch.autograd.grad(y.sum() + 0 * gate.sum(), (gate, up), allow_unused=True)
    assert dgate.shape == shape and (dup is None or dup.shape == shape)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    """A function using the op compiles with fullgraph=True and matches eager, gradients too."""

    def mlp(x, w_gate, w_up):
        return swiglu(x @ w_gate, x @ w_up, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    x, w_gate, w_up = (torch.randn(*s, generator=gen).to(DEVICE).requires_grad_()
                       for s in ((5, 8), (8, 13), (8, 13)))
    eager_loss = mlp(x, w_gate, w_up)
    eager_grads = torch.autograd.grad(eager_loss, (x, w_gate, w_up))
    compiled_loss = compiled(x, w_gate, w_up)
    compiled_grads = torch.autograd.grad(compiled_loss, (x, w_gate, w_up))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def _launch_guard(monkeypatch):
    """Makes any kernel launch fail loudly, to prove validation happens first."""
    from eurocore.kernels import swiglu as triton_launchers

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    monkeypatch.setattr(triton_launchers, "swiglu_fwd", launched)
    monkeypatch.setattr(triton_launchers, "swiglu_bwd", launched)


def _bad_inputs():
    g = torch.randn(4, 8, device=DEVICE)
    return [
        ("up", ValueError, dict(gate=g, up=torch.randn(4, 9, device=DEVICE))),
        ("up", ValueError, dict(gate=g, up=torch.randn(8, 4, device=DEVICE))),
        ("up", ValueError, dict(gate=g, up=torch.randn(4, 8, device="meta"))),
        ("up", TypeError, dict(gate=g, up=g.to(torch.float16))),
        ("up", TypeError, dict(gate=g, up=g.to(torch.int32))),
        ("up", TypeError, dict(gate=g, up=g.tolist())),
        ("gate", TypeError, dict(gate=g.to(torch.int64), up=g.to(torch.int64))),
        ("gate", TypeError, dict(gate=g.to(torch.bool), up=g)),
        ("gate", TypeError, dict(gate=None, up=g)),
    ]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_rejected_before_launch(backend, case, monkeypatch):
    argument, error, kwargs = _bad_inputs()[case]
    _launch_guard(monkeypatch)
    with pytest.raises(error, match=rf"^{argument}\b"):
        swiglu(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_reject_float64(backend, monkeypatch):
    _launch_guard(monkeypatch)
    g = torch.randn(4, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^gate\b.*float64"):
        swiglu(g, g, backend=backend)


def test_no_cuda_kernel_is_said_so():
    g = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match=r"swiglu: the 'cuda' backend .* has no "
                                                      r"kernel for this op; it has: torch, triton"):
        swiglu(g, g, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend\b"):
        swiglu(g, g, backend="nope")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_past_2_to_the_31_elements(backend):
    """Row offsets beyond int32 (a row 2**31 elements into its storage) are read right:
    the kernels compute offsets in 64 bits. Needs about 4.3 GB of GPU memory."""
    storage = torch.empty(2**31 + 4096, dtype=torch.bfloat16, device="cuda")
    gate = storage.as_strided((3, 4096), (2**30, 1))
    gate.copy_(torch.randn(3, 4096, device="cuda"))
    up = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)

    def run(gate):
        gate = gate.detach().requires_grad_()
        y = swiglu(gate, up, backend=backend)
        return [y, *torch.autograd.grad(y, gate, dy)]

    for a, b in zip(run(gate), run(gate.contiguous()), strict=True):
        assert torch.equal(a, b)
