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


def check_index_tensor(arg: str, tensor, device: torch.device) -> None:
    """An int32/int64 tensor on ``device``; raises TypeError/ValueError naming ``arg``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{arg}: expected int32 or int64, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{arg}: is on {tensor.device} but q is on {device}")


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
