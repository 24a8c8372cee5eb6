"""The one benchmark harness every kernel plugs into (docs/design.md, "Performance methodology").

An op module lists :class:`Case` objects; :func:`run_cases` builds and times each one in
turn and turns it into a :class:`Result`: milliseconds per call, GB/s (the fewest bytes the op
must move over the time) and the fraction of the copy bandwidth measured by
:func:`measure_ceilings` on the same device in the same run; TFLOP/s and the fraction of the
matmul rate where the case counts FLOPs.

On a GPU each case gets two times: ``ms``, the device time per call, the sum of the kernel
durations the profiler records with L2 flushed before each call (Python and launch overhead
stay out of the kernel's figure; CUDA events where the profiler cannot run, marked in
``timing``), and ``host_ms``, the host time per call with calls queued back to back in eager
mode (what a training loop pays without CUDA graphs). Where ``host_ms`` exceeds ``ms``, the
eager op is host-bound.

Timing counts only on a GPU. On the CPU the same code runs, with small shapes, so the
harness itself is tested; those figures are labelled CPU figures wherever they are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from eurocore.utils.files import check_writable_dir, check_writable_file, write_json_atomically

# What a case builds: fresh inputs, then the zero-argument callable that is timed.
Setup = Callable[[], Callable[[], object]]

SCHEMA_VERSION = 3  # 2: host_ms and timing per result; 3: the run's status

# Ceiling sizes. GPU: a 1 GiB copy is far past any L2, and 8192³ saturates the tensor cores.
# CPU: sizes that finish in well under a second on two cores.
_GPU_COPY_BYTES = 1 << 30
_CPU_COPY_BYTES = 64 << 20
_GPU_MATMUL = (8192, 8192, 8192, torch.bfloat16)
_CPU_MATMUL = (1024, 1024, 1024, torch.float32)


@dataclass(frozen=True)
class Case:
    """One timed callable: an implementation of an op's variant at one shape.

    Attributes:
        op: the op's name, e.g. "rms_norm".
        variant: what is timed, e.g. "fwd", "bwd" (the backward alone), "fwd+bwd".
        shape: the sizes that define the case, e.g. ``{"tokens": 4096, "hidden": 8192}``.
        dtype: the dtype the inputs really have, e.g. "bfloat16".
        impl: the implementation, e.g. "eurocore/triton", "torch eager", "torch.compile".
        setup: builds fresh random inputs and returns the zero-argument callable to time.
            Inputs are built per case, right before timing and freed after, rather than
            held by every case at once (the GPU grid would need tens of GiB up front).
            None when the case is skipped.
        bytes: the fewest bytes the op must move: each input read once, each output
            written once.
        flops: floating-point operations per call, or None where bandwidth is the measure.
        note: anything a reader of the results must know (e.g. a substituted dtype).
        skip: why the case is not run (implementation not installed, needs a GPU, ...);
            None for a case to run.
    """

    op: str
    variant: str
    shape: dict[str, int]
    dtype: str
    impl: str
    setup: Setup | None = field(default=None, repr=False, compare=False)
    bytes: int = 0
    flops: int | None = None
    note: str = ""
    skip: str | None = None

    @classmethod
    def skipped(cls, op: str, impl: str, reason: str, *, variant: str = "*",
                shape: dict[str, int] | None = None, dtype: str = "") -> Case:
        """A case that is listed with the reason it is not run."""
        return cls(op=op, variant=variant, shape=shape or {}, dtype=dtype, impl=impl,
                   skip=reason)


@dataclass(frozen=True)
class Result:
    """One measured case: the case's description plus its timing and ceiling fractions.

    ``gbps = bytes / (ms · 1e-3) / 1e9``; ``copy_fraction = gbps / ceilings["copy_gbps"]``;
    likewise ``tflops`` and ``matmul_fraction`` when the case counts FLOPs.
    """

    op: str
    variant: str
    shape: dict[str, int]
    dtype: str
    impl: str
    device: str
    bytes: int
    flops: int | None
    note: str
    ms: float
    gbps: float
    copy_fraction: float
    tflops: float | None = None
    matmul_fraction: float | None = None
    host_ms: float | None = None
    timing: str = ""

    @classmethod
    def from_case(cls, case: Case, ms: float, device: torch.device | str,
                  ceilings: dict[str, Any], *, host_ms: float | None = None,
                  timing: str = "") -> Result:
        """The result of ``case`` taking ``ms`` milliseconds (median) on ``device``."""
        gbps = case.bytes / ms / 1e6  # bytes per ms / 1e6 = GB/s
        tflops = case.flops / ms / 1e9 if case.flops else None
        return cls(
            op=case.op, variant=case.variant, shape=dict(case.shape), dtype=case.dtype,
            impl=case.impl, device=torch.device(device).type, bytes=case.bytes,
            flops=case.flops, note=case.note, ms=ms, gbps=gbps,
            copy_fraction=gbps / ceilings["copy_gbps"],
            tflops=tflops,
            matmul_fraction=tflops / ceilings["matmul_tflops"] if tflops is not None else None,
            host_ms=host_ms, timing=timing,
        )


# Skipped.status of a case not started because the run's deadline had passed.
NOT_RUN = "not run"


@dataclass(frozen=True)
class Skipped:
    """A case that was not measured: skipped by design ("skipped"), raised ("failed") or
    not started because the run's deadline had passed (:data:`NOT_RUN`)."""

    op: str
    variant: str
    shape: dict[str, int]
    impl: str
    status: str
    reason: str


