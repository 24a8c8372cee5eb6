"""Selective activation recomputation: keep the inputs of a cheap op, not its output.

A projection saves its input for the weight gradient. When that input is the output of a
cheap op whose own backward already keeps the op's inputs (RMSNorm keeps x and rstd;
SwiGLU keeps gate and up), keeping the output too buys nothing but memory. After the
projection has run, :func:`free_until_backward` empties the output's storage (the tensor
object that autograd saved stays, with no bytes behind it) and, in the backward, refills it
with the op computed again, right before the projection's backward reads it. The graph is
untouched: gradients are bit for bit those of no recomputation (the same kernel recomputes
the same bits).

This is Megatron-LM's ``CheckpointWithoutOutput`` idea, not ``torch.utils.checkpoint``:
checkpointing the norm with its projection would run the projection's matmul again, and
selective-checkpoint policies see only ops that pass through the dispatcher. The refill is
a tensor hook on a tensor downstream of the projection, whose gradient autograd computes
before the projection's backward runs. Eager mode only (storage resizing does not trace).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def free_until_backward(output: torch.Tensor, downstream: torch.Tensor,
                        recompute: Callable[[], torch.Tensor]) -> None:
    """Frees ``output``'s storage now and refills it in the backward with ``recompute()``
    (run under ``no_grad``) when ``downstream``'s gradient arrives.

    Args:
        output: a contiguous tensor owning its whole storage (a fresh op output) whose
            consumers have all run; only their backward may read it again.
        downstream: a tensor computed from those consumers' outputs, so that its gradient
            is ready before any of their backwards runs (the projection's output).
        recompute: returns ``output``'s value again, with its shape, dtype and strides.

    Nothing happens without autograd (no grad mode, or ``downstream`` needs no gradient).
    """
    if not torch.is_grad_enabled() or not downstream.requires_grad:
        return
    storage = output.untyped_storage()
    if not output.is_contiguous() or output.storage_offset() or \
            storage.nbytes() != output.numel() * output.element_size():
        raise ValueError("output: expected a contiguous tensor that owns its whole storage")
    nbytes = storage.nbytes()
    storage.resize_(0)

    def refill(grad: torch.Tensor) -> None:
        if storage.nbytes():  # already refilled (a second backward with retain_graph)
            return
        with torch.no_grad():
            value = recompute()
        if value.untyped_storage().nbytes() != nbytes or not value.is_contiguous():
            raise RuntimeError("recompute: returned a tensor laid out unlike the output")
        storage.resize_(nbytes)
        # a storage copy: autograd's saved tensor keeps its version, so no in-place error
        storage.copy_(value.untyped_storage())

    downstream.register_hook(refill)
