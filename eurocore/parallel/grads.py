"""Gradient norms over sharded parameters.

Under tensor parallelism most parameters are split across the TP group (each rank holds a
different slice) while a few are replicated (the RMSNorm weights): the global norm sums
every shard's squares once and each replicated parameter once, not tp times.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from eurocore.parallel.groups import ParallelGroups

# Set on a parameter that every rank of the TP group holds whole (and keeps identical).
REPLICATED_OVER_TP = "replicated_over_tp"


def mark_replicated_over_tp(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Marks ``param`` as held whole by every TP rank (see :func:`global_grad_norm`)."""
    setattr(param, REPLICATED_OVER_TP, True)
    return param


def global_grad_norm(params: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> torch.Tensor:
    """The L2 norm of the full model's gradient (fp32 scalar, the same on every TP rank).

    Shards count on every rank; parameters marked :func:`mark_replicated_over_tp` count on
    TP rank 0 only. Parameters without a gradient count as zero.
    """
    params = list(params)
    total = None
    for param in params:
        if param.grad is None:
            continue
        if getattr(param, REPLICATED_OVER_TP, False) and groups.tp_rank != 0:
            continue
        square = param.grad.detach().float().pow(2).sum()
        total = square if total is None else total + square
    if total is None:
        total = torch.zeros((), dtype=torch.float32,
                            device=params[0].device if params else None)
    if groups.tp_group is not None:
        dist.all_reduce(total, group=groups.tp_group)
    return total.sqrt()


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                    groups: ParallelGroups) -> torch.Tensor:
    """Scales every gradient by min(1, max_norm / global norm) in place; returns the norm
    before clipping (as ``torch.nn.utils.clip_grad_norm_``, over all TP shards)."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for param in params:
        param.grad.detach().mul_(scale.to(param.grad.dtype))
    return norm
