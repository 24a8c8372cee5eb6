"""eurocore.ops.rms_norm against its float64 reference, on every kernel backend."""

from __future__ import annotations

import pytest
import torch

import eurocore.ops.normalization as normalization
from eurocore.ops import rms_norm, rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

KERNEL_BACKENDS = [b for b in normalization.IMPLEMENTED if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 7), (17, 1025), (4, 4097), (2, 65536), (2, 3, 33)]
EPS = 1e-5


def _inputs(shape, dtype, *, residual, zero_centered, seed=0, residual_dtype=None,
            with_weight=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, dtype=dtype, scale=1.0):
        return (scale * torch.randn(*size, generator=gen)).to(DEVICE, dtype).requires_grad_()

    n = shape[-1]
    x = randn(*shape)
    # Zero-centred weights live near 0, plain ones near 1; both random, never all ones.
    if not with_weight:
        weight = None
    elif zero_centered:
        weight = randn(n, scale=0.1)
    else:
        weight = (1 + 0.1 * randn(n)).detach().requires_grad_()
    res = randn(*shape, dtype=residual_dtype or dtype) if residual else None
    return x, weight, res


def _forward_backward(fn, x, weight, res, zero_centered, grads):
    """Runs fn, backpropagates the given output gradients; returns outputs then input grads."""
    out = fn(x, weight, EPS, residual=res, zero_centered_weight=zero_centered)
    outs = list(out) if res is not None else [out]
    inputs = [t for t in (x, weight, res) if t is not None]
    input_grads = torch.autograd.grad(outs, inputs, grads[: len(outs)])
    return [*outs, *input_grads]


