"""Pipeline schedules: the order in which each stage runs its forward and backward steps.

A pipeline of p ranks holds the model's layers in p · v consecutive *virtual stages*
(v = 1 without interleaving): virtual stage g = chunk · p + rank, so rank r holds chunks
0 .. v-1 at virtual stages r, p + r, 2p + r, ... Each of m microbatches passes forward
through virtual stages 0 .. pv-1 and backward through pv-1 .. 0. A schedule gives each rank
its list of :class:`Step` s; ranks run their lists in order, waiting for activations
(forward) and gradients (backward) from their neighbours.

    all_forward_all_backward   every forward, then every backward (GPipe): the reference;
                               holds all m microbatches' activations.
    one_f_one_b                p - r - 1 warmup forwards, then forward/backward pairs, then
                               the remaining backwards: at most p - r microbatches in
                               flight on rank r.
    interleaved_one_f_one_b    1F1B over v chunks per rank (Megatron-LM's interleaved
                               schedule): the bubble shrinks from (p-1)/(m+p-1) to
                               (p-1)/(v·m+p-1) of the step; m must be a multiple of p.

:func:`simulate` replays a schedule with given step costs and returns each rank's idle
fraction, the number to compare with those formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eurocore.utils.checks import check_int


@dataclass(frozen=True)
class Step:
    """One step of a rank: ``kind`` "F" (forward) or "B" (backward) of ``microbatch`` through
    this rank's ``chunk`` (its virtual stage chunk · p + rank)."""

    kind: Literal["F", "B"]
    microbatch: int
    chunk: int = 0


def _check(rank: int, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> None:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                        ("num_chunks", num_chunks)):
        check_int(name, value, minimum=1)
    if not 0 <= rank < num_stages:
        raise ValueError(f"rank: expected 0 .. {num_stages - 1}, got {rank}")


def all_forward_all_backward(rank: int, num_stages: int, num_microbatches: int) -> list[Step]:
    """Every forward, then every backward in the same microbatch order."""
    _check(rank, num_stages, num_microbatches)
    return ([Step("F", mb) for mb in range(num_microbatches)]
            + [Step("B", mb) for mb in range(num_microbatches)])


def one_f_one_b(rank: int, num_stages: int, num_microbatches: int) -> list[Step]:
    """1F1B (PipeDream-Flush): min(p - rank - 1, m) warmup forwards, then alternating
    forward and backward, then the backwards left. Any m >= 1."""
    _check(rank, num_stages, num_microbatches)
    warmup = min(num_stages - rank - 1, num_microbatches)
    steps = [Step("F", mb) for mb in range(warmup)]
    for i in range(num_microbatches - warmup):
        steps += [Step("F", warmup + i), Step("B", i)]
    steps += [Step("B", mb) for mb in range(num_microbatches - warmup, num_microbatches)]
    return steps


