"""RMSNorm over the last dimension, optionally fused with the pre-norm residual add.

``rms_norm_reference`` is the specification (the ``torch`` backend); the other backends
are registered as the ``torch.library`` custom ops ``eurocore::rms_norm_fwd`` and
``eurocore::rms_norm_bwd`` with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them; plain eager calls skip the dispatcher (``eurocore.ops.dispatch``).
"""

from __future__ import annotations

import functools

import torch

from eurocore.ops import dispatch
from eurocore.ops.backends import kernel_launchers, resolve_backend
from eurocore.utils.checks import check_bool, check_number

IMPLEMENTED = ("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_weight: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, with HF ``LlamaRMSNorm`` numerics.

    Normalises ``h`` in fp32, casts the result to ``h``'s dtype, then multiplies by the
    weight (by ``1 + weight`` when ``zero_centered_weight``) and rounds to ``h``'s dtype once
    more. ``h = x``, or ``h = x + residual`` (rounded to their promoted dtype) when a residual
    is given: the pre-norm residual stream fusion.

    Args:
        x: (..., n), float16, bfloat16 or float32 (float64 on the torch backend); any strides.
        weight: (n,) floating point, on x's device, or None for no scale.
        eps: added to the mean square; a finite number >= 0.
        residual: same shape as x, floating point, on x's device.
        zero_centered_weight: scale by ``1 + weight`` (weights initialised at zero).
        backend: "torch", "triton", "cuda", "auto" or None (see ``eurocore.ops.backends``).

    Returns:
        y, shaped like x in h's dtype; with a residual, ``(y, h)``: h is the new residual
        stream to carry to the next block.
    """
    _check_args(x, weight, eps, residual, zero_centered_weight)
    name = resolve_backend("rms_norm", x.device, backend, IMPLEMENTED)
    if name == "torch":
        return rms_norm_reference(x, weight, eps, residual=residual,
                                  zero_centered_weight=zero_centered_weight)
    for arg, tensor in (("x", x), ("weight", weight), ("residual", residual)):
        if tensor is not None and tensor.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{arg}: the {name} backend takes float16, bfloat16 or float32, "
                            f"got {tensor.dtype}")
    y, h, _ = _rms_norm_fwd(x, weight, residual, float(eps), zero_centered_weight, name)
    return y if residual is None else (y, h)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_weight: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`rms_norm` in plain PyTorch (its ``torch`` backend).

    Computes in fp32, or in float64 for float64 inputs, which makes it the float64 oracle
    of the tests as well. Gradients are autograd's.
    """
    h = x if residual is None else x + residual
    compute_dtype = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(compute_dtype)
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    if weight is not None:
        scale = weight.to(compute_dtype)
        if zero_centered_weight:
            scale = 1.0 + scale
        y = (y.to(compute_dtype) * scale).to(h.dtype)
    return y if residual is None else (y, h)


def _check_args(x, weight, eps, residual, zero_centered_weight) -> None:
    """Raises ValueError/TypeError naming the first bad argument; nothing has run yet."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: the last dimension is normalised and must be non-empty, "
                         f"got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for arg, tensor, shape in (("weight", weight, (n,)), ("residual", residual, tuple(x.shape))):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor or None, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{arg}: expected shape {shape} to match x {tuple(x.shape)}, "
                             f"got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{arg}: is on {tensor.device} but x is on {x.device}")
    check_number("eps", eps, minimum=0.0)
    check_bool("zero_centered_weight", zero_centered_weight)
    if zero_centered_weight and weight is None:
        raise ValueError("zero_centered_weight: True scales by 1 + weight, but weight is None")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) as a (rows, n) view with unit stride along n; copies only when no view exists."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@functools.cache
def _launchers(backend: str):
    return kernel_launchers("rms_norm", "rms_norm", backend)


@dispatch.custom_op("eurocore::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    zero_centered_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, rstd); h is empty without a residual (an output may not alias x)."""
    y, h, rstd = _rms_norm_fwd_fake(x, weight, residual, eps, zero_centered_weight, backend)
    n = x.shape[-1]
    _launchers(backend).rms_norm_fwd(
        _rows(x), weight.contiguous() if weight is not None else None,
        _rows(residual) if residual is not None else None, eps, zero_centered_weight,
        y.view(-1, n), h.view(-1, n) if residual is not None else None, rstd.view(-1))
    return y, h, rstd


@_rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, weight, residual, eps, zero_centered_weight, backend):
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = x.new_empty(x.shape, dtype=h_dtype)
    h = x.new_empty(x.shape if residual is not None else (0,), dtype=h_dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return y, h, rstd


@dispatch.custom_op("eurocore::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor,
    dh_in: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    zero_centered_weight: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dresidual, dweight); dresidual is empty unless its dtype differs from
    x's (then dx serves both), dweight is empty without a weight."""
    dx, dr = _input_grads(h, x_dtype, residual_dtype)
    n = h.shape[-1]
    dw = _launchers(backend).rms_norm_bwd(
        _rows(dy), _rows(dh_in) if dh_in is not None else None, _rows(h),
        weight.contiguous() if weight is not None else None, rstd.view(-1),
        zero_centered_weight, dx.view(-1, n), dr.view(-1, n) if dr.numel() else None)
    return dx, dr, dw.to(weight.dtype) if weight is not None else h.new_empty(0)


def _input_grads(h: torch.Tensor, x_dtype: torch.dtype, residual_dtype: torch.dtype | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (dx, dresidual) for the backward to write: dresidual only when the residual's
    dtype differs from x's, else (0,) (dx serves both)."""
    dx = h.new_empty(h.shape, dtype=x_dtype)
    separate_dr = residual_dtype is not None and residual_dtype != x_dtype
    dr = h.new_empty(h.shape if separate_dr else (0,), dtype=residual_dtype or x_dtype)
    return dx, dr


@_rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy, dh_in, h, weight, rstd, zero_centered_weight, x_dtype,
                       residual_dtype, backend):
    dw = weight.new_empty(weight.shape) if weight is not None else h.new_empty(0)
    return (*_input_grads(h, x_dtype, residual_dtype), dw)


def _rms_norm_fwd_setup_context(ctx, inputs, output):
    x, weight, residual, _eps, zero_centered_weight, backend = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)
    ctx.zero_centered_weight = zero_centered_weight
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.backend = backend


def _rms_norm_fwd_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    dx, dr, dw = _rms_norm_bwd(
        dy, dh if has_residual else None, h, weight, rstd, ctx.zero_centered_weight,
        ctx.x_dtype, ctx.residual_dtype, ctx.backend)
    dresidual = (dr if ctx.residual_dtype != ctx.x_dtype else dx) if has_residual else None
    return dx, dw if weight is not None else None, dresidual, None, None, None


_rms_norm_fwd.register_autograd(_rms_norm_fwd_backward,
                                setup_context=_rms_norm_fwd_setup_context)
