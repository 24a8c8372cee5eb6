"""The ahead-of-time compile report: every kernel configuration, for every GPU target, no GPU.

    python -m eurocore.benchmarks compile [--targets sm_90,gfx942] [--kernel rms_norm] [--jobs N]
    python -m eurocore.benchmarks.compile ...                       # the same

Compiles each case of ``eurocore.kernels.aot.cases()`` for each target of
``eurocore.kernels.compile_engine.TARGETS`` and prints, per kernel and target, the cases
compiled, the largest shared memory, registers (AMD: VGPRs from the AMDGCN metadata;
NVIDIA: from ptxas -v), spills and the widest global load. Exits 1 and lists the failures
when any case fails to compile or launches more threads than the target allows; 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

import triton

from eurocore.kernels import aot
from eurocore.kernels import compile_engine as engine


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks compile",
        description="Compiles every kernel configuration ahead of time for NVIDIA and AMD "
                    "targets (no GPU needed) and reports shared memory, registers, spills "
                    "and load widths.")
    parser.add_argument("--targets", default=None, metavar="T[,T...]",
                        help=f"targets, comma-separated (default: those of "
                             f"{', '.join(engine.TARGETS)} this Triton has a backend for)")
    parser.add_argument("--kernel", default=None, choices=sorted(aot.GENERATORS),
                        help="one kernel family (default: all)")
    parser.add_argument("--jobs", "-j", type=int, default=_cpus(), metavar="N",
                        help=f"worker processes (default: the {_cpus()} usable CPUs; 1 compiles "
                             f"in this process)")
    parser.add_argument("--cases", action="store_true",
                        help="also print one line per case and target")
    return parser


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.targets is None:
        names = [t for t, target in engine.TARGETS.items() if engine.has_backend(target)]
        skipped = [t for t in engine.TARGETS if t not in names]
        if skipped:
            print(f"skipped: {', '.join(skipped)} (this Triton has no backend for them)")
    else:
        names = [t for t in args.targets.split(",") if t]
        unknown = [t for t in names if t not in engine.TARGETS]
        if unknown or not names:
            parser.error(f"--targets: unknown {', '.join(unknown) or '(none given)'}; expected "
                         f"some of {', '.join(engine.TARGETS)}")
        missing = [t for t in names if not engine.has_backend(engine.TARGETS[t])]
        if missing:
            parser.error(f"--targets: this Triton has no backend for {', '.join(missing)}")
    if not names:
        parser.error("no target this Triton can compile for")
    if args.jobs < 1:
        parser.error("--jobs: expected at least 1")
    # Triton 3.9 warns once per process about a default changing in 3.10; not ours to fix.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")

    families = [args.kernel] if args.kernel else list(aot.GENERATORS)
    todo = {family: aot.cases(family) for family in families}
    targets = [engine.TARGETS[t] for t in names]
    total = sum(len(c) for c in todo.values())
    print(f"AOT compile: {total} cases x {len(targets)} targets ({', '.join(names)}), "
          f"{args.jobs} job(s), triton {triton.__version__}", flush=True)
    start = time.perf_counter()
    flat = [case for family in families for case in todo[family]]
    results = engine.compile_all(flat, targets, jobs=args.jobs)
    elapsed = time.perf_counter() - start

    failures = [r for r in results if isinstance(r, engine.AotFailure)]
    by_kernel: dict[tuple[str, str], list] = {}
    for r in results:
        by_kernel.setdefault((r.kernel, r.target), []).append(r)
    print()
    print(_table(by_kernel, names))
    if args.cases:
        print()
        for r in results:
            print(_case_line(r))
    print(f"\n{len(results) - len(failures)}/{len(results)} compiled in {elapsed:.1f} s")
    if failures:
        print(f"\n{len(failures)} FAILED:")
        for f in failures:
            print(f"  {f}")
        return 1
    return 0


def _table(by_kernel: dict[tuple[str, str], list], targets: list[str]) -> str:
    header = ("kernel", "target", "compiled", "max smem B", "max regs", "spills",
              "widest load B")
    rows = [header]
    for kernel in dict.fromkeys(k for k, _ in by_kernel):
        for target in targets:
            results = by_kernel.get((kernel, target), [])
            ok = [r for r in results if isinstance(r, engine.AotReport)]
            rows.append((kernel, target, f"{len(ok)}/{len(results)}",
                         str(max((r.shared for r in ok), default=0)), _regs(ok), _spills(ok),
                         _widths(ok)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def _regs(ok: list) -> str:
    """Max registers: VGPRs (and SGPRs, AGPRs) on AMD, ptxas's count on NVIDIA."""
    if any(r.vgpr is not None for r in ok):
        text = f"{max(r.vgpr or 0 for r in ok)} vgpr, {max(r.sgpr or 0 for r in ok)} sgpr"
        agpr = max(r.agpr or 0 for r in ok)
        return text + (f", {agpr} agpr" if agpr else "")
    known = [r.regs for r in ok if r.regs is not None]
    return str(max(known)) if known else "n/a"


def _spills(ok: list) -> str:
    """How many cases spill, and the worst: bytes (NVIDIA) or registers (AMD)."""
    if not ok or all(r.vgpr is None and r.spill_bytes is None for r in ok):
        return "n/a"
    spilled = [r for r in ok if r.spills]
    if not spilled:
        return "none"
    if any(r.vgpr is not None for r in spilled):
        worst = max(spilled, key=lambda r: r.spills)
        return (f"{_n_cases(spilled)}, max {worst.vgpr_spill} vgpr + {worst.sgpr_spill} sgpr "
                f"({worst.label})")
    worst = max(spilled, key=lambda r: r.spills)
    return f"{_n_cases(spilled)}, max {worst.spill_bytes} B ({worst.label})"


def _n_cases(items: list) -> str:
    return f"{len(items)} case" + ("s" if len(items) != 1 else "")


def _widths(ok: list) -> str:
    """The widest global load over all cases, and the narrowest case's widest load."""
    if not ok:
        return "-"
    lo, hi = min(r.widest_load for r in ok), max(r.widest_load for r in ok)
    return str(hi) if lo == hi else f"{hi} (min {lo})"


def _case_line(r) -> str:
    if isinstance(r, engine.AotFailure):
        return f"FAIL {r}"
    if r.vgpr is not None:
        regs = f"vgpr={r.vgpr} sgpr={r.sgpr} agpr={r.agpr} spill={r.vgpr_spill}/{r.sgpr_spill}"
    else:
        regs = f"regs={r.regs if r.regs is not None else 'n/a'} spill_bytes=" \
               f"{r.spill_bytes if r.spill_bytes is not None else 'n/a'}"
    return (f"{r.target:7} {r.kernel}[{r.label}] warps={r.num_warps} smem={r.shared} {regs} "
            f"load={r.widest_load}B {' '.join(r.loads)}")


if __name__ == "__main__":
    sys.exit(main())
