"""Gradient norms over sharded parameters.

Under tensor parallelism most parameters are split across the TP group (each rank holds a
different slice) while a few are replicated (the RMSNorm weights); under pipeline
parallelism each stage holds different layers, and a tied embedding has a copy on the last
stage. The global norm sums every shard's squares once, each replicated parameter once (not
tp times) and skips the pipeline copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from eurocore.parallel.groups import ParallelGroups

# Set on a parameter that every rank of the TP group holds whole (and keeps identical).
REPLICATED_OVER_TP = "replicated_over_tp"
# Set on a copy of a parameter that another pipeline stage holds (the tied embedding on the
# last stage): after the two stages sum their gradients, it is counted there.
PIPELINE_COPY = "pipeline_copy"


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor FSDP shards over the DP ranks (a DTensor), else the
    tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def mark_replicated_over_tp(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Marks ``param`` as held whole by every TP rank (see :func:`global_grad_norm`)."""
    setattr(param, REPLICATED_OVER_TP, True)
    return param


def mark_pipeline_copy(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Marks ``param`` as a copy of a parameter another pipeline stage holds."""
    setattr(param, PIPELINE_COPY, True)
    return param


def global_grad_norm(params: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> torch.Tensor:
    """The L2 norm of the full model's gradient (fp32 scalar, the same on every rank):
    squares summed over this rank's parameters, then over the TP and PP groups, and over
    the DP group when FSDP shards the gradients there (DTensors).

    Parameters marked :func:`mark_replicated_over_tp` count on TP rank 0 only, those marked
    :func:`mark_pipeline_copy` not at all. Parameters without a gradient count as zero.
    """
    params = list(params)
    total = None
    for param in params:
        if param.grad is None:
            continue
        if getattr(param, PIPELINE_COPY, False) or (
                getattr(param, REPLICATED_OVER_TP, False) and groups.tp_rank != 0):
            continue
        square = local_part(param.grad.detach()).float().pow(2).sum()
        total = square if total is None else total + square
    if total is None:
        total = torch.zeros((), dtype=torch.float32,
                            device=params[0].device if params else None)
    sharded_over_dp = any(hasattr(p.grad, "to_local") for p in params if p.grad is not None)
    for group in (groups.tp_group, groups.pp_group,
                  groups.dp_group if sharded_over_dp else None):
        if group is not None:
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                    groups: ParallelGroups) -> torch.Tensor:
    """Scales every gradient by min(1, max_norm / global norm) in place; returns the norm
    before clipping (as ``torch.nn.utils.clip_grad_norm_``, over all TP, PP and DP
    shards)."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for param in params:
        grad = local_part(param.grad.detach())
        grad.mul_(scale.to(grad.dtype))
    return norm
