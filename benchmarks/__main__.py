"""The kernel benchmark command: ``python -m eurocore.benchmarks`` (or ``eurocore bench``).

    python -m eurocore.benchmarks [--ops rms_norm] [--quick] [--out DIR] [--no-json]
    python -m eurocore.benchmarks compile [ARGS...]     # forwarded to eurocore.benchmarks.compile
    python -m eurocore.benchmarks tune [ARGS...]        # launch-configuration sweeps (a GPU)

Prints the environment, the ceilings measured now on the same device, the results table,
and the path of the JSON written to ``DIR/<date>-<device>.json`` (default
``benchmarks/results`` under the current directory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from eurocore.utils.files import check_writable_dir

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
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON results go (default: {DEFAULT_OUT})")
    parser.add_argument("--no-json", action="store_true", help="print only; write no JSON")
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

    parser = _parser(prog)
    args = parser.parse_args(argv)
    ops = _selected_ops(parser, args.ops)
    device = _device(parser, args.device)
    if not args.no_json:
        try:
            check_writable_dir("--out", args.out)
        except ValueError as err:
            parser.error(str(err))

    env = harness.environment(device)
    print(harness.format_environment(env))
    print("measuring ceilings ...", flush=True)
    ceilings = harness.measure_ceilings(device)
    print(harness.format_ceilings(ceilings))
    print(flush=True)

    results: list[harness.Result] = []
    skipped: list[harness.Skipped] = []
    path = None
    for op in ops:
        op_cases = OPS[op](device, args.quick)
        runnable = sum(case.skip is None for case in op_cases)
        print(f"{op}: {runnable} cases", flush=True)
        op_results, op_skipped = harness.run_cases(op_cases, device, ceilings)
        results += op_results
        skipped += op_skipped
        if not args.no_json:  # after each op: a run cut short keeps what it measured
            path = harness.write_json(results, ceilings, env, args.out, skipped)
    print()
    harness.print_table(results, skipped)
    if path is not None:
        print(f"\nresults written to {path}")
    failed = [s for s in skipped if s.status == "failed" and s.impl.startswith("eurocore")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
