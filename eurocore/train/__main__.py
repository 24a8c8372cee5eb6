"""``python -m eurocore.train`` / ``eurocore train``: the training run.

    python -m eurocore.train --preset tiny --steps 300                  # one process
    torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel
    torchrun --nproc-per-node 4 -m eurocore.train --tp 2 --pp 2 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eurocore.train.distributed import init_process, launch_environment, local_device, shutdown
from eurocore.train.trainer import TrainConfig, check_memory, train
from eurocore.utils.files import check_writable_file, write_json_atomically


def _parser(prog: str) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
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
                        "atomically at each logged step)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.train") -> int:
    """Parses ``argv``, checks every option, joins torchrun's process group (if any) and
    trains. Returns 0, or 2 after a one-line message when an option (or the data) is bad:
    options are all checked before any process group or model is made."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    rank, world, local_rank, _ = launch_environment()
    try:
        config = _config(args)
        config.layout(world)
        if args.metrics_json is not None:
            check_writable_file("metrics_json", args.metrics_json)
        device = local_device(args.device, local_rank)
        check_memory(config.model_config(), device, world)
        process = init_process(args.device)
    except ValueError as err:
        return _fail(parser, err, rank)
    try:
        history: list[dict] = []

        def write_metrics(metrics: dict) -> None:  # as each step is logged: nothing lost
            history.append(metrics)
            if args.metrics_json is not None and process.rank == 0:
                write_json_atomically(history, args.metrics_json)

        train(config, process, log=lambda line: print(line, flush=True), on_step=write_metrics)
    except ValueError as err:  # bad data met during the run, say
        return _fail(parser, err, process.rank)
    except FloatingPointError as err:  # the run diverged: not the options' fault
        _fail(parser, err, process.rank)
        return 1
    finally:
        shutdown()
    return 0


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


def _fail(parser: argparse.ArgumentParser, err: Exception, rank: int) -> int:
    """Prints ``prog: error: --option: what is wrong`` (rank 0 only: every rank checks the
    same options) and returns the exit status 2, as argparse does for its own errors."""
    if rank == 0:
        name, sep, rest = str(err).partition(": ")
        option = _option_names(parser).get(name) if sep else None
        message = f"{option}: {rest}" if option else str(err)
        print(f"{parser.prog}: error: {message.splitlines()[0]}", file=sys.stderr, flush=True)
    return 2


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The command-line spelling of each name an error may start with: every option's
    destination, and the model fields the options set."""
    names = {action.dest: action.option_strings[0] for action in parser._actions
             if action.option_strings}
    names.update(num_layers=names["layers"], model_overrides=names["layers"])
    return names


if __name__ == "__main__":
    sys.exit(main())
