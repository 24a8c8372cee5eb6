"""``python -m eurocore.train`` / ``eurocore train``: the training run.

    python -m eurocore.train --preset tiny --steps 300                  # one process
    torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel
    torchrun --nproc-per-node 4 -m eurocore.train --tp 2 --pp 2 --micro-batch-size 4
    eurocore train --config configs/eurollm-9b-lumi.toml --dry-run --world-size 16 \
        --device-memory-gib 64                          # a login node: the plan, no run

Exit status: 0 done; 1 diverged, a checkpoint failed to save, or stopped by a signal with
checkpoints off; 2 a bad option, bad data or a checkpoint that cannot be taken (one line says
which); 3 (PREEMPTED_EXIT_STATUS) stopped by SIGTERM or SIGUSR1 after saving a checkpoint:
run the same command again to resume. ``--dry-run``: 0 when the estimate fits the device
memory (or none is known), 2 when it does not or an option is bad.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed

from eurocore.train.checkpoint import CheckpointError
from eurocore.train.cli import CommandOptions, ConfigParser, build_parser, parse_command
from eurocore.train.config import TrainConfig, to_toml, with_absolute_paths
from eurocore.train.distributed import Launch, detect_launch, init_process, local_device, shutdown
from eurocore.train.preemption import PREEMPTED_EXIT_STATUS, Preempted, StopSignals
from eurocore.train.trainer import (
    STATE_BYTES,
    RankMemory,
    build_source,
    check_memory,
    estimate_memory,
    train,
)
from eurocore.utils.files import (
    check_writable_dir,
    check_writable_file,
    write_json_atomically,
    write_text_atomically,
)

# --metrics-json is rewritten whole (a JSON list, atomically): at most this often, and once
# more when the run ends, however it ends, so a long run with log_every=1 does not rewrite a
# growing file at every step.
METRICS_WRITE_INTERVAL_S = 30.0


DESCRIPTION = ("Trains the Llama-style model under torchrun, srun or as one process, on "
               "tokenized corpora (--data-path; 'eurocore data prepare' makes them) or on a "
               "synthetic Markov source whose entropy rate (the loss floor) is known.")


def default_output_dir(config: TrainConfig) -> str:
    """runs/<preset>-<date-time> (UTC, to the second)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"runs/{config.preset}-{stamp}"


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.train") -> int:
    """Parses ``argv``, checks every option, joins torchrun's process group (if any) and
    trains. Returns the exit status of the module docstring; the options are all checked
    before any process group or model is made."""
    parser = build_parser(prog, DESCRIPTION)
    try:
        launch = detect_launch()
    except ValueError as err:
        return _fail(parser, err)
    rank, world, local_rank = launch.rank, launch.world_size, launch.local_rank
    try:  # what every rank finds alike: one rank says it
        config, command = parse_command(parser, argv)
    except ValueError as err:
        return _fail(parser, err) if rank == 0 else 2
    if command.dry_run:
        return dry_run(parser, config, command, launch) if rank == 0 else 0
    try:  # the same on every rank: rank 0 says it
        check_batch_shell(config, launch)
        if config.output_dir is None:
            config = dataclasses.replace(config, output_dir=default_output_dir(config))
        config = with_absolute_paths(config)
        config.layout(world)
        if config.metrics_json is not None:
            check_writable_file("metrics_json", config.metrics_json)
        check_writable_dir("output_dir", config.output_dir)
        if config.checkpoint_dir is not None:
            check_writable_dir("checkpoint_dir", config.checkpoint_dir)
        data = build_source(config, config.model_config())
    except ValueError as err:
        return _fail(parser, err) if rank == 0 else 2
    where = rank if world > 1 else None
    if launch.job_tasks is not None and launch.job_tasks > 1:
        print(f"{parser.prog}: note: one process, in the batch shell of a SLURM job of "
              f"{launch.job_tasks} tasks (no srun step); srun starts one process per task",
              file=sys.stderr, flush=True)
    try:  # this rank's device: each rank says what it found
        device = local_device(config.device, local_rank,
                              local_world_size=launch.local_world_size)
        check_memory(config.model_config(), device, world)
        process = init_process(config.device)
    except ValueError as err:
        return _fail(parser, err, where)
    if world > 1:  # the default directory's time is rank 0's: every rank records the same
        shared = [config.output_dir]
        torch.distributed.broadcast_object_list(shared, src=0)
        config = dataclasses.replace(config, output_dir=shared[0])
    metrics = _MetricsFile(config.metrics_json if rank == 0 else None)
    if rank == 0:
        resolved = to_toml(config)
        path = write_text_atomically(resolved, Path(config.output_dir) / "config.toml")
        print(f"run directory {config.output_dir}; its config ({path.name}, which --config "
              f"reads):\n{resolved}", flush=True)
    stop = StopSignals().install()
    try:
        train(config, process, log=lambda line: print(line, flush=True), on_step=metrics.add,
              data=data, stop=stop)
    except ValueError as err:  # bad data met during the run, or a checkpoint not to take
        return _fail(parser, err, where)
    except (FloatingPointError, CheckpointError) as err:  # not the options' fault
        _fail(parser, err, where)
        return 1
    except Preempted as stopped:
        status = PREEMPTED_EXIT_STATUS if stopped.saved else 1
        # a run started from an explicit checkpoint would start from it again
        again = ("run the same command again to resume" if config.resume in ("auto", "none")
                 else "run it again with --resume auto (not --resume PATH) to resume")
        if rank == 0:
            print(f"{parser.prog}: {stopped}" + (f"; {again}" if stopped.saved else "")
                  + f" (exit status {status})", file=sys.stderr, flush=True)
        return status
    finally:
        stop.uninstall()
        metrics.write()
        shutdown()
    return 0


