"""SwiGLU, the gated activation of the Llama MLP: ``silu(gate) * up``.

``swiglu_reference`` is the specification (the ``torch`` backend); the Triton backend is
registered as the ``torch.library`` custom ops ``eurocore::swiglu_fwd`` and
``eurocore::swiglu_bwd`` with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them; plain eager calls skip the dispatcher (``eurocore.ops.dispatch``).
There is no C++ (``cuda``) kernel for this op.
"""

from __future__ import annotations

import functools

import torch

from eurocore.ops import dispatch
from eurocore.ops.backends import kernel_launchers, resolve_backend

IMPLEMENTED = ("torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``, computed in fp32 and rounded once
    to the inputs' dtype; the backward saves gate and up, not the output.

    Args:
        gate: any shape, float16, bfloat16 or float32 (float64 on the torch backend); any
            strides (row-strided views, such as the halves of a fused gate/up projection,
            are read in place by the kernel).
        up: gate's shape, dtype and device; any strides.
        backend: "torch", "triton", "auto" or None (see ``eurocore.ops.backends``); this op
            has no "cuda" kernel.

    Returns:
        A new contiguous tensor shaped like gate, in gate's dtype.
    """
    _check_args(gate, up)
    name = resolve_backend("swiglu", gate.device, backend, IMPLEMENTED)
    if name == "torch":
        return swiglu_reference(gate, up)
    if gate.dtype not in KERNEL_DTYPES:
        raise TypeError(f"gate: the {name} backend takes float16, bfloat16 or float32, "
                        f"got {gate.dtype}")
    return _swiglu_fwd(gate, up, name)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The specification of :func:`swiglu` in plain PyTorch (its ``torch`` backend).

    Computes in fp32, or in float64 for float64 inputs, which makes it the float64 oracle
    of the tests as well. Gradients are autograd's.
    """
    compute_dtype = torch.promote_types(gate.dtype, torch.float32)
    g, u = gate.to(compute_dtype), up.to(compute_dtype)
    return (torch.nn.functional.silu(g) * u).to(gate.dtype)


def _check_args(gate, up) -> None:
    """Raises ValueError/TypeError naming the first bad argument; nothing has run yet."""
    for arg, tensor in (("gate", gate), ("up", up)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {tensor.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected gate's dtype {gate.dtype}, got {up.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, "
                         f"got {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"up: is on {up.device} but gate is on {gate.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A non-empty t as a (rows, n) view with unit stride along n (a 0-d tensor is one row
    of one); copies only when no such view exists."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@functools.cache
def _launchers(backend: str):
    return kernel_launchers("swiglu", "swiglu", backend)


@dispatch.custom_op("eurocore::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    y = _swiglu_fwd_fake(gate, up, backend)
    if y.numel():
        _launchers(backend).swiglu_fwd(_rows(gate), _rows(up), _rows(y))
    return y


@_swiglu_fwd.register_fake
def _swiglu_fwd_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


@dispatch.custom_op("eurocore::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dgate, dup), new contiguous tensors in gate's dtype."""
    dgate, dup = _swiglu_bwd_fake(dy, gate, up, backend)
    if gate.numel():
        _launchers(backend).swiglu_bwd(_rows(dy.to(gate.dtype)), _rows(gate), _rows(up),
                                       _rows(dgate), _rows(dup))
    return dgate, dup


@_swiglu_bwd.register_fake
def _swiglu_bwd_fake(dy, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_fwd_setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _swiglu_fwd_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_bwd(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_fwd.register_autograd(_swiglu_fwd_backward, setup_context=_swiglu_fwd_setup_context)
