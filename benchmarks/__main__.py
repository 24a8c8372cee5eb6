"""The kernel benchmark command: ``python -m eurocore.benchmarks`` (or ``eurocore bench``).

    python -m eurocore.benchmarks [--ops rms_norm] [--quick] [--out DIR | --json PATH]
        [--no-json] [--deadline SECONDS] [--plot]
    python -m eurocore.benchmarks compile [ARGS...]     # forwarded to eurocore.benchmarks.compile
    python -m eurocore.benchmarks tune [ARGS...]        # launch-configuration sweeps (a GPU)
    python -m eurocore.benchmarks host [ARGS...]        # host time per eager call of each op

Prints the environment, the ceilings measured now on the same device, the results table,
and the path of the JSON written to ``DIR/<date>-<device>.json`` (default
``benchmarks/results`` under the current directory) or ``--json PATH``. The JSON is
rewritten after every case, so a run killed midway keeps what it measured; ``--deadline``
stops starting cases that many seconds after the process started (imports included) and
says so in the JSON's ``status``.
``--plot`` adds one PNG per op beside the JSON (:func:`eurocore.benchmarks.plot.plot_results`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import attention, harness, rms_norm, rotary, swiglu

# op name -> cases(device, quick) -> list[Case]. A new kernel plugs in with one line here.
OPS: dict[str, Callable[[torch.device, bool], list[harness.Case]]] = {
    "rms_norm": rms_norm.cases,
    "rotary": rotary.cases,
    "attention": attention.cases,
    "swiglu": swiglu.cases,
}

DEFAULT_OUT = "benchmarks/results"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Times eurocore's kernels next to torch eager, torch.compile, Liger and "
                    "apex, against the copy bandwidth and matmul rate measured on the same "
                    "device in the same run.",
        epilog="Sub-command: 'compile [ARGS...]' runs the ahead-of-time compile report "
               "(eurocore.benchmarks.compile); see 'compile --help'.",
    )
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help=f"ops to benchmark, space- or comma-separated "
                             f"(default: all of {', '.join(OPS)})")
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes only (and no torch.compile on the CPU)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="time only these variants, in this order (fwd, bwd, "
                             "fwd+bwd; default all, in each op's order)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON results go (default: {DEFAULT_OUT})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the JSON to PATH instead of DIR/<date>-<device>.json")
    parser.add_argument("--no-json", action="store_true", help="print only; write no JSON")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="start no case after this many seconds from the process's "
                             "start (the cases left are listed as not run)")
    parser.add_argument("--plot", action="store_true",
                        help="also one PNG per op beside the JSON: the fraction of the "
                             "measured ceiling against shape, a line per implementation "
                             "(needs matplotlib: the plot extra)")
    return parser


def _selected_ops(parser: argparse.ArgumentParser, ops: list[str] | None) -> list[str]:
    if ops is None:
        return list(OPS)
    names = [name for item in ops for name in item.split(",") if name]
    unknown = [name for name in names if name not in OPS]
    if unknown:
        parser.error(f"--ops: unknown {', '.join(unknown)}; expected some of {', '.join(OPS)}")
    return names


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """The device to time: ``--device``, else cuda when a GPU is visible, else cpu. Only a
    CPU or a visible CUDA/ROCm GPU can be timed (a meta tensor has no time)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"--device: {name!r} is not a torch device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: times cpu or cuda (ROCm GPUs too) devices, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {name!r} asked for, but torch sees no GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device: {name!r} asked for, but torch sees "
                     f"{torch.cuda.device_count()} GPU(s)")
    return device


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.benchmarks") -> int:
    """Runs the benchmark (or the ``compile`` sub-command) and returns the exit status.

    ``prog`` is the command name shown in usage messages (``eurocore bench`` there).

    Exit status 1 when a eurocore implementation failed to run; others' failures (a broken
    Liger install, torch.compile without a C++ compiler) are reported but not fatal.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compile":
        from . import compile as compile_report  # written separately; only this branch needs it

        return compile_report.main(argv[1:])
    if argv and argv[0] == "tune":
        from . import tune

        return tune.main(argv[1:])
    if argv and argv[0] == "host":
        from . import host

        return host.main(argv[1:])

    parser = _parser(prog)
    args = parser.parse_args(argv)
    ops = _selected_ops(parser, args.ops)
    device = _device(parser, args.device)
    if args.deadline is not None and args.deadline <= 0:
        parser.error(f"--deadline: a number of seconds above 0, got {args.deadline:g}")
    deadline = harness.deadline_after(args.deadline)
    if args.no_json and (args.json or args.plot):
        parser.error(f"{'--json' if args.json else '--plot'}: needs the JSON; drop --no-json")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot: matplotlib is not installed (pip install eurocore[plot])")
    harness.check_output(parser, args)

    env = harness.environment(device)
    print(harness.format_environment(env))
    print("measuring ceilings ...", flush=True)
    ceilings = harness.measure_ceilings(device)
    print(harness.format_ceilings(ceilings))
    print(flush=True)

    results: list[harness.Result] = []
    skipped: list[harness.Skipped] = []
    path = None if args.no_json else Path(args.json or harness.result_path(env, args.out))

    def write(status: str) -> None:
        if path is not None:
            harness.write_json(results, ceilings, env, args.out, skipped, path=path,
                               status=status)

    def record(item: harness.Result | harness.Skipped) -> None:
        # after each case: a run killed midway keeps every case it finished
        (results if isinstance(item, harness.Result) else skipped).append(item)
        write("running")

    write("running")  # from here on the file exists, whenever the run is stopped
    for op in ops:
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(harness.Skipped(op, "*", {}, "*", harness.NOT_RUN,
                                           "not started: the run's deadline had passed"))
            continue
        op_cases = OPS[op](device, args.quick)
        if args.variants is not None:  # the cases skipped as a whole ("*") still say why
            order = ("*", *args.variants)
            op_cases = sorted((c for c in op_cases if c.variant in order),
                              key=lambda c: order.index(c.variant))
        runnable = sum(case.skip is None for case in op_cases)
        print(f"{op}: {runnable} cases", flush=True)
        harness.run_cases(op_cases, device, ceilings, deadline=deadline, on_case=record,
                          progress=lambda line: print(f"  {line}", flush=True))
    cut = any(s.status == harness.NOT_RUN for s in skipped)
    write("deadline" if cut else "complete")
    print()
    harness.print_table(results, skipped)
    if path is not None:
        print(f"\nresults written to {path}")
    if args.plot and path is not None:
        from .plot import plot_results

        for png in plot_results(path, path.parent):
            print(f"plot written to {png}")
    failed = [s for s in skipped if s.status == "failed" and s.impl.startswith("eurocore")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
