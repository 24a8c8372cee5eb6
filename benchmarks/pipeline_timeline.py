"""Pipeline schedules on real processes: each stage's measured idle fraction against
(p - 1) / (v·m + p - 1), and its peak in-flight microbatches.

p gloo processes run ``eurocore.parallel.pipeline.run_schedule`` with the real
point-to-point transfers, but each chunk's forward sleeps ``forward_ms / v`` and its backward
twice that (an autograd function that only waits): the timeline measures the schedule and
its communication, not this CPU's speed at matrix products, so a 2-core machine measures
what a GPU cluster would see up to transfer latency. Each step's compute span comes from the
runner's trace (``time.perf_counter``, one monotonic clock for all processes of the host);
a stage's idle fraction is 1 - (its compute time) / (the span from the first step's start to
the last step's end over all stages).

    python -m eurocore.benchmarks.pipeline_timeline      (also part of parallel_accounting)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eurocore.parallel import ParallelGroups
from eurocore.parallel.pipeline import run_schedule
from eurocore.parallel.schedules import Step, bubble_fraction, max_in_flight, schedule

from . import harness

# (pipeline stages, virtual stages per rank); 8 microbatches each
LAYOUTS = ((2, 1), (2, 2), (4, 1), (4, 2))
MICROBATCHES = 8
FORWARD_MS = 20.0
SHAPE = (4, 1, 8)  # the activation passed between stages: small, the sleeps dominate


class _Wait(torch.autograd.Function):
    """Identity that waits ``forward_s`` in the forward and ``backward_s`` in the backward."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


def _measure_rank(groups: ParallelGroups, num_chunks: int, num_microbatches: int,
                  forward_ms: float) -> list[tuple[Step, float, float]]:
    p = groups.pp_size
    last = p * num_chunks - 1
    forward_s = forward_ms / 1e3 / num_chunks
    first_input = torch.ones(SHAPE, requires_grad=True)

    def forward_step(chunk: int, microbatch: int, x: torch.Tensor | None) -> torch.Tensor:
        out = _Wait.apply(first_input if x is None else x, forward_s, 2 * forward_s)
        stage = chunk * p + groups.pp_rank
        return out.sum() if stage == last else out

    steps = schedule("interleaved-1f1b" if num_chunks > 1 else "1f1b", groups.pp_rank, p,
                     num_microbatches, num_chunks)
    trace: list[tuple[Step, float, float]] = []
    dist.barrier()
    run_schedule(steps, forward_step, groups, num_chunks=num_chunks,
                 num_microbatches=num_microbatches, activation_shape=SHAPE,
                 dtype=torch.float32, device=torch.device("cpu"), trace=trace)
    return trace


def _worker(rank: int, world: int, port: int, num_chunks: int, num_microbatches: int,
            forward_ms: float, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = ParallelGroups.build(pp=world)
        trace = _measure_rank(groups, num_chunks, num_microbatches, forward_ms)
    finally:
        dist.destroy_process_group()
    torch.save([(s.kind, s.microbatch, s.chunk, a, b) for s, a, b in trace],
               Path(out_dir, f"rank{rank}.pt"))


def measure_layout(num_stages: int, num_chunks: int, num_microbatches: int = MICROBATCHES,
                   forward_ms: float = FORWARD_MS) -> dict[str, Any]:
    """Runs one layout on ``num_stages`` processes; per stage: measured idle fraction, peak
    in-flight microbatch-chunks (measured from the executed order, and the schedule's), and
    the formula's bubble."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(num_stages, harness.free_port(), num_chunks, num_microbatches,
                                forward_ms, tmp), nprocs=num_stages, join=True)
        traces = [torch.load(Path(tmp, f"rank{r}.pt")) for r in range(num_stages)]
    begin = min(t[0][3] for t in traces)
    end = max(t[-1][4] for t in traces)
    stages = []
    for rank, trace in enumerate(traces):
        busy = sum(b - a for *_, a, b in trace)
        executed = [Step(kind, mb, chunk) for kind, mb, chunk, *_ in trace]
        name = "interleaved-1f1b" if num_chunks > 1 else "1f1b"
        stages.append({
            "stage": rank,
            "idle_fraction": 1.0 - busy / (end - begin),
            "peak_in_flight": max_in_flight(executed),
            "schedule_peak_in_flight": max_in_flight(schedule(name, rank, num_stages,
                                                              num_microbatches, num_chunks)),
        })
    return {"pp": num_stages, "vpp": num_chunks, "microbatches": num_microbatches,
            "forward_ms": forward_ms, "backward_ms": 2 * forward_ms,
            "span_ms": 1e3 * (end - begin),
            "bubble_formula": bubble_fraction(num_stages, num_microbatches, num_chunks),
            "stages": stages}


def measure(layouts: Sequence[tuple[int, int]] = LAYOUTS, num_microbatches: int = MICROBATCHES,
            forward_ms: float = FORWARD_MS) -> list[dict[str, Any]]:
    """:func:`measure_layout` for each (pp, vpp)."""
    return [measure_layout(p, v, num_microbatches, forward_ms) for p, v in layouts]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per layout and stage: measured idle fraction beside the formula, and peak in-flight."""
    lines = [f"Pipeline idle fraction per stage ({rows[0]['microbatches']} microbatches, "
             f"forward {rows[0]['forward_ms']:g} ms / backward {rows[0]['backward_ms']:g} ms "
             f"per stage, sleeps over real gloo transfers)" if rows else "",
             " pp vpp stage |  idle   formula | in flight (schedule)",
             "-" * 50]
    for row in rows:
        for stage in row["stages"]:
            lines.append(f"{row['pp']:3d} {row['vpp']:3d} {stage['stage']:5d} | "
                         f"{stage['idle_fraction']:5.3f}  {row['bubble_formula']:7.3f} | "
                         f"{stage['peak_in_flight']:9d} ({stage['schedule_peak_in_flight']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table (the JSON is written by parallel_accounting, which calls this)."""
    parser = argparse.ArgumentParser(prog="python -m eurocore.benchmarks.pipeline_timeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--microbatches", type=int, default=MICROBATCHES)
    parser.add_argument("--forward-ms", type=float, default=FORWARD_MS)
    args = parser.parse_args(argv)
    if args.microbatches < 1:
        parser.error(f"--microbatches: expected an int >= 1, got {args.microbatches}")
    if not args.forward_ms > 0 or args.forward_ms == float("inf"):
        parser.error(f"--forward-ms: expected a finite number > 0, got {args.forward_ms}")
    print(format_table(measure(LAYOUTS, args.microbatches, args.forward_ms)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
