"""Tensor-parallel linear layers, with sequence parallelism on or off (Megatron-LM layout).

Activations are sequence-first, (seq, batch, hidden). Without sequence parallelism every
rank of the TP group holds the whole activation; with it, each holds a 1/tp slice of the
sequence between the parallel regions, and the collectives around the layers change:

    column-parallel in:   copy fwd / all-reduce bwd     SP: all-gather fwd / reduce-scatter bwd
                                                            (and an all-gather of the saved
                                                            input shard for the weight grad)
    row-parallel out:     all-reduce fwd / copy bwd     SP: reduce-scatter fwd / all-gather bwd

Weights are initialised so that every TP degree starts from the same model: the full matrix
is drawn in fixed blocks of rows, each from its own seed, and each rank keeps its slice;
no rank ever holds more than one block beyond its own shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from eurocore.ops import linear_cross_entropy, rms_norm
from eurocore.parallel.collectives import (
    _all_gather,
    _reduce_scatter,
    all_gather_forward_reduce_scatter_backward,
    all_gather_forward_split_backward,
    all_reduce_forward_copy_backward,
    copy_forward_all_reduce_backward,
    reduce_scatter_forward_all_gather_backward,
)
from eurocore.parallel.grads import mark_pipeline_copy, mark_replicated_over_tp
from eurocore.parallel.sharding import FullSlice
from eurocore.utils.checks import check_int, check_number

# Rows drawn per generator: the unit of layout-independent initialisation.
INIT_BLOCK_ROWS = 64


def layout_independent_normal_(local: torch.Tensor, full_shape: tuple[int, int],
                               rows: slice, cols: slice, std: float, seed: int) -> torch.Tensor:
    """Fills ``local`` with ``full[rows, cols]`` of a (out, in) normal(0, std) matrix that is
    a pure function of (full_shape, std, seed), whatever slice a rank holds.

    Block b of INIT_BLOCK_ROWS rows comes from ``torch.Generator().manual_seed(seed + b)``
    on the CPU in fp32, then moves to local's device and dtype.
    """
    n_rows, n_cols = full_shape
    first, last = rows.start or 0, rows.stop if rows.stop is not None else n_rows
    if local.is_meta:  # shapes only (sizing a model): nothing to draw
        return local
    with torch.no_grad():
        for block in range(first // INIT_BLOCK_ROWS, math.ceil(last / INIT_BLOCK_ROWS)):
            start = block * INIT_BLOCK_ROWS
            height = min(INIT_BLOCK_ROWS, n_rows - start)
            gen = torch.Generator().manual_seed(seed + block)
            values = torch.randn(height, n_cols, generator=gen) * std
            lo, hi = max(first, start), min(last, start + height)
            local[lo - first:hi - first].copy_(values[lo - start:hi - start, cols])
    return local


def _tp(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) without one."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _divide(what: str, value: int, tp: int) -> int:
    if value % tp:
        raise ValueError(f"{what}: {value} is not divisible by tp = {tp}")
    return value // tp


class _AllGatherLinear(torch.autograd.Function):
    """y = all_gather_seq(x) Wᵀ (+ b) for a sequence-parallel input x (seq / tp, ...).

    Saves x's shard, not the gathered input, and gathers it again in the backward for the
    weight gradient (Megatron-LM's choice): s·b·h / tp bytes held per layer instead of
    s·b·h, for one more all-gather. The input gradient is reduce-scattered back to shards.
    The backward multiplies in the incoming gradient's dtype (bf16 under autocast, as the
    forward did) and returns the weight gradient in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias, ctx.x_dtype = group, bias is not None, x.dtype
        if torch.is_autocast_enabled(x.device.type):  # gather and keep what the GEMM reads
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, weight)
        return nn.functional.linear(_all_gather(x, group, 0), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x_full = _all_gather(x, ctx.group, 0).to(grad.dtype)
        grad_x = _reduce_scatter(grad @ weight.to(grad.dtype), ctx.group, 0)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat_grad.t() @ x_full.reshape(-1, x_full.shape[-1])).to(weight.dtype)
        grad_b = flat_grad.sum(dim=0).to(weight.dtype) if ctx.has_bias else None
        return grad_x.to(ctx.x_dtype), grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) with W (out_features, in_features) split along out_features.

    Args:
        in_features, out_features: the full layer's sizes; out_features divisible by tp.
        tp_group: the tensor-parallel group (None: one rank).
        bias: a bias, split like the output.
        gather_output: gather the output features (else each rank keeps its 1/tp).
        sequence_parallel: the input is this rank's sequence slice, gathered here.
        std, seed: the layout-independent normal initialisation of W (bias starts at 0).
        output_sizes: several projections fused in one matrix (q, k, v; gate, up), summing
            to out_features, each divisible by tp. Each is split over the TP group on its
            own, so a rank's rows are [its slice of part 0; its slice of part 1; ...] and
            :meth:`split_output` cuts the local output back into the parts. Each part is
            initialised as its own matrix (seeds after the previous part's blocks).

    Forward: x (seq or seq / tp with sequence parallelism, batch, in_features) ->
    (seq, batch, out_features / tp), or out_features with ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, tp_group=None, *,
                 bias: bool = False, gather_output: bool = False,
                 sequence_parallel: bool = False, std: float = 0.02, seed: int = 0,
                 output_sizes: tuple[int, ...] | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        tp, rank = _tp(tp_group)
        output_sizes = tuple(output_sizes) if output_sizes is not None else (out_features,)
        if sum(output_sizes) != out_features:
            raise ValueError(f"output_sizes: {output_sizes} sum to {sum(output_sizes)}, "
                             f"not out_features = {out_features}")
        self.local_sizes = tuple(_divide(f"output_sizes[{i}]" if len(output_sizes) > 1
                                         else "out_features", size, tp)
                                 for i, size in enumerate(output_sizes))
        if gather_output and len(output_sizes) > 1:
            raise ValueError("gather_output: not supported with several output_sizes")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.gather_output = tp_group, gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features,
                                               device=device, dtype=dtype))
        start, part_seed = 0, seed
        for size, local in zip(output_sizes, self.local_sizes, strict=True):
            layout_independent_normal_(self.weight[start:start + local], (size, in_features),
                                       slice(rank * local, (rank + 1) * local), slice(None),
                                       std, part_seed)
            start += local
            part_seed += math.ceil(size / INIT_BLOCK_ROWS)
        self.bias = (nn.Parameter(torch.zeros(sum(self.local_sizes), device=device,
                                              dtype=dtype)) if bias else None)

    def local_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (out_features, ...) weight or (out_features,) bias laid
        out like one process's: each output part's slice, concatenated (loading a
        checkpoint, checking against one process). A full tensor with fewer rows than
        out_features (an unpadded vocabulary) gets zero rows for the missing ones."""
        tp, rank = _tp(self.tp_group)
        if full.shape[0] < self.out_features:
            padding = full.new_zeros(self.out_features - full.shape[0], *full.shape[1:])
            full = torch.cat([full, padding])
        parts, start = [], 0
        for local in self.local_sizes:
            parts.append(full[start + rank * local:start + (rank + 1) * local])
            start += local * tp
        return torch.cat(parts)

    def full_slices(self, name: str = "weight", real_rows: int | None = None
                    ) -> list[FullSlice]:
        """Where this rank's ``weight`` (or ``bias``) sits in the full tensors: one slice
        per output part, each part its own full tensor, (size, in_features) or (size,).
        ``real_rows``: the full tensor has only that many rows (an unpadded vocabulary,
        one part only); the padding rows beyond them belong to no full tensor."""
        if real_rows is not None and len(self.local_sizes) > 1:
            raise ValueError("real_rows: only for a layer with one output part")
        tp, rank = _tp(self.tp_group)
        tail = (self.in_features,) if name == "weight" else ()
        slices, start = [], 0
        for part, local in enumerate(self.local_sizes):
            first = rank * local
            full_rows = local * tp if real_rows is None else real_rows
            kept = max(0, min(local, full_rows - first))
            if kept:
                slices.append(FullSlice(part, (full_rows, *tail), range(start, start + kept),
                                        (first, *(0 for _ in tail))))
            start += local
        return slices

    def split_output(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The local output (..., out_features / tp) cut into its ``output_sizes`` parts."""
        return torch.split(y, self.local_sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and _tp(self.tp_group)[0] > 1:
            y = _AllGatherLinear.apply(x, self.weight, self.bias, self.tp_group)
        else:
            x = copy_forward_all_reduce_backward(x, self.tp_group)
            y = nn.functional.linear(x, self.weight, self.bias)
        return all_gather_forward_split_backward(y, self.tp_group, -1) if self.gather_output \
            else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W (out_features, in_features) split along in_features; the input is
    already split along its features (the output of a column-parallel layer).

    Args:
        in_features, out_features: the full layer's sizes; in_features divisible by tp.
        tp_group: the tensor-parallel group (None: one rank).
        sequence_parallel: reduce-scatter the output along the sequence (else all-reduce).
        std, seed: the layout-independent normal initialisation of W.

    Forward: x (seq, batch, in_features / tp) -> (seq, or seq / tp with sequence
    parallelism, batch, out_features). No bias (Llama-style models have none).
    """

    def __init__(self, in_features: int, out_features: int, tp_group=None, *,
                 sequence_parallel: bool = False, std: float = 0.02, seed: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        tp, rank = _tp(tp_group)
        local_in = _divide("in_features", in_features, tp)
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        cols = slice(rank * local_in, (rank + 1) * local_in)
        self.weight = nn.Parameter(torch.empty(out_features, local_in, device=device,
                                               dtype=dtype))
        layout_independent_normal_(self.weight, (out_features, in_features),
                                   slice(0, out_features), cols, std, seed)

    def local_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full (out_features, in_features) weight."""
        tp, rank = _tp(self.tp_group)
        local = self.in_features // tp
        return full[:, rank * local:(rank + 1) * local]

    def full_slices(self, name: str = "weight") -> list[FullSlice]:
        """Where this rank's weight (its columns) sits in the full (out, in) matrix."""
        tp, rank = _tp(self.tp_group)
        local = self.in_features // tp
        return [FullSlice(0, (self.out_features, self.in_features), range(self.out_features),
                          (0, rank * local))]

    def forward(self, x: torch.Tensor, *, batch_first: bool = False) -> torch.Tensor:
        """x (seq, batch, in_features / tp), or (batch, seq, ...) with ``batch_first``: the
        output is sequence-first either way. Batch-first input lets a caller whose tensor is
        batch-major (packed attention output) skip a copy that the matmul would save."""
        partial = nn.functional.linear(x, self.weight)
        if batch_first:
            partial = partial.transpose(0, 1)
        if self.sequence_parallel:
            return reduce_scatter_forward_all_gather_backward(partial, self.tp_group, 0)
        return all_reduce_forward_copy_backward(partial, self.tp_group)


class ParallelRMSNorm(nn.Module):
    """RMSNorm (``eurocore.ops.rms_norm``) with its weight replicated over the TP group.

    With sequence parallelism each rank normalises only its slice of the sequence, so its
    weight gradient is partial: the weight passes through copy-forward / all-reduce-backward,
    and every rank ends the backward with the full gradient. Without sequence parallelism
    every rank sees the whole sequence and nothing is reduced.

    Forward: x (seq or seq / tp, batch, hidden) -> same shape and dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, tp_group=None, *,
                 sequence_parallel: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, minimum=1)
        check_number("eps", eps, minimum=0.0)  # the op would say so only at the first forward
        self.eps, self.tp_group, self.sequence_parallel = eps, tp_group, sequence_parallel
        self.hidden_size = hidden_size
        self.weight = mark_replicated_over_tp(
            nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (copy_forward_all_reduce_backward(self.weight, self.tp_group)
                  if self.sequence_parallel else self.weight)
        return rms_norm(x, weight, self.eps)

    def full_slices(self, name: str = "weight") -> list[FullSlice]:
        """The weight is whole on every rank."""
        return [FullSlice(0, (self.hidden_size,), range(self.hidden_size), (0,))]


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of ``tp · multiple``: every rank then holds
    the same number of rows. Rows from vocab_size on are padding, never looked up."""
    unit = tp * multiple
    return -(-vocab_size // unit) * unit


def _vocab_range(vocab_size: int, tp_group) -> tuple[int, int, int]:
    """(first, last, padded size) of this rank's rows of the padded vocabulary."""
    tp, rank = _tp(tp_group)
    padded = padded_vocab_size(vocab_size, tp)
    local = padded // tp
    return rank * local, (rank + 1) * local, padded


class _VocabRows(nn.Module):
    """A (vocabulary, hidden) table split over the TP group by rows: the vocabulary is padded
    to a multiple of tp (:func:`padded_vocab_size`) and rank r holds rows [first, last) =
    [r·V_local, (r+1)·V_local). Padding rows start at zero and belong to no full tensor.

    Args:
        num_embeddings: the real vocabulary size (any).
        embedding_dim: hidden size.
        tp_group: the tensor-parallel group (None: one rank).
        sequence_parallel: the activations on the model's side are sequence shards.
        std, seed: the layout-independent normal initialisation of the real rows.
        weight: share this parameter (a tied table) instead of drawing one.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None, *,
                 sequence_parallel: bool = False, std: float = 0.02, seed: int = 0,
                 weight: nn.Parameter | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("num_embeddings", num_embeddings, minimum=1)
        check_int("embedding_dim", embedding_dim, minimum=1)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.first, self.last, self.padded_size = _vocab_range(num_embeddings, tp_group)
        self.real_rows = max(0, min(self.last, num_embeddings) - self.first)
        if weight is not None:
            if tuple(weight.shape) != (self.last - self.first, embedding_dim):
                raise ValueError(f"weight: expected shape {(self.last - self.first, embedding_dim)}"
                                 f", got {tuple(weight.shape)}")
            self.weight = weight
            return
        self.weight = nn.Parameter(torch.zeros(self.last - self.first, embedding_dim,
                                               device=device, dtype=dtype))
        if self.real_rows:
            layout_independent_normal_(self.weight[:self.real_rows],
                                       (num_embeddings, embedding_dim),
                                       slice(self.first, self.first + self.real_rows),
                                       slice(None), std, seed)

    def local_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (num_embeddings, dim) table, padding rows zero."""
        local = torch.zeros(self.last - self.first, *full.shape[1:], dtype=full.dtype,
                            device=full.device)
        local[:self.real_rows] = full[self.first:self.first + self.real_rows]
        return local

    def full_slices(self, name: str = "weight") -> list[FullSlice]:
        """Where this rank's rows sit in the full, unpadded (num_embeddings, dim) table;
        padding rows belong to none (a rank holding only padding has no slice)."""
        full = (self.num_embeddings, self.embedding_dim)
        return ([FullSlice(0, full, range(self.real_rows), (self.first, 0))]
                if self.real_rows else [])


class VocabParallelEmbedding(_VocabRows):
    """Token embedding with the (padded) vocabulary split over the TP group (the arguments of
    :class:`_VocabRows`).

    Forward: token ids (seq, batch) in [0, num_embeddings) -> (seq, or seq / tp with
    sequence parallelism, batch, embedding_dim).
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.first) | (ids >= self.last)
        local = torch.where(outside, 0, ids - self.first)
        out = nn.functional.embedding(local, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_forward_all_gather_backward(out, self.tp_group, 0)
        return all_reduce_forward_copy_backward(out, self.tp_group)


class VocabParallelHead(_VocabRows):
    """The output layer and its loss, with the (padded) vocabulary split over the TP group
    like :class:`VocabParallelEmbedding`'s (the arguments of :class:`_VocabRows`).

    Tied embeddings: ``weight=embedding.weight`` shares the embedding's parameter (one
    stage holds both); ``embedding_copy=True`` makes this weight the last pipeline stage's
    copy of the first stage's embedding (draw it with the embedding's ``std`` and ``seed``:
    it starts equal; :func:`eurocore.parallel.mark_pipeline_copy` marks it, so gradient
    norms count it once).

    Forward: x (seq, or seq / tp with sequence parallelism, batch, hidden), gathered over the
    sequence (or passed on) into the column-parallel region; then

    * without labels: this rank's logits (seq, batch, V_local), padding columns included;
    * with labels (seq, batch) in [0, num_embeddings) or ``ignore_index``: the fp32 mean
      loss over the tokens not ignored, the same on every rank, from
      ``eurocore.ops.linear_cross_entropy`` (no logits kept: O(seq · batch · hidden) bytes
      for the backward whatever the vocabulary), or with ``fused=False`` from the logits
      and :func:`vocab_parallel_cross_entropy`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None, *,
                 embedding_copy: bool = False, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_group, **kwargs)
        self.embedding_copy = embedding_copy
        if embedding_copy:
            mark_pipeline_copy(self.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                ignore_index: int = -100, fused: bool = True) -> torch.Tensor:
        if self.sequence_parallel:
            x = all_gather_forward_reduce_scatter_backward(x, self.tp_group, 0)
        else:
            x = copy_forward_all_reduce_backward(x, self.tp_group)
        if labels is not None and fused:
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight,
                                        labels.reshape(-1), ignore_index=ignore_index,
                                        group=self.tp_group, vocab_size=self.num_embeddings)
        logits = nn.functional.linear(x, self.weight)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.num_embeddings, self.tp_group,
                                            ignore_index)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 tp_group=None, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy over a vocabulary split across the TP group, without gathering it.

    Args:
        logits: (..., padded_vocab / tp), this rank's columns of the padded vocabulary (the
            output of a column-parallel head); padding columns are ignored.
        target: (...) int64 or int32 in [0, vocab_size), or ignore_index.
        vocab_size: the real vocabulary size.

    Returns:
        The mean loss over the tokens not ignored (fp32 scalar, the same on every rank; 0
        when every token is ignored), as ``F.cross_entropy(full_logits, target)``.
    """
    first, last, _ = _vocab_range(vocab_size, tp_group)
    logits, target = logits.float(), target.long()  # gather takes int64 indices only
    column = torch.arange(first, last, device=logits.device)
    logits = logits.masked_fill(column >= vocab_size, float("-inf"))  # padding columns
    # Shift by the global max for a stable exp; constant for the gradient.
    local_max = logits.detach().amax(dim=-1)
    if tp_group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - local_max.unsqueeze(-1)
    sum_exp = all_reduce_forward_copy_backward(shifted.exp().sum(dim=-1), tp_group)
    mine = (target >= first) & (target < last)
    index = torch.where(mine, target - first, 0).unsqueeze(-1)
    picked = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
    target_logit = all_reduce_forward_copy_backward(picked, tp_group)
    losses = torch.log(sum_exp) - target_logit
    kept = target != ignore_index
    losses = losses.masked_fill(~kept, 0.0)
    return losses.sum() / kept.sum().clamp_min(1)
