"""Data parallelism over the ranks left by TP and PP: PyTorch's FSDP2 (``fully_shard``).

Why FSDP2 rather than DDP: DDP reduces gradients from hooks armed by each forward, which
breaks under 1F1B, where a stage runs several forwards before their backwards (a reduction
would start before the microbatches have accumulated). FSDP2 leaves gradient sync to an
explicit switch (``set_requires_gradient_sync``), so the schedule turns it on only for each
chunk's last backward; it also shards parameters, gradients and optimizer state over the
data-parallel ranks (ZeRO-3), works on plain tensors (our TP shards) and on gloo. Gradients
are averaged over the replicas in fp32 (``reduce_dtype``).

FSDP2 replaces each parameter with a DTensor sharded over the DP ranks; the markers of
``eurocore.parallel.grads`` are carried over by name.
"""

from __future__ import annotations

import torch
from torch import nn

from eurocore.parallel.grads import PIPELINE_COPY, REPLICATED_OVER_TP
from eurocore.parallel.groups import ParallelGroups

_MARKS = (REPLICATED_OVER_TP, PIPELINE_COPY)


def shard_data_parallel(chunk: nn.Module, groups: ParallelGroups,
                        layers: nn.ModuleDict | None = None) -> nn.Module:
    """Wraps ``chunk`` (and each of ``layers`` first, one FSDP unit per decoder layer) with
    FSDP2 over the data-parallel ranks; a no-op with one replica. Returns ``chunk``."""
    if groups.dp_size == 1:
        return chunk
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    marks = {name: [m for m in _MARKS if getattr(p, m, False)]
             for name, p in chunk.named_parameters(remove_duplicate=False)}
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    mesh = groups.mesh["dp"]
    for layer in (layers.values() if layers is not None else ()):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(chunk, mesh=mesh, mp_policy=policy)
    for name, param in chunk.named_parameters(remove_duplicate=False):
        for mark in marks.get(name, ()):
            setattr(param, mark, True)
    return chunk


def set_gradient_sync(chunk: nn.Module, enabled: bool) -> None:
    """Whether the next backward of ``chunk`` reduces its gradients over the DP ranks (off:
    they accumulate locally); nothing without FSDP."""
    setter = getattr(chunk, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