class _MetricsFile:
    """The logged steps so far, rewritten to ``path`` (None: nowhere) atomically, at most
    every METRICS_WRITE_INTERVAL_S seconds, and by :meth:`write` at the end."""

    def __init__(self, path: str | None) -> None:
        self.path, self.history, self.written_at = path, [], -math.inf

    def add(self, metrics: dict) -> None:
        self.history.append(metrics)
        if time.monotonic() - self.written_at >= METRICS_WRITE_INTERVAL_S:
            self.write()

    def write(self) -> None:
        if self.path is not None and self.history:
            write_json_atomically(self.history, self.path)
            self.written_at = time.monotonic()


def check_batch_shell(config: TrainConfig, launch: Launch) -> None:
    """Raises ValueError naming tp or pp when ``config`` needs several processes but this
    is one, started in the batch shell of a SLURM job (SLURM_NTASKS set, no srun step):
    what a job script's plain ``python -m eurocore.train`` is. Such a process used to
    believe it was rank 0 of the job's tasks and wait for the others until the time
    limit."""
    needed = config.tp * config.pp
    if launch.launcher != "batch-shell" or needed == 1:
        return
    name = "tp" if config.tp > 1 else "pp"
    raise ValueError(f"{name}: tp · pp = {needed} needs {needed} processes or more, but this "
                     f"is one: the batch shell of a SLURM job (SLURM_NTASKS = "
                     f"{launch.job_tasks}, no SLURM_STEP_NUM_TASKS: not an srun step). Start "
                     f"the ranks with srun (scripts/slurm/), or check the plan with --dry-run")