def _compare(backend, shape, dtype, residual, zero_centered, residual_dtype=None,
             with_weight=True):
    x, w, r = _inputs(shape, dtype, residual=residual, zero_centered=zero_centered,
                      residual_dtype=residual_dtype, with_weight=with_weight)
    h_dtype = dtype if r is None else torch.promote_types(dtype, r.dtype)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gen).to(DEVICE, h_dtype) for _ in range(2)]

    def with_backend(*args, **kwargs):
        return rms_norm(*args, backend=backend, **kwargs)

    actual = _forward_backward(with_backend, x, w, r, zero_centered, grads)
    same_precision = _forward_backward(rms_norm_reference, x, w, r, zero_centered, grads)

    def to64(t):
        return t.detach().double().requires_grad_() if t is not None else None

    reference64 = _forward_backward(rms_norm_reference, to64(x), to64(w), to64(r), zero_centered,
                                    [g.double() for g in grads])
    names = ["y", "h", "dx", "dweight", "dresidual"] if residual else ["y", "dx", "dweight"]
    if not with_weight:
        names.remove("dweight")
    for name, a, s, ref in zip(names, actual, same_precision, reference64, strict=True):
        assert_close_to_reference(a, ref, s, name=f"{backend} {name} {shape} {dtype}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_matches_float64_reference(backend, shape, dtype, residual):
    _compare(backend, shape, dtype, residual, zero_centered=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (4, 4097)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_zero_centered_weight(backend, shape, dtype, residual):
    _compare(backend, shape, dtype, residual, zero_centered=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 16384, 16385])
def test_block_boundaries(backend, n):
    """Each side of the smallest block, and of the switch to looping over a row."""
    _compare(backend, (5, n), torch.float32, residual=True, zero_centered=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp32_residual_stream_with_bf16_input(backend):
    """h = x + residual takes the promoted dtype, as in PyTorch; y follows h."""
    _compare(backend, (6, 130), torch.bfloat16, residual=True, zero_centered=False,
             residual_dtype=torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_without_weight(backend, residual):
    _compare(backend, (9, 300), torch.float32, residual, zero_centered=False, with_weight=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_inputs_equal_contiguous(backend):
    """Row-strided views, transposed leading dims and expanded gradients are read correctly."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 11, 2 * 97, generator=gen).to(DEVICE)
    x = wide[..., :97].transpose(0, 1)  # (11, 2, 97): no 2-D view, row stride != 97
    res = torch.randn(2, 11, 97, generator=gen).to(DEVICE).transpose(0, 1)
    w = torch.randn(97, generator=gen).to(DEVICE)
    dy = torch.randn(1, 1, 97, generator=gen).to(DEVICE).expand(11, 2, 97)  # stride-0 rows

    def run(x, res, w, dy):
        x, res, w = (t.detach().requires_grad_() for t in (x, res, w))
        y, h = rms_norm(x, w, EPS, residual=res, backend=backend)
        return [y, h, *torch.autograd.grad(y, (x, w, res), dy)]

    strided = run(x, res, w, dy)
    contiguous = run(x.contiguous(), res.contiguous(), w, dy.contiguous())
    for a, b in zip(strided, contiguous, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(17, 1025), (3, 20000)], ids=str)
def test_backward_is_deterministic(backend, shape):
    """Two backward passes give bitwise identical gradients (fixed-order dweight partials)."""
    x, w, r = _inputs(shape, torch.float32, residual=True, zero_centered=False)
    y, h = rms_norm(x, w, EPS, residual=r, backend=backend)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    first = torch.autograd.grad((y, h), (x, w, r), (dy, dh), retain_graph=True)
    second = torch.autograd.grad((y, h), (x, w, r), (dy, dh))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_rows(backend):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, EPS, backend=backend)
    assert y.shape == (0, 64)
    dx, dw = torch.autograd.grad(y.sum() + 0 * w.sum(), (x, w))
    assert dx.shape == (0, 64)
    assert torch.equal(dw, torch.zeros_like(w))


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    """A function using the op compiles with fullgraph=True and matches eager, gradients too."""

    def block(x, residual, w):
        y, h = rms_norm(x * 2, w, EPS, residual=residual, backend=backend)
        return torch.nn.functional.silu(y).sum() + h.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x, w, r = _inputs((5, 33), torch.float32, residual=True, zero_centered=False)
    eager_loss = block(x, r, w)
    eager_grads = torch.autograd.grad(eager_loss, (x, r, w))
    compiled_loss = compiled(x, r, w)
    compiled_grads = torch.autograd.grad(compiled_loss, (x, r, w))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def _launch_guard(monkeypatch):
    """Makes any kernel launch fail loudly, to prove validation happens first."""
    from eurocore.kernels import rms_norm as triton_launchers
    from eurocore.ops import cuda_launchers

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    for launchers in (triton_launchers, cuda_launchers):
        monkeypatch.setattr(launchers, "rms_norm_fwd", launched)
        monkeypatch.setattr(launchers, "rms_norm_bwd", launched)


def _bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    return [
        ("weight", ValueError, dict(x=x, weight=torch.ones(7, device=DEVICE))),
        ("weight", ValueError, dict(x=x, weight=torch.ones(4, 8, device=DEVICE))),
        ("x", TypeError, dict(x=x.to(torch.int32), weight=w)),
        ("x", TypeError, dict(x=x.tolist(), weight=w)),
        ("weight", TypeError, dict(x=x, weight=w.to(torch.int64))),
        ("weight", ValueError, dict(x=x, weight=torch.ones(8, device="meta"))),
        ("eps", ValueError, dict(x=x, weight=w, eps=-1e-6)),
        ("eps", ValueError, dict(x=x, weight=w, eps=float("nan"))),
        ("eps", TypeError, dict(x=x, weight=w, eps="1e-6")),
        ("x", ValueError, dict(x=torch.randn(4, 0, device=DEVICE), weight=None)),
        ("x", ValueError, dict(x=torch.tensor(1.0, device=DEVICE), weight=None)),
        ("residual", ValueError, dict(x=x, weight=w, residual=torch.randn(4, 9, device=DEVICE))),
        ("residual", ValueError, dict(x=x, weight=w, residual=torch.randn(4, 8, device="meta"))),
        ("residual", TypeError, dict(x=x, weight=w, residual=x.to(torch.int32))),
        ("zero_centered_weight", ValueError, dict(x=x, weight=None, zero_centered_weight=True)),
    ]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_rejected_before_launch(backend, case, monkeypatch):
    argument, error, kwargs = _bad_inputs()[case]
    _launch_guard(monkeypatch)
    with pytest.raises(error, match=rf"^{argument}\b"):
        rms_norm(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_reject_float64(backend, monkeypatch):
    _launch_guard(monkeypatch)
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^x\b.*float64"):
        rms_norm(x, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_past_2_to_the_31_elements(backend):
    """Row offsets beyond int32 (a row 2**31 elements into its storage) are read right:
    the kernels compute offsets in 64 bits. Needs about 4.3 GB of GPU memory."""
    storage = torch.empty(2**31 + 4096, dtype=torch.bfloat16, device="cuda")
    x = storage.as_strided((3, 4096), (2**30, 1))
    x.copy_(torch.randn(3, 4096, device="cuda"))
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)

    def run(x):
        x = x.detach().requires_grad_()
        y = rms_norm(x, w, EPS, backend=backend)
        return [y, *torch.autograd.grad(y, x, dy)]

    for a, b in zip(run(x), run(x.contiguous()), strict=True):
        assert torch.equal(a, b)
