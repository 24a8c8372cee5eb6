"""Parallelism: process groups, the collectives of tensor and sequence parallelism, the
tensor-parallel layers built on them, gradient norms over shards; pipeline schedules
(``eurocore.parallel.schedules``), their runner (``eurocore.parallel.pipeline``) and data
parallelism with FSDP2 (``eurocore.parallel.data_parallel``)."""

from eurocore.parallel.collectives import (
    all_gather_forward_reduce_scatter_backward,
    all_gather_forward_split_backward,
    all_reduce_forward_copy_backward,
    copy_forward_all_reduce_backward,
    reduce_scatter_forward_all_gather_backward,
    split_forward_all_gather_backward,
)
from eurocore.parallel.grads import (
    clip_grad_norm_,
    global_grad_norm,
    local_part,
    mark_pipeline_copy,
    mark_replicated_over_tp,
)
from eurocore.parallel.groups import ParallelGroups
from eurocore.parallel.layers import (
    ColumnParallelLinear,
    ParallelRMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelGroups",
    "ParallelRMSNorm",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "all_gather_forward_reduce_scatter_backward",
    "all_gather_forward_split_backward",
    "all_reduce_forward_copy_backward",
    "clip_grad_norm_",
    "copy_forward_all_reduce_backward",
    "global_grad_norm",
    "local_part",
    "mark_pipeline_copy",
    "mark_replicated_over_tp",
    "padded_vocab_size",
    "reduce_scatter_forward_all_gather_backward",
    "split_forward_all_gather_backward",
    "vocab_parallel_cross_entropy",
]