def dry_run(parser: ConfigParser, config: TrainConfig, command: CommandOptions,
            launch: Launch) -> int:
    """``--dry-run``: prints the resolved config, the layout of the planned world size
    (``--world-size``, else the launcher's, else the SLURM job's tasks, else 1) and the
    estimated memory per rank of each pipeline stage
    (:func:`~eurocore.train.trainer.estimate_memory`) against one device's memory
    (``--device-memory-gib``, else the visible GPU's: only its properties are read).
    Makes no process group, no model and no directory. Returns the exit status: 0, or 2
    when an option is bad or the estimate exceeds the device memory."""
    if command.world_size is not None:
        world, source = command.world_size, "--world-size"
    elif launch.world_size > 1:
        world, source = launch.world_size, f"the {launch.launcher} launch"
    elif launch.job_tasks is not None:
        world, source = launch.job_tasks, "SLURM_NTASKS of this job"
    else:
        world, source = 1, "no launcher; --world-size sets it"
    try:
        config = with_absolute_paths(config)
        layout = config.layout(world)
        estimate = estimate_memory(config, world)
        have, device = _device_memory(config, command)
    except ValueError as err:
        return _fail(parser, err)
    model = config.model_config()
    name = (config.preset if config.init_from_hf is None
            else os.path.basename(os.path.normpath(config.init_from_hf)))
    bf16 = config.device != "cpu" if config.bf16 is None else config.bf16
    recomputed = ("" if config.recompute == "none" or config.recompute_layers is None
                  else f" (layers {','.join(map(str, config.recompute_layers))})")
    lines = [
        f"{parser.prog} --dry-run: nothing runs (no GPU used, no process group, no files)",
        f"resolved config (what --config reads):\n{to_toml(config)}",
        f"model: {name}, {model.num_parameters() / 1e9:.3g}B parameters ({model.num_layers} "
        f"layers, hidden {model.hidden_size}, vocabulary {model.vocab_size})",
        f"world: {world} process{'es' if world > 1 else ''} ({source})",
        f"layout: tp {config.tp}{' (sequence parallel)' if config.sequence_parallel else ''}"
        f" x pp {config.pp}{f' ({config.vpp} virtual stages each)' if config.vpp > 1 else ''}"
        f" x dp {layout.dp}{' (FSDP2)' if layout.dp > 1 else ''}; {layout.num_microbatches} "
        f"microbatch{'es' if layout.num_microbatches > 1 else ''} of "
        f"{layout.micro_batch_size} x {config.seq_len} tokens per replica; schedule "
        f"{layout.schedule}; recompute {config.recompute}{recomputed}; loss "
        f"{'fused' if config.fused_loss else 'from the logits'}; activations "
        f"{'bf16 (autocast)' if bf16 else 'fp32 (twice the bf16 count: an upper bound)'}",
        "",
        _memory_table(estimate),
        "",
    ]
    largest = max(estimate, key=lambda rank: rank.total)
    need = f"the largest rank (stage {largest.stage}) needs {_gib(largest.total)} GiB"
    if have is None:
        lines.append(f"device memory: unknown ({need}); --device-memory-gib compares it")
    else:
        lines.append(f"device memory: {_gib(have)} GiB ({device}); {need}, "
                     f"{largest.total / have:.0%} of it")
    lines.append("not counted: the allocator's fragmentation and caches, autocast's bf16 weight "
                 "copies, FSDP's gathered layers, communication buffers and the GPU runtime: "
                 "leave room (the training benchmark plans with 70% of a device)")
    print("\n".join(lines), flush=True)
    if have is not None and largest.total > have:
        option = "--device-memory-gib" if command.device_memory_gib is not None else "device"
        print(f"{parser.prog}: error: {option}: the estimate, {_gib(largest.total)} GiB per rank "
              f"of stage {largest.stage}, exceeds the device's {_gib(have)} GiB; spread the "
              f"model further (tp, pp, data parallelism), recompute activations (--recompute), "
              f"or take smaller microbatches (--micro-batch-size)",
              file=sys.stderr, flush=True)
        return 2
    return 0


def _device_memory(config: TrainConfig, command: CommandOptions) -> tuple[int | None, str]:
    """(bytes, where it comes from) of one device: ``--device-memory-gib``, else the GPU this
    host shows (its properties only: no memory is allocated), else (None, "")."""
    if command.device_memory_gib is not None:
        return round(command.device_memory_gib * 2**30), "--device-memory-gib"
    if config.device != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name}, GPU 0 of this host"
    return None, ""


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def _memory_table(estimate: Sequence[RankMemory]) -> str:
    """One row per pipeline stage: parameters and GiB per rank by kind."""
    kinds = list(STATE_BYTES)
    header = (f"{'stage':>5} {'parameters':>11} "
              + " ".join(f"{kind:>9}" for kind in kinds)
              + f" {'activations':>11} {'in flight':>9} {'total':>9}")
    rows = ["memory per rank (GiB; weights, gradients and AdamW's two moments in fp32, "
            "activations at the schedule's peak)", header]
    for rank in estimate:
        rows.append(f"{rank.stage:>5} {rank.parameters / 1e6:>10.2f}M "
                    + " ".join(f"{_gib(getattr(rank, kind)):>9}" for kind in kinds)
                    + f" {_gib(rank.activations):>11} {rank.activation_peak.in_flight:>9}"
                    + f" {_gib(rank.total):>9}")
    return "\n".join(rows)


def _fail(parser: ConfigParser, err: Exception, rank: int | None = None) -> int:
    """Prints ``prog: error: --option: what is wrong`` on one line (with the rank when
    ``rank`` is given: what one rank of several found) and returns the exit status 2, as
    argparse does for its own errors."""
    name, sep, rest = str(err).partition(": ")
    option = parser.option_of.get(name) if sep else None
    message = (f"{option}: {rest}" if option else str(err)).splitlines()[0]
    where = f" (rank {rank})" if rank is not None else ""
    print(f"{parser.prog}: error: {message}{where}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
