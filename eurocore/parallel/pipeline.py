"""Running a pipeline schedule: point-to-point transfers between stages, forward and
backward steps, and the loss on every rank.

Each rank runs its :mod:`~eurocore.parallel.schedules` step list. A forward step receives
the previous virtual stage's output (unless it is the first), runs the model chunk and sends
its output on (unless it is the last, which returns the microbatch's loss). A backward step
receives the gradient of its output from the next virtual stage (the last starts from its
loss, scaled by 1 / microbatches so the gradients accumulate to the mean) and sends the
gradient of its input back. Sends are non-blocking and receives wait, so a rank blocks only
on the data its step needs: any schedule that :func:`~eurocore.parallel.schedules.simulate`
completes cannot deadlock. Activations and gradients travel on two process groups over the
same ranks, so NCCL, which matches messages per communicator in issue order, never pairs an
activation with a gradient.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from eurocore.parallel.groups import ParallelGroups
from eurocore.parallel.schedules import Step

# forward_step(chunk, microbatch, hidden states from the previous stage or None) ->
# hidden states for the next stage, or the microbatch's loss on the last virtual stage.
ForwardStep = Callable[[int, int, torch.Tensor | None], torch.Tensor]


def stage_layers(num_layers: int, num_virtual_stages: int,
                 layers_per_stage: Sequence[int] | None = None) -> list[range]:
    """The decoder layers of each virtual stage, in pipeline order.

    Explicit ``layers_per_stage`` (one count per virtual stage, summing to num_layers), or
    an even split whose remainder goes to the interior stages first: the first stage also
    holds the embedding and the last the head and loss, so they get fewer layers.
    """
    n = num_virtual_stages
    if layers_per_stage is None:
        base, extra = divmod(num_layers, n)
        if base == 0:
            raise ValueError(f"num_layers: {num_layers} layers cannot fill {n} pipeline "
                             f"stages; use fewer stages or virtual stages")
        order = [*range(1, n - 1), n - 1, 0] if n > 2 else [n - 1, 0][:n]
        counts = [base] * n
        for stage in order[:extra]:
            counts[stage] += 1
    else:
        counts = list(layers_per_stage)
        if len(counts) != n or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"layers_per_stage: expected {n} counts >= 1 summing to "
                             f"{num_layers}, got {counts}")
    starts = [sum(counts[:i]) for i in range(n)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


def run_schedule(steps: Sequence[Step], forward_step: ForwardStep, groups: ParallelGroups, *,
                 num_chunks: int, num_microbatches: int, activation_shape: Sequence[int],
                 dtype: torch.dtype, device: torch.device,
                 before_backward: Callable[[int, bool], None] | None = None,
                 trace: list[tuple[Step, float, float]] | None = None,
                 forward_only: bool = False) -> torch.Tensor:
    """Runs this rank's ``steps``; gradients accumulate in the chunks' parameters.

    ``forward_only`` (evaluation): the forward steps alone, in the schedule's order, under
    ``torch.no_grad``; nothing is kept for a backward and no gradient is touched.

    Args:
        steps: this rank's schedule (``schedules.schedule(...)``).
        forward_step: runs one chunk on one microbatch (see ``ForwardStep``).
        groups: the layout; pp_size 1 runs the steps with no communication.
        num_chunks: virtual stages per rank.
        num_microbatches: m; each loss is scaled by 1 / m before its backward.
        activation_shape, dtype: of the tensors passed between stages (every stage's
            output has this shape: (seq, or seq / tp with sequence parallelism, batch,
            hidden)).
        before_backward: called as (chunk, last) before each backward step, ``last`` on the
            chunk's final one (data parallelism reduces gradients then).
        trace: if given, each step's (step, start, end) in ``time.perf_counter`` seconds is
            appended: the compute, from its input's arrival to its output's send.

    Returns:
        The mean loss over the microbatches (fp32 scalar, detached), on every rank of the
        pipeline.
    """
    p, rank = groups.pp_size, groups.pp_rank
    if num_chunks > 1 and p == 1:  # chunk c would send to itself at the first forward
        raise ValueError(f"num_chunks: {num_chunks} virtual stages need a pipeline of at "
                         f"least 2 ranks, got pp = 1")
    last = p * num_chunks - 1
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
    losses: list[torch.Tensor] = []
    sends: list[tuple[dist.Work, torch.Tensor]] = []

    def send(tensor: torch.Tensor, to_rank: int, group: dist.ProcessGroup) -> None:
        tensor = tensor.detach().contiguous()
        sends.append((dist.isend(tensor, groups.pp_ranks[to_rank], group=group), tensor))

    def receive(from_rank: int, group: dist.ProcessGroup) -> torch.Tensor:
        buffer = torch.empty(tuple(activation_shape), dtype=dtype, device=device)
        dist.irecv(buffer, groups.pp_ranks[from_rank], group=group).wait()
        return buffer

    if forward_only:
        steps = [step for step in steps if step.kind == "F"]
    final_backward = {step.chunk: i for i, step in enumerate(steps) if step.kind == "B"}
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    for index, step in enumerate(steps):
        stage = step.chunk * p + rank
        key = (step.microbatch, step.chunk)
        if step.kind == "F":
            x = None
            if stage > 0:
                x = receive((rank - 1) % p, groups.pp_group).requires_grad_(not forward_only)
            start = time.perf_counter()
            with grad_mode:
                out = forward_step(step.chunk, step.microbatch, x)
            if stage == last:
                losses.append(out.detach().float())
            else:
                send(out, (rank + 1) % p, groups.pp_group)
            if not forward_only:
                saved[key] = (x, out)
            if trace is not None:
                trace.append((step, start, time.perf_counter()))
        else:
            x, out = saved.pop(key)
            if before_backward is not None:
                before_backward(step.chunk, index == final_backward[step.chunk])
            if stage == last:
                start = time.perf_counter()
                torch.autograd.backward(out / num_microbatches)
            else:
                grad = receive((rank + 1) % p, groups.pp_grad_group)
                start = time.perf_counter()
                torch.autograd.backward(out, grad)
            if stage > 0:
                send(x.grad, (rank - 1) % p, groups.pp_grad_group)
            if trace is not None:
                trace.append((step, start, time.perf_counter()))
    for work, _ in sends:
        work.wait()
    if saved:
        raise RuntimeError(f"steps: forwards without a backward: {sorted(saved)}")
    loss = (torch.stack(losses).mean() if losses
            else torch.zeros((), dtype=torch.float32, device=device))
    if p > 1:  # the last stage holds the loss; every rank reports it
        dist.broadcast(loss, groups.pp_ranks[p - 1], group=groups.pp_group)
    return loss
