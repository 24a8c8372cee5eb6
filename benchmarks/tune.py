"""Launch-configuration sweeps on the GPU at hand: ``python -m eurocore.benchmarks tune``.

    python -m eurocore.benchmarks tune [--ops attention rms_norm rotary] [--out DIR]
                                       [--json PATH] [--deadline SECONDS]

For each op, every candidate configuration is patched into the kernel module's pinned
tables, run through the public op (so what is timed is what users call), checked against
the output of the configuration in the tables now (relative L2 error, bf16 tolerance) and
timed with the harness. Each row also gives the host time per call (calls queued without
synchronising): when it exceeds the device time, the op is bound by Python, not the GPU.
The pinned tables stay the source of truth: a winner found here is copied into them by
hand, with the device and the measured gain in the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from eurocore.utils.files import check_writable_dir, check_writable_file, write_json_atomically

from . import harness

Run = Callable[[], tuple[torch.Tensor, ...]]
Row = dict[str, Any]


def rel_err(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """The largest ‖a - b‖ / ‖b‖ over the pairs."""
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
               for a, b in zip(out, ref, strict=True))


def sweep(op: str, label: str, make_run: Callable[[], Run], candidates: Sequence[Any],
          apply: Callable[[Any], contextlib.AbstractContextManager], device: torch.device,
          tol: float = 2e-2, deadline: float | None = None,
          sink: Callable[[Row], None] | None = None) -> list[Row]:
    """Times ``make_run()``'s callable under each candidate (``apply(candidate)`` patches it
    in); the first candidate must be the configuration pinned now, the reference output.
    No candidate starts after ``deadline`` (a ``time.monotonic()`` instant): each one left is
    a row with status ``harness.NOT_RUN``. ``sink`` gets every row as it ends."""
    rows = []
    reference = None
    for candidate in candidates:
        row: Row = {"op": op, "case": label, "config": repr(candidate)}
        if deadline is not None and time.monotonic() > deadline:
            row["status"] = harness.NOT_RUN
            rows.append(row)
            if sink is not None:
                sink(row)
            continue
        try:
            with apply(candidate):
                run = make_run()
                out = tuple(t.detach().clone() for t in run())
                if reference is None:
                    reference = out
                row["rel_err"] = rel_err(out, reference)
                row["ok"] = row["rel_err"] <= tol and all(bool(t.isfinite().all()) for t in out)
                row["ms"], row["timing"] = harness.time_device(run, device)
                row["host_ms"] = harness.host_time(run, device)
        except Exception as err:  # a configuration that fails to compile is a result too
            row["error"] = harness._first_line(err)
        rows.append(row)
        _print_row(row)
        if sink is not None:
            sink(row)
    return rows


def _print_row(row: Row) -> None:
    if "error" in row:
        print(f"{row['op']:10} {row['case']:34} {row['config']:28} ERROR {row['error'][:80]}")
        return
    print(f"{row['op']:10} {row['case']:34} {row['config']:28} {row['ms']:8.4f} ms  "
          f"host {row['host_ms']:7.4f} ms  err {row['rel_err']:.1e}"
          f"{'' if row['ok'] else '  WRONG'}", flush=True)


# --- attention: forward, dk/dv and dq tiles at head_dim 128 ----------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) beside the pinned one, which each sweep times first
# (its output is the reference). The kernels now mask only the blocks on the causal band and
# the ragged ends, which changes what each tile costs: the pinned tables predate that, and
# the sweep is how they get re-decided on a GPU.
ATTENTION_FWD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4),
                 (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)]
ATTENTION_DKDV = [(32, 64, 8, 1), (32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2),
                  (32, 128, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 3),
                  (16, 128, 4, 3), (32, 64, 4, 3)]
ATTENTION_DQ = [(32, 64, 8, 1), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2),
                (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 4, 2)]


def tune_attention(device: torch.device, shape: dict[str, Any], **sweep_options: Any
                   ) -> list[Row]:
    """Forward, dk/dv and dq candidates, non-causal and causal, at ``shape``; the
    ``sweep_options`` (deadline, sink) go to each :func:`sweep`."""
    return [row for causal in (False, True)
            for row in _tune_attention(device, shape, causal, **sweep_options)]


def pinned_first(pinned: tuple, candidates: Sequence[tuple]) -> list[tuple]:
    """The pinned configuration (the sweep's reference output), then the other candidates."""
    return [tuple(pinned), *(c for c in candidates if tuple(c) != tuple(pinned))]


def _tune_attention(device: torch.device, shape: dict[str, Any], causal: bool,
                    **sweep_options: Any) -> list[Row]:
    from eurocore.kernels import flash_attention as kernels
    from eurocore.ops import flash_attention

    vendor = kernels.vendor(device)
    head_dim = shape["head_dim"]
    bound = next(b for b in sorted(kernels.FWD_CONFIGS[vendor]) if head_dim <= b)
    label = (f"b{shape['batch']} s{shape['seq']} h{shape['heads']} d{head_dim}"
             f"{' causal' if causal else ''}")
    q, k, v = (torch.randn(shape["batch"], shape["seq"], shape["heads"], head_dim,
                           device=device, dtype=shape.get("dtype", torch.bfloat16))
               .requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)

    def forward() -> Run:
        return lambda: (flash_attention(q, k, v, causal=causal, backend="triton"),)

    def backward() -> Run:
        out = flash_attention(q, k, v, causal=causal, backend="triton")
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def bwd_apply(kernel: str) -> Callable[[Any], contextlib.AbstractContextManager]:
        return lambda c: mock.patch.dict(kernels.BWD_CONFIGS[vendor][bound], {kernel: c})

    fwd = pinned_first(kernels.FWD_CONFIGS[vendor][bound], ATTENTION_FWD)
    dkdv, dq = (pinned_first(kernels.BWD_CONFIGS[vendor][bound][kernel], candidates)
                for kernel, candidates in (("dkdv", ATTENTION_DKDV), ("dq", ATTENTION_DQ)))
    return (sweep("attn fwd", label, forward, fwd,
                  lambda c: mock.patch.dict(kernels.FWD_CONFIGS[vendor], {bound: c}), device,
                  **sweep_options)
            + sweep("attn dkdv", label, backward, dkdv, bwd_apply("dkdv"), device,
                    **sweep_options)
            + sweep("attn dq", label, backward, dq, bwd_apply("dq"), device, **sweep_options))


# --- RMSNorm: backward programs per multiprocessor and warps ---------------------------------

RMS_NORM_BWD = [(4, None), (1, None), (2, None), (8, None), (16, None), (4, 4), (8, 4),
                (2, 16), (4, 16), (8, 8)]  # (programs per SM, warps; None: as pinned)


def tune_rms_norm(device: torch.device, shape: dict[str, Any], **sweep_options: Any
                  ) -> list[Row]:
    """Backward grid sizes and warp counts for each hidden size in ``shape``."""
    return [row for hidden in shape["hidden"]
            for row in _tune_rms_norm(device, shape["tokens"], hidden, **sweep_options)]


def _tune_rms_norm(device: torch.device, tokens: int, hidden: int, **sweep_options: Any
                   ) -> list[Row]:
    from eurocore.kernels import rms_norm as kernels
    from eurocore.ops import rms_norm

    pinned_config = kernels.launch_config
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 1)
    label = f"tokens {tokens} hidden {hidden}"
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def backward() -> Run:
        out = rms_norm(x, w, backend="triton")
        return lambda: torch.autograd.grad(out, (x, w), grad, retain_graph=True)

    def forward() -> Run:
        return lambda: (rms_norm(x, w, backend="triton"),)

    @contextlib.contextmanager
    def apply(c: tuple[int, int | None]) -> Iterator[None]:
        per_sm, warps = c

        def config(n: int) -> dict:
            cfg = dict(pinned_config(n))
            if warps is not None:
                cfg["num_warps"] = warps
            return cfg

        with (mock.patch.object(kernels, "backward_programs",
                                lambda n, d: max(1, min(n, per_sm * sms))),
              mock.patch.object(kernels, "launch_config", config)):
            yield

    return (sweep("rms fwd", label, forward, [(4, None)], apply, device, **sweep_options)
            + sweep("rms bwd", label, backward, RMS_NORM_BWD, apply, device, **sweep_options))


