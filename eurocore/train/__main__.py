"""``python -m eurocore.train`` / ``eurocore train``: the training run.

    python -m eurocore.train --preset tiny --steps 300                  # one process
    torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel
    torchrun --nproc-per-node 4 -m eurocore.train --tp 2 --pp 2 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from eurocore.train.distributed import init_process, launch_environment, local_device, shutdown
from eurocore.train.trainer import TrainConfig, check_memory, train
from eurocore.utils.files import check_writable_file, write_json_atomically

# --metrics-json is rewritten whole (a JSON list, atomically): at most this often, and once
# more when the run ends, however it ends, so a long run with log_every=1 does not rewrite a
# growing file at every step.
METRICS_WRITE_INTERVAL_S = 30.0


class _Parser(argparse.ArgumentParser):
    """Remembers each option's first spelling by its destination, so an error naming a
    config field (``lr: ...``) can name the option the user typed (``--lr: ...``)."""

    def __init__(self, *args, **kwargs) -> None:
        self.option_of: dict[str, str] = {}  # before the parent adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.option_of[action.dest] = action.option_strings[0]
        return action


def _parser(prog: str) -> _Parser:
    d = TrainConfig()
    p = _Parser(
        prog=prog, description="Trains the Llama-style model on a synthetic Markov source "
        "whose entropy rate (the loss floor) is known, under torchrun or as one process.")
    p.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset})")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline stages")
    p.add_argument("--vpp", type=int, default=d.vpp,
                   help="virtual stages per pipeline rank (> 1: interleaved 1F1B)")
    p.add_argument("--layers-per-stage", default=None, metavar="N,N,...",
                   help="decoder layers of each (virtual) stage; default: an even split "
                        "with the first and last stages lighter")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split activations along the sequence between TP regions")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--global-batch-size", "--batch-size", dest="batch_size", type=int,
                   default=d.batch_size, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per microbatch (default: the global batch, one "
                        "microbatch); microbatches = global / micro")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final rate (default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup (default: a tenth of the steps)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--markov-branching", type=int, default=d.markov_branching,
                   help="successors per token in the synthetic source")
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on GPUs)")
    p.add_argument("--metrics-json", default=None, metavar="PATH",
                   help="rank 0 writes the logged metrics here (a JSON list, rewritten "
                        f"atomically at most every {METRICS_WRITE_INTERVAL_S:g} s and at the "
                        "end)")
    # Model fields an option sets: their errors name the option.
    p.option_of.update(num_layers="--layers", model_overrides="--layers")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.train") -> int:
    """Parses ``argv``, checks every option, joins torchrun's process group (if any) and
    trains. Returns 0; 2 after a one-line message when an option (or the data) is bad, all
    options being checked before any process group or model is made; 1 when the run
    diverges."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        rank, world, local_rank, _ = launch_environment()
    except ValueError as err:
        return _fail(parser, err)
    try:  # what every rank finds alike: one rank says it
        config = _config(args)
        config.layout(world)
        if args.metrics_json is not None:
            check_writable_file("metrics_json", args.metrics_json)
    except ValueError as err:
        return _fail(parser, err) if rank == 0 else 2
    where = rank if world > 1 else None
    try:  # this rank's device: each rank says what it found
        check_memory(config.model_config(), local_device(args.device, local_rank), world)
        process = init_process(args.device)
    except ValueError as err:
        return _fail(parser, err, where)
    metrics = _MetricsFile(args.metrics_json if rank == 0 else None)
    try:
        train(config, process, log=lambda line: print(line, flush=True), on_step=metrics.add)
    except ValueError as err:  # bad data met during the run, say
        return _fail(parser, err, where)
    except FloatingPointError as err:  # the run diverged: not the options' fault
        _fail(parser, err, where)
        return 1
    finally:
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


def _config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed options describe (its construction checks them)."""
    layers_per_stage = None
    if args.layers_per_stage is not None:
        try:
            layers_per_stage = tuple(int(n) for n in args.layers_per_stage.split(","))
        except ValueError:
            raise ValueError(f"layers_per_stage: expected comma-separated ints like 3,4,4,3, "
                             f"got {args.layers_per_stage!r}") from None
    return TrainConfig(
        preset=args.preset,
        model_overrides={} if args.layers is None else {"num_layers": args.layers},
        tp=args.tp, pp=args.pp, vpp=args.vpp, layers_per_stage=layers_per_stage,
        sequence_parallel=args.sequence_parallel, steps=args.steps,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, markov_branching=args.markov_branching,
        data_seed=args.data_seed, log_every=args.log_every,
        bf16={"auto": None, "on": True, "off": False}[args.bf16])


def _fail(parser: _Parser, err: Exception, rank: int | None = None) -> int:
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