def interleaved_one_f_one_b(rank: int, num_stages: int, num_microbatches: int,
                            num_chunks: int) -> list[Step]:
    """Interleaved 1F1B over ``num_chunks`` chunks per rank (Megatron-LM's schedule).

    Forwards go in groups of p microbatches per chunk: chunk 0 for microbatches 0..p-1,
    chunk 1 for the same, ..., then the next p microbatches; backwards likewise with the
    chunks reversed. Warmup: (p - rank - 1) · 2 + (v - 1) · p forwards (all of them when
    that reaches m · v). One chunk: :func:`one_f_one_b`.

    Raises:
        ValueError: ``num_microbatches`` not a multiple of ``num_stages`` (the groups of p
            would not line up across ranks).
    """
    _check(rank, num_stages, num_microbatches, num_chunks)
    if num_chunks == 1:  # one chunk per rank is plain 1F1B (and takes any m)
        return one_f_one_b(rank, num_stages, num_microbatches)
    p, m, v = num_stages, num_microbatches, num_chunks
    if m % p:
        raise ValueError(f"num_microbatches: the interleaved schedule needs a multiple of the "
                         f"pipeline size {p}, got {m}; use {-(-m // p) * p} or plain 1F1B")
    total = m * v

    def forward(k: int) -> Step:
        group, within = divmod(k, p * v)
        return Step("F", group * p + within % p, within // p)

    def backward(k: int) -> Step:
        group, within = divmod(k, p * v)
        return Step("B", group * p + within % p, v - 1 - within // p)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    steps = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        steps += [forward(warmup + i), backward(i)]
    steps += [backward(k) for k in range(total - warmup, total)]
    return steps


def schedule(name: str, rank: int, num_stages: int, num_microbatches: int,
             num_chunks: int = 1) -> list[Step]:
    """The steps of ``rank`` under the schedule called ``name``: "all-forward-all-backward",
    "1f1b" or "interleaved-1f1b" (num_chunks > 1; with 1 it is 1F1B)."""
    if name == "all-forward-all-backward":
        return all_forward_all_backward(rank, num_stages, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(rank, num_stages, num_microbatches)
    if name == "interleaved-1f1b":
        return interleaved_one_f_one_b(rank, num_stages, num_microbatches, num_chunks)
    raise ValueError(f"name: expected 'all-forward-all-backward', '1f1b' or "
                     f"'interleaved-1f1b', got {name!r}")


def max_in_flight(steps: list[Step]) -> int:
    """The most microbatch-chunks whose forward has run and backward has not: how many
    sets of activations the rank holds at its peak."""
    live, peak = 0, 0
    for step in steps:
        live += 1 if step.kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class Timeline:
    """A simulated run: per rank, each step's (start, end) in cost units, and the span."""

    spans: list[list[tuple[Step, float, float]]]
    makespan: float

    def idle_fraction(self, rank: int) -> float:
        """The share of the makespan rank ``rank`` spends waiting."""
        busy = sum(end - start for _, start, end in self.spans[rank])
        return 1.0 - busy / self.makespan


def simulate(steps_per_rank: list[list[Step]], num_chunks: int = 1, forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> Timeline:
    """Replays the ranks' step lists with free communication: a forward of virtual stage g
    waits for the same microbatch's forward at g - 1, a backward for the backward at g + 1
    (the last virtual stage: its own forward). Costs are per chunk.

    Raises:
        ValueError: the schedule deadlocks (no rank can run its next step).
    """
    p = len(steps_per_rank)
    last = p * num_chunks - 1
    done: dict[tuple[str, int, int], float] = {}   # (kind, microbatch, virtual stage) -> end
    clock = [0.0] * p
    position = [0] * p
    spans: list[list[tuple[Step, float, float]]] = [[] for _ in range(p)]
    remaining = sum(len(s) for s in steps_per_rank)
    while remaining:
        progressed = False
        for rank in range(p):
            if position[rank] == len(steps_per_rank[rank]):
                continue
            step = steps_per_rank[rank][position[rank]]
            stage = step.chunk * p + rank
            if step.kind == "F":
                needed = ("F", step.microbatch, stage - 1) if stage > 0 else None
            else:
                needed = (("B", step.microbatch, stage + 1) if stage < last
                          else ("F", step.microbatch, stage))
            if needed is not None and needed not in done:
                continue
            start = max(clock[rank], done[needed] if needed else 0.0)
            end = start + (forward_cost if step.kind == "F" else backward_cost)
            done[(step.kind, step.microbatch, stage)] = end
            spans[rank].append((step, start, end))
            clock[rank] = end
            position[rank] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = {r: steps_per_rank[r][position[r]] for r in range(p)
                     if position[r] < len(steps_per_rank[r])}
            raise ValueError(f"steps_per_rank: the schedule deadlocks at {stuck}")
    return Timeline(spans, max(clock))


def bubble_fraction(num_stages: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """(p - 1) / (v · m + p - 1): the idle share of 1F1B (v = 1) and interleaved 1F1B."""
    return (num_stages - 1) / (num_chunks * num_microbatches + num_stages - 1)