# --- rotary: tile, warps and the program floor -----------------------------------------------

ROTARY = [(1024, 2, 1024), (1024, 4, 1024), (2048, 4, 1024), (2048, 8, 1024), (4096, 8, 1024),
          (1024, 2, 4096), (2048, 4, 4096), (512, 1, 1024), (4096, 4, 4096)]  # (TILE, warps, min)


def tune_rotary(device: torch.device, shape: dict[str, int], **sweep_options: Any
                ) -> list[Row]:
    """Tile, warp and program-floor candidates, forward and backward, at ``shape``."""
    from eurocore.kernels import rotary as kernels
    from eurocore.ops import apply_rotary, rope_cos_sin

    batch, seq = shape["batch"], shape["seq"]
    head_dim = shape["head_dim"]
    label = f"b{batch} s{seq} q{shape['q_heads']} k{shape['k_heads']} d{head_dim}"
    q = torch.randn(batch, seq, shape["q_heads"], head_dim, device=device,
                    dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, seq, shape["k_heads"], head_dim, device=device,
                    dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(seq, head_dim, theta=500000.0, device=device)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def forward() -> Run:
        return lambda: apply_rotary(q, k, cos, sin, backend="triton")

    def backward() -> Run:
        out_q, out_k = apply_rotary(q, k, cos, sin, backend="triton")
        return lambda: torch.autograd.grad((out_q, out_k), (q, k), (gq, gk), retain_graph=True)

    @contextlib.contextmanager
    def apply(c: tuple[int, int, int]) -> Iterator[None]:
        tile, warps, min_programs = c
        with (mock.patch.object(kernels, "TILE", tile),
              mock.patch.object(kernels, "NUM_WARPS", warps),
              mock.patch.object(kernels, "MIN_PROGRAMS", min_programs)):
            yield

    return (sweep("rope fwd", label, forward, ROTARY, apply, device, **sweep_options)
            + sweep("rope bwd", label, backward, ROTARY, apply, device, **sweep_options))


TUNERS = {
    "attention": (tune_attention, dict(batch=4, seq=4096, heads=16, head_dim=128)),
    "rms_norm": (tune_rms_norm, dict(tokens=16384, hidden=(2048, 4096, 8192))),
    "rotary": (tune_rotary, dict(batch=4, seq=4096, q_heads=32, k_heads=8, head_dim=128)),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sweeps; writes ``DIR/tune-<device>.json`` (or ``--json``) after every row.
    Needs a GPU."""
    parser = argparse.ArgumentParser(prog="python -m eurocore.benchmarks tune",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(TUNERS), choices=list(TUNERS))
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="the results file (default: DIR/tune-<device>.json)")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="start no configuration this long after the command started; "
                             "those left are listed as not run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA or ROCm GPU; torch sees none")
    try:
        if args.json is None:
            out = check_writable_dir("--out", args.out)
        else:
            check_writable_file("--json", args.json)
    except ValueError as err:
        parser.error(str(err))
    deadline = harness.deadline_after(args.deadline)
    torch.manual_seed(0)
    device = torch.device("cuda")
    env = harness.environment(device)
    print(harness.format_environment(env))
    path = Path(args.json) if args.json is not None else \
        out / f"tune-{harness.device_slug(env.get('device_name', 'gpu'))}.json"
    rows: list[Row] = []

    def save(row: Row | None = None, status: str = "running") -> None:
        if row is not None:
            rows.append(row)
        write_json_atomically({"environment": env, "status": status, "rows": rows}, path)

    for op in args.ops:
        tuner, shape = TUNERS[op]
        tuner(device, shape, deadline=deadline, sink=save)
    late = any(row.get("status") == harness.NOT_RUN for row in rows)
    save(status="deadline" if late else "complete")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