def eurocore_backends(op: str, device: torch.device,
                      implemented: tuple[str, ...]) -> list[tuple[str, str | None, str | None]]:
    """(label, backend, skip reason) of each eurocore row for ``op`` on ``device``.

    On a GPU: one row per kernel backend of the op ("eurocore/triton", "eurocore/cuda"),
    each with its reason where it cannot run (not built, not installed). On the CPU: the
    backend eurocore's own rule picks (``EUROCORE_BACKEND``, else torch), so the label names
    what actually runs; skipped if that is Triton's interpreter or the C++ emulator, too slow
    to mean anything. backend is None exactly when the row is skipped.
    """
    from eurocore.ops.backends import backend_status, resolve_backend

    if device.type == "cuda":
        rows = []
        for name in implemented:
            if name == "torch":
                continue
            status = backend_status(name)
            rows.append((f"eurocore/{name}", name if status.available else None,
                         None if status.available else status.reason))
        return rows
    try:
        backend = resolve_backend(op, device, None, implemented)
    except Exception as err:  # a bad EUROCORE_BACKEND: say so instead of aborting the run
        return [("eurocore", None, f"{type(err).__name__}: {err}")]
    label = f"eurocore/{backend}"
    if backend != "torch":
        return [(label, None, "the Triton interpreter and the C++ emulator are not benchmarked "
                              "(CPU: too slow to mean anything)")]
    return [(label, backend, None)]


# A zero-argument callable returning an implementation to time (the compiled one compiles
# per case); what a third-party loader returns: (its maker, or None and why it cannot run).
Maker = Callable[[], Any]
Loader = Callable[[], tuple[Maker | None, str | None]]


