"""``python -m eurocore.train`` / ``eurocore train``: the training run.

    python -m eurocore.train --preset tiny --steps 300                  # one process
    torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel
    torchrun --nproc-per-node 4 -m eurocore.train --tp 2 --pp 2 --micro-batch-size 4

Exit status: 0 done; 1 diverged, a checkpoint failed to save, or stopped by a signal with
checkpoints off; 2 a bad option, bad data or a checkpoint that cannot be taken (one line says
which); 3 (PREEMPTED_EXIT_STATUS) stopped by SIGTERM or SIGUSR1 after saving a checkpoint:
run the same command again to resume.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed

from eurocore.train.checkpoint import CheckpointError
from eurocore.train.cli import ConfigParser, build_parser, parse_config
from eurocore.train.config import TrainConfig, to_toml, with_absolute_paths
from eurocore.train.distributed import init_process, launch_environment, local_device, shutdown
from eurocore.train.preemption import PREEMPTED_EXIT_STATUS, Preempted, StopSignals
from eurocore.train.trainer import build_source, check_memory, train
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
        rank, world, local_rank, _ = launch_environment()
    except ValueError as err:
        return _fail(parser, err)
    try:  # what every rank finds alike: one rank says it
        config = parse_config(parser, argv)
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
    try:  # this rank's device: each rank says what it found
        check_memory(config.model_config(), local_device(config.device, local_rank), world)
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
