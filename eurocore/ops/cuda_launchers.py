"""Launchers of the ``cuda`` backend: the C++ kernels of ``csrc/`` (``eurocore._C``, built
for CUDA or HIP), with the signatures of the Triton launchers in ``eurocore.kernels``, so the
ops call either the same way.

The extension takes integer data pointers, element strides, dtype codes, the device index
and the current stream; it never links libtorch. The kernels take one activation dtype
(float32, float16 or bfloat16), a table or weight in that dtype or float32, and int64
positions; anything else (a residual of another dtype, a float64 table, int32 positions) is
converted here first, as the Triton launchers' loads convert it.

With ``EUROCORE_CUDA_EMULATION=1`` (the tests set it without a GPU) the extension is
``eurocore._C_emulated``, the same sources compiled for a CPU emulator, and the tensors
are CPU tensors.
"""

from __future__ import annotations

import torch

from eurocore.ops.backends import cuda_extension

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _device_and_stream(extension, name: str, tensor: torch.Tensor) -> tuple[int, int]:
    """The device index and stream handle for a launch on ``tensor``'s device (the ops have
    checked that the other tensors share it); rejects a tensor the build cannot reach (a CPU
    tensor for a GPU build) with a ValueError naming the argument."""
    expected = "cpu" if extension.gpu_backend() == "emulation" else "cuda"
    if tensor.device.type != expected:
        where = "CUDA or ROCm tensors" if expected == "cuda" else "CPU tensors (emulator)"
        raise ValueError(f"{name}: the cuda backend ({extension.gpu_backend()} build) takes "
                         f"{where}, got a tensor on {tensor.device}")
    if expected == "cpu":
        return 0, 0
    index = tensor.device.index if tensor.device.index is not None else \
        torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def _ptr(tensor: torch.Tensor | None) -> int:
    return tensor.data_ptr() if tensor is not None else 0


def _strides(tensor: torch.Tensor, dims: int) -> tuple[int, ...]:
    """The strides of the first ``dims`` dimensions, 0 for a dimension of size 1: its stride
    never multiplies a nonzero index, and an odd one must not cost the 16-byte path."""
    return tuple(tensor.stride(d) if tensor.shape[d] > 1 else 0 for d in range(dims))


def _as_weight(weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight as the kernels take it: in ``dtype`` or fp32, 16-byte aligned. An unaligned
    weight (a view into a flat parameter buffer) is copied, n elements, rather than costing
    the activations their 16-byte accesses."""
    if weight is None:
        return None
    if weight.dtype not in (dtype, torch.float32):
        return weight.float()
    return weight if weight.data_ptr() % 16 == 0 else weight.clone()


def _row_stride(tensor: torch.Tensor | None) -> int:
    return _strides(tensor, 1)[0] if tensor is not None else 0


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    zero_centered_weight: bool,
    y: torch.Tensor,
    h: torch.Tensor | None,
    rstd: torch.Tensor,
) -> None:
    """The forward into preallocated outputs: the contract of
    ``eurocore.kernels.rms_norm.rms_norm_fwd``."""
    extension = cuda_extension()
    device, stream = _device_and_stream(extension, "x", x)
    dtype = y.dtype
    x, residual = _as(x, dtype), _as(residual, dtype)
    weight = _as_weight(weight, dtype)
    n_rows, n_cols = x.shape
    extension.rms_norm_forward(
        _ptr(x), _row_stride(x), _ptr(residual), _row_stride(residual), _ptr(weight), _ptr(y),
        _row_stride(y), _ptr(h) if residual is not None else 0, _row_stride(h), _ptr(rstd),
        n_rows, n_cols, eps, zero_centered_weight, DTYPE_CODES[dtype],
        DTYPE_CODES[weight.dtype if weight is not None else dtype], device, stream)


def rms_norm_bwd(
    dy: torch.Tensor,
    dh_in: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    zero_centered_weight: bool,
    dx: torch.Tensor,
    dr: torch.Tensor | None,
) -> torch.Tensor | None:
    """The backward: the contract of ``eurocore.kernels.rms_norm.rms_norm_bwd`` (returns the
    fp32 weight gradient, the fixed-order sum of per-partial rows: deterministic)."""
    extension = cuda_extension()
    device, stream = _device_and_stream(extension, "dy", dy)
    dtype = h.dtype
    dy, dh_in = _as(dy, dtype), _as(dh_in, dtype)
    weight = _as_weight(weight, dtype)
    n_rows, n_cols = h.shape
    # The kernel writes gradients in h's dtype; x or the residual may have another.
    dx_out = dx if dx.dtype == dtype else torch.empty(dx.shape, dtype=dtype, device=dx.device)
    dr_out = dr if dr is not None and dr.dtype == dtype else None
    partials = extension.rms_norm_backward_partials(n_rows, n_cols, DTYPE_CODES[dtype], device)
    dw_partials = (torch.empty((partials, n_cols), dtype=torch.float32, device=h.device)
                   if weight is not None else None)
    extension.rms_norm_backward(
        _ptr(dy), _row_stride(dy), _ptr(dh_in), _row_stride(dh_in), _ptr(h), _row_stride(h),
        _ptr(weight), _ptr(rstd), _ptr(dx_out), _row_stride(dx_out), _ptr(dr_out),
        _row_stride(dr_out), _ptr(dw_partials), partials, n_rows, n_cols, zero_centered_weight,
        DTYPE_CODES[dtype], DTYPE_CODES[weight.dtype if weight is not None else dtype], device,
        stream)
    if dx_out is not dx:
        dx.copy_(dx_out)
    if dr is not None and dr_out is None:
        dr.copy_(dx_out)
    if weight is None:
        return None
    if n_rows == 0:
        return torch.zeros(n_cols, dtype=torch.float32, device=h.device)
    return dw_partials.sum(dim=0)  # a fixed-order reduction over a fixed number of rows


def rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    out_q: torch.Tensor,
    out_k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    batch_first: bool,
    interleaved: bool,
    conjugate: bool,
    in_place: bool,
) -> None:
    """out_q, out_k = rotate(q, k) on the C++ kernel, under the contract (arguments, shapes,
    in place) of ``eurocore.kernels.rotary.rotary``; int32 positions are converted to int64."""
    extension = cuda_extension()
    device, stream = _device_and_stream(extension, "q", q)
    dtype = q.dtype
    if cos.dtype != sin.dtype or cos.dtype not in (dtype, torch.float32):
        cos, sin = cos.float(), sin.float()  # as the Triton kernel reads them: in fp32
    n_outer, n_inner, n_q_heads, head_dim = q.shape
    half = cos.shape[1]
    positions = _as(positions, torch.int64)
    stride_outer, stride_inner = _strides(positions, 2) if positions is not None else (0, 0)

    def strides(t: torch.Tensor | None) -> tuple[int, int, int]:
        return _strides(t, 3) if t is not None else (0, 0, 0)

    extension.rotary(
        _ptr(q), strides(q), _ptr(k), strides(k), _ptr(out_q), strides(out_q), _ptr(out_k),
        strides(out_k), n_outer, n_inner, n_q_heads, k.shape[2] if k is not None else 0,
        head_dim, _ptr(cos), _ptr(sin), cos.stride(0), half, cos.shape[0],
        DTYPE_CODES[cos.dtype], _ptr(positions), stride_outer, stride_inner, batch_first,
        interleaved, conjugate, not in_place and head_dim > 2 * half, DTYPE_CODES[dtype],
        device, stream)