def implementations(op: str, label_op: str, device: torch.device,
                    implemented: tuple[str, ...], *, eurocore: Callable[[str], Maker],
                    eager: Maker, compiled: Maker, third_party: Sequence[tuple[str, Loader]],
                    quick: bool, dtype_name: str) -> tuple[list[tuple[str, Maker]], list[Case]]:
    """The implementations every kernel benchmark times, alike for each op, and the cases
    skipped (with why): eurocore's rows (:func:`eurocore_backends` of ``op``, made by
    ``eurocore(backend)``), torch eager, torch.compile (not in a quick CPU run: compiling
    takes longer than the run) and ``third_party`` (GPU-only: name, loader). Skipped cases
    are named ``label_op``."""
    impls: list[tuple[str, Maker]] = []
    skipped: list[Case] = []
    for label, backend, reason in eurocore_backends(op, device, implemented):
        if backend is None:
            skipped.append(Case.skipped(label_op, label, reason or "unavailable",
                                        dtype=dtype_name))
        else:
            impls.append((label, eurocore(backend)))
    impls.append(("torch eager", eager))
    gpu = _is_gpu(device)
    if gpu or not quick:
        impls.append(("torch.compile", compiled))
    else:
        skipped.append(Case.skipped(label_op, "torch.compile", "skipped with --quick on the CPU "
                                    "(compiling takes longer than the whole quick run)",
                                    dtype=dtype_name))
    for name, load in third_party:
        if not gpu:
            skipped.append(Case.skipped(label_op, name, "GPU-only implementation",
                                        dtype=dtype_name))
            continue
        make, reason = load()
        if make is None:
            skipped.append(Case.skipped(label_op, name, reason or "unavailable",
                                        dtype=dtype_name))
        else:
            impls.append((name, make))
    return impls, skipped


def constant(value: Any) -> Maker:
    """A maker of ``value`` itself (an implementation that needs no per-case making)."""
    return lambda: value


def constant_loader(load: Callable[[], tuple[Any | None, str | None]]) -> Loader:
    """``load`` (returning an implementation or None, and why) as a :data:`Loader`."""
    def loader() -> tuple[Maker | None, str | None]:
        value, reason = load()
        return (None if value is None else constant(value)), reason
    return loader


def _is_gpu(device: torch.device) -> bool:
    # ROCm builds of torch expose AMD GPUs as "cuda" devices too.
    return device.type == "cuda"


