"""``python -m eurocore.train`` / ``eurocore train``: the training run.

    python -m eurocore.train --preset tiny --steps 300                  # one process
    torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel
    torchrun --nproc-per-node 4 -m eurocore.train --tp 2 --pp 2 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from eurocore.train.distributed import init_process, shutdown
from eurocore.train.trainer import TrainConfig, train


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
                   help="rank 0 writes the logged metrics here")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.train") -> int:
    """Parses ``argv``, joins torchrun's process group (if any) and trains; returns 0."""
    args = _parser(prog).parse_args(argv)
    config = TrainConfig(
        preset=args.preset,
        model_overrides={} if args.layers is None else {"num_layers": args.layers},
        tp=args.tp, pp=args.pp, vpp=args.vpp,
        layers_per_stage=(None if args.layers_per_stage is None
                          else tuple(int(n) for n in args.layers_per_stage.split(","))),
        sequence_parallel=args.sequence_parallel, steps=args.steps,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, markov_branching=args.markov_branching,
        data_seed=args.data_seed, log_every=args.log_every,
        bf16={"auto": None, "on": True, "off": False}[args.bf16])
    process = init_process(args.device)
    try:
        history = train(config, process, log=lambda line: print(line, flush=True))
        if args.metrics_json and process.rank == 0:
            with open(args.metrics_json, "w") as f:
                json.dump(history, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
