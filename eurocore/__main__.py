"""The ``eurocore`` command (also ``python -m eurocore``).

    eurocore train [ARGS...]     the training run (python -m eurocore.train ARGS; torchrun too)
    eurocore data prepare ...    tokenize text into a Megatron indexed dataset
    eurocore checkpoint inspect DIR   a checkpoint's step, layout, model and integrity
    eurocore export-hf CHECKPOINT OUT_DIR   a checkpoint as a Hugging Face Llama model
    eurocore bench [ARGS...]     the kernel benchmarks (python -m eurocore.benchmarks ARGS)
    eurocore plot RUN_DIR        a run's metrics.jsonl as RUN_DIR/metrics.png
    eurocore plot RESULTS.json   benchmark results as PNGs beside the file
    eurocore backends            which backends this machine can run, and why (not)

The top of the layering: everything is imported inside the sub-command that needs it, so
``eurocore --help`` stays fast and one sub-command's imports never break another.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eurocore", description="eurocore: fused kernels for LLM training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Listed for --help only: main() forwards everything after "train"/"bench" untouched.
    sub.add_parser("train", help="train the model (see 'eurocore train --help')",
                   add_help=False)
    sub.add_parser("bench", help="kernel benchmarks (see 'eurocore bench --help')",
                   add_help=False)
    sub.add_parser("data", help="data tools: prepare (see 'eurocore data --help')",
                   add_help=False)
    checkpoint = sub.add_parser("checkpoint", help="checkpoint tools: inspect")
    checkpoint_sub = checkpoint.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = checkpoint_sub.add_parser(
        "inspect", help="a checkpoint's step, layout, model config, size and whether it is "
        "complete and intact (every file's size and CRC-32 checked); exit status 1 if not")
    inspect.add_argument("path", metavar="DIR", help="a checkpoint (step-N) or a checkpoint "
                         "directory (its latest complete checkpoint)")
    export = sub.add_parser(
        "export-hf", help="write a checkpoint (any layout) as a Hugging Face LlamaForCausalLM "
        "directory: safetensors shards, their index, config.json, generation_config.json")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint (step-N) or a "
                        "checkpoint directory (its latest complete checkpoint)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the new model directory (must not "
                        "exist, or be empty)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the stored weights' dtype (default float32, the checkpoint's)")
    export.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="a directory whose tokenizer files are copied alongside")
    export.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                        help="the largest safetensors file, in GB (default 5)")
    plot = sub.add_parser(
        "plot", help="plot a training run's metrics (RUN_DIR/metrics.jsonl): loss, learning "
        "rate, tokens/s and MFU over the steps, as a PNG; or a benchmark's results JSON: "
        "each op's fraction of the measured ceiling against shape, one line per "
        "implementation (needs matplotlib: eurocore[plot])")
    plot.add_argument("path", metavar="PATH", help="a run directory (the training run's "
                      "--output-dir) or a results JSON file")
    plot.add_argument("-o", "--output", metavar="OUT", default=None,
                      help="a run: the PNG (default RUN_DIR/metrics.png); results: the "
                      "directory of the PNGs (default the JSON's)")
    sub.add_parser("backends", help="list the backends and whether this machine can run them")
    return parser


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        if Path(args.path).is_file():  # benchmark results
            from eurocore.benchmarks.plot import plot_results

            for png in plot_results(args.path, args.output or Path(args.path).parent):
                print(png)
        else:
            from eurocore.train.plot import plot

            print(plot(args.path, args.output))
    except (ValueError, ImportError, OSError) as err:  # bad input, no matplotlib, a full disk
        print(f"eurocore plot: {err}", file=sys.stderr)
        return 1
    return 0


def _export_hf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from eurocore.train.hf import export_hf

    if not (math.isfinite(args.max_shard_size) and args.max_shard_size > 0):
        parser.error(f"--max-shard-size: expected a positive size in GB, got "
                     f"{args.max_shard_size}")
    try:
        export_hf(args.checkpoint, args.out_dir, dtype=getattr(torch, args.dtype),
                  tokenizer=args.tokenizer, max_shard_bytes=int(args.max_shard_size * 1e9))
    except (ValueError, OSError) as err:  # a bad checkpoint or tokenizer; a full disk
        print(f"eurocore export-hf: {err}", file=sys.stderr)
        return 1
    return 0


def _inspect_checkpoint(path: str) -> int:
    from eurocore.train.checkpoint import describe, resolve_checkpoint

    try:
        print(describe(resolve_checkpoint(path)))
    except ValueError as err:
        print(f"eurocore checkpoint inspect: {err}", file=sys.stderr)
        return 1
    return 0


def _print_backends() -> int:
    from eurocore.ops import available_backends

    for name, status in available_backends().items():
        print(f"  {name:7s} {'yes' if status.available else 'no ':3s} {status.reason}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``eurocore`` command with ``argv`` (default ``sys.argv[1:]``); returns the
    exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from eurocore.train.__main__ import main as train_main

        return train_main(argv[1:], prog="eurocore train")
    if argv and argv[0] == "data":
        from eurocore.data.__main__ import main as data_main

        return data_main(argv[1:], prog="eurocore data")
    if argv and argv[0] == "bench":
        from eurocore.benchmarks.__main__ import main as bench_main

        return bench_main(argv[1:], prog="eurocore bench")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "backends":
        return _print_backends()
    if args.command == "checkpoint":
        return _inspect_checkpoint(args.path)
    if args.command == "export-hf":
        return _export_hf(args, parser)
    if args.command == "plot":
        return _plot(args)
    parser.print_help()
    return 0 if args.command is None and not argv else 2


if __name__ == "__main__":
    sys.exit(main())
