"""Input checks shared by the ops: index tensors and packed-sequence boundaries.

Checks that read device memory (a synchronisation) run in eager mode only:
:func:`reads_allowed` is False while torch.compile traces or a CUDA graph is captured.
"""

from __future__ import annotations

import itertools

import torch


def reads_allowed() -> bool:
    """Whether a check may read device data now (not tracing, not capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_index_tensor(arg: str, tensor, device: torch.device, anchor: str = "q") -> None:
    """An int32/int64 tensor on ``device`` (``anchor``'s, the tensor the others follow);
    raises TypeError/ValueError naming ``arg``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{arg}: expected int32 or int64, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{arg}: is on {tensor.device} but {anchor} is on {device}")


def check_cu_seqlens_shape(arg: str, cu_seqlens, device: torch.device) -> None:
    """Packed-sequence boundaries: an index tensor of shape (sequences + 1,), at least 2."""
    check_index_tensor(arg, cu_seqlens, device)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{arg}: expected (sequences + 1,) with at least 2 entries, got "
                         f"shape {tuple(cu_seqlens.shape)}")


def cu_seqlens_lengths(arg: str, cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """Reads the boundaries (one synchronisation), checks they start at 0, never decrease
    and end at ``total`` tokens; returns the sequence lengths."""
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{arg}: must start at 0 and end at the {total} packed tokens, got "
                         f"{values[0]} .. {values[-1]}")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if min(lengths) < 0:
        raise ValueError(f"{arg}: must be non-decreasing, got {values}")
    return lengths


def kernel_index(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """An index tensor (cu_seqlens, per-sequence offsets) as the kernels read it: with unit
    stride. The checks read values, not layout, so every op passes its index tensors through
    here before a launch (a column of a 2-D tensor would otherwise be read as its row)."""
    return None if tensor is None else tensor.contiguous()


def check_no_self_overlap(arg: str, tensor: torch.Tensor) -> None:
    """Raises ValueError naming ``arg`` when two elements of ``tensor`` may share memory
    (an expanded, stride-0 view; an ``as_strided`` view folding back on itself): an op
    writing it in place would write those places twice."""
    if tensor.numel() == 0:
        return
    inner_span = 0
    for stride, size in sorted(_dims(tensor)):  # innermost first
        if stride <= inner_span:
            raise ValueError(f"{arg}: some of its elements share memory (strides "
                             f"{tuple(tensor.stride())} for shape {tuple(tensor.shape)}, an "
                             f"expanded tensor?), so it cannot be written in place; pass a "
                             f"copy, or inplace=False")
        inner_span += (size - 1) * stride


def check_disjoint(arg: str, tensor: torch.Tensor, other_arg: str,
                   other: torch.Tensor) -> None:
    """Raises ValueError naming ``arg`` when ``tensor`` and ``other`` may have an element in
    common: written in place together, that element would be written twice."""
    if _may_share_elements(tensor, other):
        raise ValueError(f"{arg}: shares memory with {other_arg}; in place, each element "
                         f"must belong to one of them (pass separate tensors, or "
                         f"inplace=False)")


def _may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """False when ``a`` and ``b`` provably have no element in common; True when they do, or
    when the proof is out of reach. Reads metadata only.

    Two views of one buffer (q and k split off a fused qkv projection) interleave in memory
    without sharing elements, so byte ranges alone would condemn them. Element offsets are
    ``Σ i_d · stride_d``; two views collide when ``Σ (i_d − j_d) · stride_d`` equals the
    distance between their first elements. Walking the strides from the largest, only a
    couple of values of ``i_d − j_d`` leave the rest of the distance reachable by the inner
    dims, so the search stays small (see ``_collide``). Addresses, not storages, decide:
    two storages may wrap the same memory (``torch.from_numpy`` of two overlapping slices).
    """
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    first_a, first_b = a.data_ptr(), b.data_ptr()
    last_a = first_a + _span(a) * a.element_size() + a.element_size()
    last_b = first_b + _span(b) * b.element_size() + b.element_size()
    if last_a <= first_b or last_b <= first_a:
        return False
    if a.dtype != b.dtype or (first_b - first_a) % a.element_size():
        return True
    sizes_a, sizes_b = _size_by_stride(a), _size_by_stride(b)
    if sizes_a is None or sizes_b is None:
        return True
    strides = sorted(set(sizes_a) | set(sizes_b), reverse=True)
    return _collide(strides, [sizes_a.get(s, 1) for s in strides],
                    [sizes_b.get(s, 1) for s in strides], (first_b - first_a) // a.element_size())


def _span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last element in memory."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def _dims(t: torch.Tensor) -> list[tuple[int, int]]:
    """(stride, size) of the dims longer than 1 (the others place no element)."""
    return [(stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1]


def _size_by_stride(t: torch.Tensor) -> dict[int, int] | None:
    """{stride: size} of the dims longer than 1; None when two share a stride or one is 0."""
    dims = _dims(t)
    strides = [stride for stride, _ in dims]
    if 0 in strides or len(set(strides)) != len(strides):
        return None
    return dict(dims)


def _collide(strides: list[int], sizes_a: list[int], sizes_b: list[int], distance: int,
             max_candidates: int = 4) -> bool:
    """Whether ``Σ c_d · strides[d] = distance`` for some ``c_d`` in ``[-(sizes_b[d] - 1),
    sizes_a[d] - 1]`` (strides descending): an element of a at the distance of one of b."""
    if not strides:
        return distance == 0
    stride, rest = strides[0], strides[1:]
    inner_a = sum((n - 1) * s for n, s in zip(sizes_a[1:], rest, strict=True))
    inner_b = sum((n - 1) * s for n, s in zip(sizes_b[1:], rest, strict=True))
    # The inner dims reach differences in [-inner_b, inner_a]: c · stride must come within
    # that of the distance.
    low = max(-(sizes_b[0] - 1), -((inner_a - distance) // stride))
    high = min(sizes_a[0] - 1, (distance + inner_b) // stride)
    if high - low + 1 > max_candidates:
        return True  # strides that do not nest: out of this search's reach, assume the worst
    return any(_collide(rest, sizes_a[1:], sizes_b[1:], distance - c * stride, max_candidates)
               for c in range(low, high + 1))
