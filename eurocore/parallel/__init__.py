"""Parallelism: process groups and the collectives tensor and sequence parallelism use."""

from eurocore.parallel.collectives import (
    all_gather_forward_reduce_scatter_backward,
    all_gather_forward_split_backward,
    all_reduce_forward_copy_backward,
    copy_forward_all_reduce_backward,
    reduce_scatter_forward_all_gather_backward,
    split_forward_all_gather_backward,
)
from eurocore.parallel.groups import ParallelGroups

__all__ = [
    "ParallelGroups",
    "all_gather_forward_reduce_scatter_backward",
    "all_gather_forward_split_backward",
    "all_reduce_forward_copy_backward",
    "copy_forward_all_reduce_backward",
    "reduce_scatter_forward_all_gather_backward",
    "split_forward_all_gather_backward",
]
