"""Linear + cross-entropy without the logits: the mean loss of ``hidden @ weight.T`` against
``labels``, walked in chunks of tokens, with the vocabulary optionally split over ranks.

For token i (hidden state h_i, target y_i) and vocabulary rows W_v:

    z_iv = h_i · W_v      lse_i = log Σ_v exp(z_iv)      loss_i = lse_i - z_iy + ζ · lse_i²
    loss = Σ_{i kept} loss_i / #kept                      (kept: y_i != ignore_index)

and with p_iv = exp(z_iv - lse_i), g = dloss / #kept, for kept tokens:

    dz_iv = g · (p_iv · (1 + 2ζ · lse_i) - [v = y_i])      dh_i = Σ_v dz_iv W_v
                                                           dW_v = Σ_i dz_iv h_i

The forward keeps hidden, labels and one fp32 lse per token: O(tokens × hidden) bytes
whatever the vocabulary. At most (chunk × rows of weight) fp32 logits exist at a time; the
backward recomputes each chunk's logits (one matmul the size of the head's forward) rather
than keeping (tokens × vocabulary) of them, which for Llama-3 is 4 · 128256 bytes per token,
more than all the decoder layers keep together.

Vocabulary parallel (``group``): rank r's ``weight`` holds rows [r·V_local, (r+1)·V_local) of
the vocabulary, and rows from ``vocab_size`` on are padding that no token can pick. The
ranks exchange per-token numbers in the forward only (the max and the sum of exponentials
of their logits, and the target's logit: three all-reduces of ``tokens`` floats). The
backward communicates nothing: ``hidden``'s gradient is this rank's part of the sum over the
vocabulary, which the caller sums over ``group`` (the all-reduce, or reduce-scatter, in the
backward of a column-parallel layer's input). That group is the only parallel notion here.

The matmuls are torch's (cuBLAS, hipBLASLt); the per-chunk softmax is plain torch, so this op
has one implementation and no ``backend`` argument. Deterministic: chunks in a fixed order,
the weight gradient summed in fp32 in that order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# Logits per chunk when ``chunk_size`` is not given: 2**26 fp32 values (256 MiB), so about
# 520 tokens of a 128k vocabulary; the softmax's temporaries are a few times that.
CHUNK_LOGITS = 2**26


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, group: dist.ProcessGroup | None = None,
                         vocab_size: int | None = None, z_loss: float = 0.0,
                         chunk_size: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of the logits ``hidden @ weight.T`` against ``labels``, without
    materialising the logits (see the module docstring for the maths).

    Args:
        hidden: (tokens, h) float16, bfloat16, float32 or float64: the final hidden states.
        weight: (V_local, h), hidden's device: the output layer's rows, all of the vocabulary
            or, with ``group``, this rank's consecutive share of it (padding rows included).
            Its dtype may differ from hidden's (fp32 parameters under autocast).
        labels: (tokens,) integer targets in [0, vocab_size) or ``ignore_index``, the same on
            every rank of ``group``.
        ignore_index: the label of tokens that add nothing to the loss.
        group: the ranks the vocabulary is split over (None: one process holds all of it).
        vocab_size: the real vocabulary size; rows of global index >= vocab_size are padding
            (default: every row is real, V_local × ranks).
        z_loss: ζ ≥ 0, the weight of the z-loss ζ · lse² (PaLM's auxiliary loss; 0: none).
        chunk_size: tokens per chunk (default: about 2**26 logits per chunk).

    Returns:
        The fp32 (float64 for float64 inputs) mean loss over the tokens not ignored (0 when
        all are), the same on every rank. Under autocast the matmuls run in the autocast
        dtype, as ``F.linear``'s would. Gradients flow to hidden (with ``group``: this
        rank's partial sum) and weight.
    """
    tp, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    vocab_size = _check_args(hidden, weight, labels, ignore_index, tp, vocab_size, z_loss,
                             chunk_size)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_LOGITS // max(1, weight.shape[0]))
    start = rank * weight.shape[0]
    real_rows = max(0, min(weight.shape[0], vocab_size - start))
    compute_dtype = weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, group, start,
                                     real_rows, float(z_loss), chunk_size, compute_dtype)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                  labels: torch.Tensor, *, ignore_index: int = -100,
                                  vocab_size: int | None = None,
                                  z_loss: float = 0.0) -> torch.Tensor:
    """The specification of :func:`linear_cross_entropy` in one process, in plain PyTorch:
    the whole (tokens, vocab_size) logits at once, fp32 softmax (float64 for float64
    inputs, which makes it the tests' float64 oracle). Gradients are autograd's."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight[:vocab_size].t()).to(compute_dtype)
    lse = torch.logsumexp(logits, dim=-1)
    kept = labels != ignore_index
    target = logits.gather(-1, torch.where(kept, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    losses = (lse - target + z_loss * lse.square()).masked_fill(~kept, 0.0)
    return losses.sum() / kept.sum().clamp_min(1)


def _check_args(hidden, weight, labels, ignore_index, tp, vocab_size, z_loss,
                chunk_size) -> int:
    """Raises TypeError/ValueError naming the first bad argument; returns vocab_size."""
    for arg, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
    for arg, tensor in (("hidden", hidden), ("weight", weight)):
        if not tensor.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.dim() != 2:
            raise ValueError(f"{arg}: expected 2-D, got shape {tuple(tensor.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected int64 or int32, got {labels.dtype}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels: expected shape ({hidden.shape[0]},) like hidden's tokens, "
                         f"got {tuple(labels.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected {hidden.shape[1]} columns like hidden, got shape "
                         f"{tuple(weight.shape)}")
    for arg, tensor in (("weight", weight), ("labels", labels)):
        if tensor.device != hidden.device:
            raise ValueError(f"{arg}: is on {tensor.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    rows = weight.shape[0] * tp
    if vocab_size is None:
        vocab_size = rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or \
            not 1 <= vocab_size <= rows:
        raise ValueError(f"vocab_size: expected an int in [1, {rows}] (the rows of weight "
                         f"over {tp} rank(s)), got {vocab_size!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or \
            not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss: expected a finite number >= 0, got {z_loss!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    return vocab_size


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(chunk, real rows) logits in fp32 (float64 for float64 operands); the matmul in the
    operands' dtype, as F.linear's."""
    return (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: per-token lse and target logit, chunk by chunk, exchanged over the group.
    Backward: each chunk's logits again, their softmax gradient, dhidden and dweight."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, group, start, real_rows, z_loss,
                chunk_size, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight[:real_rows].to(compute_dtype)
            labels = labels.long()
            tokens = h.shape[0]
            stats = torch.promote_types(compute_dtype, torch.float32)
            lse = torch.full((tokens,), -math.inf, device=h.device, dtype=stats)
            target = torch.zeros(tokens, device=h.device, dtype=stats)
            local = labels - start
            mine = (local >= 0) & (local < real_rows)
            for first in range(0, tokens if real_rows else 0, chunk_size):
                last = min(tokens, first + chunk_size)
                z = _chunk_logits(h[first:last], w)
                lse[first:last] = torch.logsumexp(z, dim=-1)
                index = torch.where(mine[first:last], local[first:last], 0).unsqueeze(-1)
                target[first:last] = z.gather(-1, index).squeeze(-1)
            target.masked_fill_(~mine, 0.0)
            if group is not None and dist.get_world_size(group) > 1:
                top = lse.clone()
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                sum_exp = torch.exp(lse - top)
                dist.all_reduce(sum_exp, group=group)
                lse = top + torch.log(sum_exp)
                dist.all_reduce(target, group=group)
            kept = labels != ignore_index
            losses = (lse - target + z_loss * lse.square()).masked_fill(~kept, 0.0)
            count = kept.sum().clamp_min(1)
            loss = losses.sum() / count
        # hidden is saved as given (a cast copy would be a second activation); weight too
        ctx.save_for_backward(hidden, weight, labels, lse, count)
        ctx.options = (ignore_index, start, real_rows, z_loss, chunk_size, compute_dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse, count = ctx.saved_tensors
        ignore_index, start, real_rows, z_loss, chunk_size, compute_dtype = ctx.options
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight[:real_rows].to(compute_dtype)
            tokens = h.shape[0]
            kept = labels != ignore_index
            scale = (grad_loss.to(lse.dtype) / count) * kept     # g for kept tokens, 0 otherwise
            softmax_scale = scale * (1.0 + 2.0 * z_loss * lse) if z_loss else scale
            local = labels - start
            mine = kept & (local >= 0) & (local < real_rows)
            grad_h = torch.zeros_like(h) if need_hidden else None
            grad_w = (torch.zeros(real_rows, h.shape[1], device=h.device, dtype=lse.dtype)
                      if need_weight else None)
            for first in range(0, tokens if real_rows else 0, chunk_size):
                last = min(tokens, first + chunk_size)
                z = _chunk_logits(h[first:last], w)
                dz = torch.exp(z - lse[first:last, None]) * softmax_scale[first:last, None]
                # the target's -g, as one scatter over every row (0 where the target is
                # another rank's): no nonzero(), which would wait for the device per chunk
                chunk_mine = mine[first:last]
                rows = torch.arange(last - first, device=dz.device)
                dz[rows, torch.where(chunk_mine, local[first:last], 0)] -= \
                    torch.where(chunk_mine, scale[first:last], 0.0)
                dz = dz.to(compute_dtype)
                if need_hidden:
                    grad_h[first:last] = dz @ w
                if need_weight:
                    grad_w += dz.t() @ h[first:last]
        if need_hidden:
            grad_h = grad_h.to(hidden.dtype)
        if need_weight:
            padding = weight.shape[0] - real_rows
            grad_w = torch.cat([grad_w, grad_w.new_zeros(padding, grad_w.shape[1])]) \
                if padding else grad_w
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None