def _synchronize(device: torch.device) -> None:
    if _is_gpu(device):
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device | str, *,
                  budget_s: float = 0.2) -> float:
    """The median time of one call of ``fn`` in milliseconds, with CUDA events on a GPU.

    On a GPU: ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repetitions, L2 flushed
    between calls, CUDA events; host overhead counts where the host is the slower side). On
    the CPU: a warm-up of about a quarter of ``budget_s``, then single calls timed with
    ``time.perf_counter`` for about ``budget_s`` (5 to 1000 of them), and their median.
    """
    device = torch.device(device)
    if _is_gpu(device):
        from triton.testing import do_bench

        try:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        except TypeError:  # a Triton without return_mode: the 0.5 quantile is the median
            ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
        return float(ms[0] if isinstance(ms, (list, tuple)) else ms)

    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < budget_s / 4:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    repeats = min(1000, max(5, int(budget_s / max(per_call, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# Larger than any GPU's L2 (H100 50 MB, H200 60 MB, MI300X 256 MB of Infinity Cache):
# zeroing it between calls leaves no input in cache, as triton's do_bench does.
FLUSH_BYTES = 512 * 1024 * 1024


def time_device(fn: Callable[[], object], device: torch.device | str,
                calls: int = 20) -> tuple[float, str]:
    """(milliseconds per call, how it was timed): the device's own time for ``fn``.

    On a GPU: the durations of the kernels (and device copies) that ``calls`` calls launch,
    read by the profiler (CUPTI) and averaged per call, so gaps where the device waits for
    the host stay out. The L2 cache is flushed before each call and the flushes' own time,
    profiled alone, subtracted. Where the profiler cannot run: :func:`time_callable`'s
    CUDA-event time (host gaps included). On the CPU: :func:`time_callable`.
    """
    device = torch.device(device)
    if not _is_gpu(device):
        return time_callable(fn, device), "perf_counter"
    try:
        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
        fn()
        flush_us = _profiled_device_us(flush.zero_, device, calls)

        def flushed_call() -> None:
            flush.zero_()
            fn()

        total_us = _profiled_device_us(flushed_call, device, calls)
    except Exception:  # no CUPTI (some containers): events, host gaps included
        return time_callable(fn, device), "cuda events"
    if total_us - flush_us <= 0:
        return time_callable(fn, device), "cuda events"
    return (total_us - flush_us) / calls / 1e3, "kernel sum"


def _profiled_device_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Microseconds of device work (kernels, copies, fills) that ``calls`` calls launch."""
    from torch.profiler import ProfilerActivity, profile

    _synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _synchronize(device)
    return sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)


def case_dtype(device: torch.device) -> tuple[torch.dtype, str, str]:
    """(dtype, its name, the cases' note) of the kernel benchmarks on ``device``: bf16 on a
    GPU; float32 on the CPU, whose bf16 arithmetic says nothing of a GPU's."""
    if device.type == "cuda":
        return torch.bfloat16, "bfloat16", ""
    return (torch.float32, "float32",
            "CPU: float32, as bf16 on the CPU is not representative")


def check_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any measuring: ``parser.error`` naming ``--json`` or ``--out`` when the results
    JSON could not be written there (nothing to check with ``--no-json``). The benchmark
    commands' ``--json PATH`` / ``--out DIR`` / ``--no-json`` options, checked alike."""
    if getattr(args, "no_json", False):
        return
    try:
        if args.json:
            check_writable_file("--json", args.json)
        else:
            check_writable_dir("--out", args.out)
    except ValueError as err:
        parser.error(str(err))


def free_port() -> int:
    """A TCP port free on this host now: the rendezvous of a benchmark's spawned ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_time(fn: Callable[[], object], device: torch.device | str, calls: int = 50) -> float:
    """Host milliseconds per call of ``fn`` with ``calls`` calls queued back to back, one
    synchronisation after them: what an eager loop pays on the host per call."""
    device = torch.device(device)
    fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _synchronize(device)
    return elapsed / calls * 1e3


def measure_ceilings(device: torch.device | str) -> dict[str, Any]:
    """The copy bandwidth and dense matmul rate of ``device``, measured now.

    Copy: ``dst.copy_(src)`` of 1 GiB on a GPU (64 MiB on the CPU), counting the bytes read
    plus the bytes written. Matmul: bf16 8192³ on a GPU; on the CPU fp32 1024³ (CPU bf16
    matmul is not what a GPU ceiling means), which the dict says. Inputs are random normal.

    Returns:
        ``{"copy_gbps", "copy_bytes_moved" (read + written), "copy_ms", "matmul_tflops",
        "matmul_shape" (m, n, k), "matmul_dtype", "matmul_ms", "note"}``.
    """
    device = torch.device(device)
    gpu = _is_gpu(device)
    copy_bytes = _GPU_COPY_BYTES if gpu else _CPU_COPY_BYTES
    copy_ms = _copy_ms(copy_bytes, device)
    m, n, k, mm_dtype = _GPU_MATMUL if gpu else _CPU_MATMUL
    matmul_ms = _matmul_ms(m, n, k, mm_dtype, device)
    _free(device)

    note = ("GPU: copy of 1 GiB (read + write counted), bf16 matmul" if gpu else
            "CPU figures: copy of 64 MiB (read + write counted) and an fp32 1024^3 matmul; "
            "not GPU ceilings")
    return {
        "copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
        "copy_bytes_moved": 2 * copy_bytes,
        "copy_ms": copy_ms,
        "matmul_tflops": 2 * m * n * k / matmul_ms / 1e9,
        "matmul_shape": [m, n, k],
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
        "matmul_ms": matmul_ms,
        "note": note,
    }


def _copy_ms(nbytes: int, device: torch.device) -> float:
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return time_callable(lambda: dst.copy_(src), device)


def _matmul_ms(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    c = torch.empty(m, n, dtype=dtype, device=device)
    return time_callable(lambda: torch.mm(a, b, out=c), device)


def _free(device: torch.device) -> None:
    gc.collect()
    if _is_gpu(device):
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def run_cases(
    cases: Iterable[Case],
    device: torch.device | str,
    ceilings: dict[str, Any],
    *,
    progress: Callable[[str], None] | None = None,
    deadline: float | None = None,
    on_case: Callable[[Result | Skipped], None] | None = None,
) -> tuple[list[Result], list[Skipped]]:
    """Builds and times each case in turn, freeing its inputs before the next.

    A case whose setup or first call raises is reported as failed with the error's first
    line, and the run goes on: one broken implementation does not hide the others.

    Args:
        progress: receives one line per case before it runs: its position, the estimated
            time left (the mean time of the cases so far, times the cases left) and what
            it is.
        deadline: a ``time.monotonic()`` instant; no case starts after it, and each one
            left is reported with status :data:`NOT_RUN` (a case already running finishes).
        on_case: receives each case's Result or Skipped as soon as it is known, so that a
            caller can write its results down before the next case (a run killed midway
            keeps what it measured).

    Returns:
        (results, skipped) in the order of ``cases``.
    """
    device = torch.device(device)
    cases = list(cases)
    runnable = sum(case.skip is None and case.setup is not None for case in cases)
    results: list[Result] = []
    skipped: list[Skipped] = []
    started, done = time.monotonic(), 0

    def report(item: Result | Skipped) -> None:
        (results if isinstance(item, Result) else skipped).append(item)
        if on_case is not None:
            on_case(item)

    for case in cases:
        if case.skip is not None or case.setup is None:
            report(Skipped(case.op, case.variant, dict(case.shape), case.impl, "skipped",
                           case.skip or "no setup"))
            continue
        if deadline is not None and time.monotonic() > deadline:
            report(Skipped(case.op, case.variant, dict(case.shape), case.impl, NOT_RUN,
                           "not started: the run's deadline had passed"))
            continue
        if progress is not None:
            eta = ("" if done == 0 else
                   f", ETA {(time.monotonic() - started) / done * (runnable - done):.0f} s")
            progress(f"[{done + 1}/{runnable}{eta}] {case.op} {case.variant} "
                     f"{_format_shape(case.shape)} {case.impl}")
        fn = None
        try:
            fn = case.setup()
            fn()  # the first call compiles (Triton, torch.compile) outside the timing
            _synchronize(device)
            ms, timing = time_device(fn, device)
            host_ms = host_time(fn, device) if _is_gpu(device) else None
        except Exception as err:  # any implementation's failure is reported, not fatal
            outcome: Result | Skipped = Skipped(case.op, case.variant, dict(case.shape),
                                                case.impl, "failed", _first_line(err))
        else:
            outcome = Result.from_case(case, ms, device, ceilings, host_ms=host_ms,
                                       timing=timing)
        finally:
            del fn
            _free(device)
        done += 1
        report(outcome)
    return results, skipped


def process_age_s() -> float:
    """Seconds since this process started (its interpreter's start-up and imports
    included), from /proc on Linux; 0.0 where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # the fields after the command's closing parenthesis; starttime is the 22nd field
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def deadline_after(seconds: float | None) -> float | None:
    """The ``time.monotonic()`` instant ``seconds`` after this process started (None for
    None): a command's ``--deadline``, which counts Python's start-up and imports too, so
    that a caller's time limit on the whole command is what it measures."""
    if seconds is None:
        return None
    return time.monotonic() - process_age_s() + seconds


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _driver_version() -> str | None:
    """The NVIDIA driver version via nvidia-smi, or None (no nvidia-smi, AMD, any failure)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def _commit() -> str | None:
    """The git commit of this source tree (with ``+dirty`` when it has uncommitted changes),
    or None outside a git checkout: a result compared before and after a change must say
    which code produced it."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=source, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the results were measured on and with.

    Returns:
        device name (the GPU's, else the CPU model), ``is_cpu``, GPU architecture, the torch,
        Triton and eurocore versions, the CUDA or HIP runtime torch was built with, the NVIDIA
        driver version where nvidia-smi answers, CPU threads, the git commit, the UTC date
        and time, the hostname and the command line.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:  # not installed, or a broken install
        triton_version = None
    try:
        from eurocore import __version__ as eurocore_version
    except ImportError:
        eurocore_version = None

    env: dict[str, Any] = {"device": str(device), "is_cpu": not _is_gpu(device)}
    if _is_gpu(device):
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["gpu_arch"] = (getattr(props, "gcnArchName", None) if torch.version.hip
                           else f"sm_{props.major}{props.minor}")
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _driver_version()
    else:
        env["device_name"] = _cpu_model()
        env["cpu_threads"] = torch.get_num_threads()
        env["driver"] = None
    now = dt.datetime.now(dt.timezone.utc)
    env.update({
        "torch": torch.__version__,
        "triton": triton_version,
        "eurocore": eurocore_version,
        "commit": _commit(),
        "cuda_runtime": torch.version.cuda,
        "hip_runtime": torch.version.hip,
        "python": platform.python_version(),
        "date": now.date().isoformat(),
        "time_utc": now.isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    })
    return env


def _format_shape(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items()) or "-"


def _cpu_banner() -> str:
    return ("CPU FIGURES - measured on the CPU, NOT GPU performance: they test the harness, "
            "not the kernels")


def format_environment(env: dict[str, Any]) -> str:
    """The environment as a few readable lines."""
    lines = [f"device:   {env['device_name']} ({env['device']})"]
    if env["is_cpu"]:
        lines[0] += f", {env.get('cpu_threads')} threads  <- {_cpu_banner()}"
    else:
        lines[0] += f", {env.get('gpu_arch')}, {env.get('gpu_memory_gib')} GiB"
    runtime = (f"HIP {env['hip_runtime']}" if env.get("hip_runtime")
               else f"CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else "CPU build")
    lines.append(f"software: torch {env['torch']} ({runtime}), triton {env['triton']}, "
                 f"eurocore {env['eurocore']}, python {env['python']}"
                 + (f", driver {env['driver']}" if env.get("driver") else ""))
    lines.append(f"run:      {env['time_utc']} on {env['hostname']}: {env['command']}")
    return "\n".join(lines)


def format_ceilings(ceilings: dict[str, Any]) -> str:
    """The measured ceilings as three readable lines."""
    m, n, k = ceilings["matmul_shape"]
    return (f"copy:     {ceilings['copy_gbps']:9.1f} GB/s  (dst.copy_(src), "
            f"{ceilings['copy_bytes_moved'] / 2**20:.0f} MiB read + written)\n"
            f"matmul:   {ceilings['matmul_tflops']:9.3f} TFLOP/s ({ceilings['matmul_dtype']} "
            f"{m}x{n}x{k})\n"
            f"          {ceilings['note']}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: Sequence[Result], skipped: Sequence[Skipped] = (), *,
                file: TextIO | None = None) -> None:
    """Prints results as a fixed-width table, then what was skipped or failed and why.

    The header says plainly when the figures are CPU figures.
    """
    file = file or sys.stdout
    on_cpu = any(r.device == "cpu" for r in results) or (
        not results and not torch.cuda.is_available())
    if on_cpu:
        print(f"*** {_cpu_banner()} ***", file=file)
    columns = ("op", "variant", "shape", "dtype", "impl", "ms", "host ms", "GB/s", "%copy",
               "TFLOP/s", "%matmul")
    rows = [(r.op, r.variant, _format_shape(r.shape), r.dtype, r.impl,
             f"{r.ms:.4f}" + ("*" if r.timing == "cuda events" else ""),
             _fmt(r.host_ms, ".4f"), f"{r.gbps:.1f}", f"{100 * r.copy_fraction:.1f}",
             _fmt(r.tflops, ".2f"),
             _fmt(None if r.matmul_fraction is None else 100 * r.matmul_fraction, ".1f"))
            for r in results]
    if not any(r.flops for r in results):  # bandwidth-bound ops only: no FLOP columns
        columns = columns[:-2]
        rows = [row[:-2] for row in rows]
    if not any(r.host_ms is not None for r in results):  # the CPU: host time is the time
        columns = columns[:6] + columns[7:]
        rows = [row[:6] + row[7:] for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    numeric_from = columns.index("ms")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if i >= numeric_from else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths, strict=True)))

    print(line(columns), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    previous = None
    for r, row in zip(results, rows, strict=True):
        if previous is not None and (r.op, r.variant) != previous:
            print(file=file)  # a blank line between variants keeps the table scannable
        previous = (r.op, r.variant)
        print(line(row), file=file)
    if any(r.timing == "kernel sum" for r in results):
        print("ms: device time per call (kernel durations from the profiler); host ms: host "
              "time per call, eager, calls queued back to back", file=file)
    if any(r.timing == "cuda events" for r in results):
        print("*: timed with CUDA events (profiler unavailable): host overhead included "
              "where it dominates", file=file)
    notes = sorted({r.note for r in results if r.note})
    for note in notes:
        print(f"note: {note}", file=file)
    not_run = [s for s in skipped if s.status == NOT_RUN]
    for s in skipped:
        if s.status == NOT_RUN:  # one line for them all, below: the deadline is one reason
            continue
        where = " ".join(x for x in (s.variant if s.variant != "*" else "",
                                     _format_shape(s.shape) if s.shape else "") if x)
        print(f"{s.status}: {s.op} {s.impl}{' ' + where if where else ''}: {s.reason}",
              file=file)
    if not_run:
        ops = ", ".join(dict.fromkeys(s.op for s in not_run))
        print(f"{NOT_RUN}: {len(not_run)} case(s) of {ops}: the run's deadline had passed",
              file=file)


class StageLog:
    """Progress lines prefixed with the seconds since the benchmark started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Says when ``name`` starts and how long it took."""
        self(f"{name} ...")
        started = time.perf_counter()
        yield
        self(f"{name}: done in {time.perf_counter() - started:.2f} s")


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory so far of this process and of its largest finished child
    (a worker process), MiB."""
    import resource

    return {who: round(resource.getrusage(which).ru_maxrss / 1024, 1) for who, which in
            (("self", resource.RUSAGE_SELF), ("largest_child", resource.RUSAGE_CHILDREN))}


def device_slug(name: str) -> str:
    """A file-name form of a device name: lowercase, alphanumerics and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def result_path(env: dict[str, Any], out_dir: str | os.PathLike[str],
                benchmark: str | None = None) -> Path:
    """``<out_dir>/<YYYY-MM-DD>-<device-slug>[-<benchmark>].json``: CPU runs get a ``cpu-``
    prefix on the slug when the CPU's name lacks one, so they are never mistaken for GPU
    results."""
    slug = device_slug(env["device_name"])
    if env.get("is_cpu") and "cpu" not in slug.split("-"):
        slug = f"cpu-{slug}"
    return Path(out_dir) / f"{env['date']}-{slug}{'-' + benchmark if benchmark else ''}.json"


def write_json(results: Sequence[Result], ceilings: dict[str, Any], env: dict[str, Any],
               out_dir: str | os.PathLike[str], skipped: Sequence[Skipped] = (), *,
               path: str | os.PathLike[str] | None = None, status: str = "complete") -> Path:
    """Writes ``<out_dir>/<YYYY-MM-DD>-<device-slug>.json`` (or ``path``, when given)
    atomically and returns its path.

    The file holds ``{"schema", "status", "environment", "ceilings", "results",
    "skipped"}``; ``status`` says how far the run got: "running" (written after each case:
    the cases so far), "complete", or "deadline" (stopped at its deadline: the cases not
    run are in ``skipped`` with status "not run"). It is written to a temporary file in the
    target's folder and renamed over the target, so a reader never sees half a file. CPU
    runs get a ``cpu-`` prefix on the slug when the CPU's name lacks one, so they are never
    mistaken for GPU results.
    """
    path = Path(path) if path is not None else result_path(env, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": SCHEMA_VERSION,
        "status": status,
        "environment": env,
        "ceilings": ceilings,
        "results": [dataclasses.asdict(r) for r in results],
        "skipped": [dataclasses.asdict(s) for s in skipped],
    }
    return write_json_atomically(payload, path)
