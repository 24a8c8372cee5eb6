"""The collectives of tensor and sequence parallelism, as autograd functions.

Each is named by what it does forward and what its backward does (Megatron's names in
brackets). With group None, or a group of one rank, each is the identity both ways.

    copy_forward_all_reduce_backward            (copy_to_tensor_model_parallel_region)
    all_reduce_forward_copy_backward            (reduce_from_tensor_model_parallel_region)
    split_forward_all_gather_backward           (scatter_to_..._region, any dim)
    all_gather_forward_split_backward           (gather_from_..._region, any dim)
    all_gather_forward_reduce_scatter_backward  (gather_from_sequence_parallel_region)
    reduce_scatter_forward_all_gather_backward  (reduce_scatter_to_sequence_parallel_region)

Splits and gathers take the local pieces in rank order along ``dim``; the size along it
must divide evenly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()  # never reduce into a tensor autograd may share
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"x: size {x.shape[dim]} along dim {dim} does not split over "
                         f"{size} ranks")
    return x.chunk(size, dim)[dist.get_rank(group)].contiguous()


# torch 2.13 renamed the single-tensor collectives (the old names warn there); older
# releases have only the old names. Looked up at each call, so a test can wrap them.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") \
    else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") \
    else "reduce_scatter_tensor"


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = _size(group)
    local = x.movedim(dim, 0).contiguous()
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    getattr(dist, ALL_GATHER)(out, local, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"x: size {x.shape[dim]} along dim {dim} does not split over "
                         f"{size} ranks")
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
    getattr(dist, REDUCE_SCATTER)(out, full, group=group)
    return out.movedim(0, dim)


class _CopyForwardAllReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _AllReduceForwardCopyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitForwardAllGatherBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _AllGatherForwardSplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _AllGatherForwardReduceScatterBackward(_AllGatherForwardSplitBackward):
    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterForwardAllGatherBackward(_SplitForwardAllGatherBackward):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)


def copy_forward_all_reduce_backward(x: torch.Tensor,
                                     group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; the backward sums the gradient over the group. Before a
    column-parallel layer: every rank's partial input gradient adds up."""
    return x if _size(group) == 1 else _CopyForwardAllReduceBackward.apply(x, group)


def all_reduce_forward_copy_backward(x: torch.Tensor,
                                     group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sums x over the group forward; the gradient passes through. After a row-parallel
    layer: the partial products add up."""
    return x if _size(group) == 1 else _AllReduceForwardCopyBackward.apply(x, group)


def split_forward_all_gather_backward(x: torch.Tensor, group: dist.ProcessGroup | None,
                                      dim: int = -1) -> torch.Tensor:
    """Keeps this rank's 1/size chunk of x along ``dim``; the backward gathers the
    gradient's chunks. x: (..., n, ...) -> (..., n / size, ...), same dtype."""
    return x if _size(group) == 1 else _SplitForwardAllGatherBackward.apply(x, group, dim)


def all_gather_forward_split_backward(x: torch.Tensor, group: dist.ProcessGroup | None,
                                      dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's x along ``dim``; the backward keeps this rank's chunk of the
    gradient. x: (..., n, ...) -> (..., n · size, ...)."""
    return x if _size(group) == 1 else _AllGatherForwardSplitBackward.apply(x, group, dim)


def all_gather_forward_reduce_scatter_backward(x: torch.Tensor,
                                               group: dist.ProcessGroup | None,
                                               dim: int = 0) -> torch.Tensor:
    """Sequence parallelism into a column-parallel layer: gathers the sequence shards
    forward; the backward sums the gradient over the group and keeps this rank's shard."""
    if _size(group) == 1:
        return x
    return _AllGatherForwardReduceScatterBackward.apply(x, group, dim)


def reduce_scatter_forward_all_gather_backward(x: torch.Tensor,
                                               group: dist.ProcessGroup | None,
                                               dim: int = 0) -> torch.Tensor:
    """Sequence parallelism out of a row-parallel layer: sums the partial products and keeps
    this rank's sequence shard; the backward gathers the gradient's shards."""
    if _size(group) == 1:
        return x
    return _ReduceScatterForwardAllGatherBackward.apply(x, group, dim)
