"""Host time per eager call: ``python -m eurocore.benchmarks host``.

    python -m eurocore.benchmarks host [--ops rms_norm swiglu] [--calls 200] [--repeats 7]
                                       [--compile-backend inductor] [--out DIR] [--no-json]

For each op (rms_norm, apply_rotary, flash_attention, swiglu, and linear_cross_entropy when
``eurocore.ops`` has it), the forward ("fwd") and the forward with its backward ("fwd+bwd"),
it reports the host microseconds per eager call of:

    eurocore fast path   the public op as users call it (the eager fast path on)
    eurocore custom op   the same call through its torch.library custom op (fast path off)
    torch eager          torch's own op where it has one (F.rms_norm, SDPA, F.linear +
                         F.cross_entropy), else eurocore's torch reference (rotary, SwiGLU)
    torch.compile        torch.compile of that torch function

Inputs require grad in both variants, so the forward records autograd as in training. Each
figure is the smallest over ``--repeats`` rounds of ``--calls`` calls queued back to back
(harness.host_time: one synchronisation per round, none per call): the least the host pays,
which is what a drop-in user's step adds up.

On the CPU, every Triton kernel launch is replaced by a no-op (:func:`no_kernel_launch`), so
eurocore's figures are its Python and dispatch cost alone; torch eager and torch.compile
compute for real there, on tiny shapes. On a GPU every call is real (bf16); the figure is
host time as long as the GPU keeps up with the queue.

The goal (issue 17): eurocore's fast path at most 1.5x torch eager's call for the same op
on the same machine. The table gives that ratio; nothing here asserts it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eurocore.utils.files import write_json_atomically

from . import harness

SCHEMA_VERSION = 1
GOAL_RATIO = 1.5
VARIANTS = ("fwd", "fwd+bwd")
IMPLS = ("eurocore fast path", "eurocore custom op", "torch eager", "torch.compile")
DEFAULT_OUT = "benchmarks/results"

Fn = Callable[..., Any]


@dataclass(frozen=True)
class OpCase:
    """One op at one shape: fresh inputs and the eurocore and torch functions over them.

    Attributes:
        op: the op's name, e.g. "rms_norm".
        shape: the sizes that define the case.
        dtype: the inputs' floating dtype.
        inputs: builds the inputs; those that require grad are the backward's leaves.
        eurocore: the public eurocore op over the inputs.
        torch_eager: the torch function it is measured beside (also what torch.compile gets).
        torch_label: what ``torch_eager`` is, for the table's notes.
    """

    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    inputs: Callable[[], tuple[Any, ...]]
    eurocore: Fn
    torch_eager: Fn
    torch_label: str


@contextlib.contextmanager
def no_kernel_launch() -> Iterator[None]:
    """Within the block, every Triton kernel launch ``kernel[grid](...)`` returns at once:
    the launchers still derive their grids and read every argument, the kernel never runs.
    ``KernelInterface.__getitem__`` is where both compiled and interpreted Triton kernels
    take their grid, the one launch point of every launcher; only this benchmark (and its
    test) patch it, the library's hot path is untouched."""
    from unittest import mock

    from triton.runtime.jit import KernelInterface

    def launch(*args: Any, **kwargs: Any) -> None:
        return None

    with mock.patch.object(KernelInterface, "__getitem__", lambda self, grid: launch):
        yield


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def available_ops() -> list[str]:
    """The ops this eurocore has, in the report's order."""
    import eurocore.ops

    ops = ["rms_norm", "apply_rotary", "flash_attention", "swiglu"]
    if hasattr(eurocore.ops, "linear_cross_entropy"):  # added with the fused output layer
        ops.append("linear_cross_entropy")
    return ops


def op_case(op: str, device: torch.device) -> OpCase:
    """The case of ``op``: tiny shapes on the CPU (no kernel runs), small ones on a GPU (so
    the kernels finish before the host queues the next call)."""
    nnf = torch.nn.functional

    from eurocore import ops

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    # Auto picks Triton on a GPU, the torch reference on the CPU: there, name Triton.
    backend = None if gpu else "triton"

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    if op == "rms_norm":
        batch, seq, hidden = (1, 1024, 4096) if gpu else (2, 7, 33)

        def rms_norm_inputs() -> tuple[Any, ...]:
            return randn(batch, seq, hidden), randn(hidden)

        return OpCase(op, {"batch": batch, "seq": seq, "hidden": hidden}, dtype,
                      rms_norm_inputs,
                      lambda x, w: ops.rms_norm(x, w, 1e-5, backend=backend),
                      lambda x, w: nnf.rms_norm(x, (hidden,), w, 1e-5),
                      "torch.nn.functional.rms_norm")
    if op == "apply_rotary":
        batch, seq, heads, kv_heads, head_dim = (1, 1024, 32, 8, 128) if gpu else (1, 7, 2, 1, 16)
        cos, sin = ops.rope_cos_sin(seq, head_dim, device=device)

        def rotary_inputs() -> tuple[Any, ...]:
            return randn(batch, seq, heads, head_dim), randn(batch, seq, kv_heads, head_dim)

        return OpCase(op, {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads,
                           "head_dim": head_dim}, dtype, rotary_inputs,
                      lambda q, k: ops.apply_rotary(q, k, cos, sin, backend=backend),
                      lambda q, k: ops.apply_rotary_reference(q, k, cos, sin),
                      "eurocore.ops.apply_rotary_reference")
    if op == "flash_attention":
        batch, seq, heads, kv_heads, head_dim = (1, 256, 8, 2, 128) if gpu else (1, 7, 2, 1, 16)

        def attention_inputs() -> tuple[Any, ...]:
            return (randn(batch, seq, heads, head_dim), randn(batch, seq, kv_heads, head_dim),
                    randn(batch, seq, kv_heads, head_dim))

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # What a (batch, seq, heads, head_dim) user of torch writes: bhsd views in and out.
            out = nnf.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True,
                                                 enable_gqa=True)
            return out.transpose(1, 2)

        return OpCase(op, {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads,
                           "head_dim": head_dim}, dtype, attention_inputs,
                      lambda q, k, v: ops.flash_attention(q, k, v, causal=True, backend=backend),
                      sdpa, "torch.nn.functional.scaled_dot_product_attention")
    if op == "swiglu":
        batch, seq, ffn = (1, 1024, 14336) if gpu else (2, 7, 33)

        def swiglu_inputs() -> tuple[Any, ...]:
            return randn(batch, seq, ffn), randn(batch, seq, ffn)

        return OpCase(op, {"batch": batch, "seq": seq, "ffn": ffn}, dtype, swiglu_inputs,
                      lambda g, u: ops.swiglu(g, u, backend=backend), ops.swiglu_reference,
                      "eurocore.ops.swiglu_reference")
    if op == "linear_cross_entropy":
        tokens, hidden, vocab = (256, 1024, 8192) if gpu else (7, 16, 33)

        def lce_inputs() -> tuple[Any, ...]:
            labels = torch.randint(0, vocab, (tokens,), device=device)
            return randn(tokens, hidden), randn(vocab, hidden), labels

        def linear_then_cross_entropy(h: torch.Tensor, w: torch.Tensor,
                                      labels: torch.Tensor) -> torch.Tensor:
            return nnf.cross_entropy(nnf.linear(h, w).float(), labels)

        return OpCase(op, {"tokens": tokens, "hidden": hidden, "vocab": vocab}, dtype,
                      lce_inputs, ops.linear_cross_entropy, linear_then_cross_entropy,
                      "torch.nn.functional.linear + cross_entropy")
    raise ValueError(f"op: expected one of {', '.join(available_ops())}, got {op!r}")


def _differentiable(output: Any) -> list[torch.Tensor]:
    tensors = [output] if isinstance(output, torch.Tensor) else list(output)
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def make_call(fn: Fn, inputs: tuple[Any, ...], variant: str) -> Callable[[], object]:
    """The zero-argument callable timed for ``variant``: the forward alone, or the forward
    then ``torch.autograd.grad`` into the inputs that require grad (fixed random output
    gradients, made once here)."""
    if variant == "fwd":
        return lambda: fn(*inputs)
    if variant != "fwd+bwd":
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = [torch.randn_like(t) for t in _differentiable(fn(*inputs))]

    def forward_backward() -> object:
        return torch.autograd.grad(_differentiable(fn(*inputs)), leaves, grads)

    return forward_backward


def host_us(call: Callable[[], object], device: torch.device, calls: int, repeats: int) -> float:
    """The least host microseconds per call over ``repeats`` rounds of ``calls`` calls
    (:func:`harness.host_time`; a first call in each round stays out of the figure)."""
    return 1e3 * min(harness.host_time(call, device, calls) for _ in range(repeats))


def _has_custom_op(op: str) -> bool:
    """Whether ``op``'s module registers any :class:`eurocore.ops.dispatch.CustomOp`; if not,
    the op has one path and its two eurocore rows time the same code."""
    import eurocore.ops
    from eurocore.ops.dispatch import CustomOp

    module = sys.modules[getattr(eurocore.ops, op).__module__]
    return any(isinstance(value, CustomOp) for value in vars(module).values())


def _impl_context(impl: str) -> contextlib.AbstractContextManager:
    from eurocore.ops.dispatch import eager_fast_path

    if impl == "eurocore fast path":
        return eager_fast_path(True)
    if impl == "eurocore custom op":
        return eager_fast_path(False)
    return contextlib.nullcontext()


def measure(op: str, device: torch.device, *, calls: int, repeats: int,
            compile_backend: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results, skipped) for ``op``: every variant x implementation (module docstring).
    A failing implementation is listed as failed with its error's first line."""
    case = op_case(op, device)
    inputs = case.inputs()
    launch = "real" if device.type == "cuda" else "no-op (CPU: Python and dispatch only)"
    note = "" if _has_custom_op(op) else (
        "no torch.library custom op: both eurocore rows run the same code")
    fns: dict[str, Fn | None] = {"eurocore fast path": case.eurocore,
                                 "eurocore custom op": case.eurocore,
                                 "torch eager": case.torch_eager, "torch.compile": None}
    compile_error = None
    try:  # compiles lazily, at the first call (inside the measurement's try below)
        fns["torch.compile"] = torch.compile(case.torch_eager, backend=compile_backend)
    except Exception as err:  # an unknown backend name, a broken install
        compile_error = harness._first_line(err)
    results, skipped = [], []
    for variant in VARIANTS:
        for impl in IMPLS:
            common = {"op": op, "variant": variant, "impl": impl}
            fn = fns[impl]
            if fn is None:
                skipped.append({**common, "status": "failed", "reason": compile_error})
                continue
            try:
                with _impl_context(impl):
                    call = make_call(fn, inputs, variant)
                    micros = host_us(call, device, calls, repeats)
            except Exception as err:  # reported, not fatal: the other rows still mean much
                skipped.append({**common, "status": "failed",
                                "reason": harness._first_line(err)})
                continue
            results.append({**common, "host_us": micros, "shape": dict(case.shape),
                            "dtype": str(case.dtype).removeprefix("torch."),
                            "device": device.type, "kernel_launch": launch,
                            "torch_eager": case.torch_label, "calls": calls,
                            "repeats": repeats,
                            "note": note if impl.startswith("eurocore") else ""})
    _add_ratios(results)
    return results, skipped


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Each result's ratio to torch eager's figure for the same op and variant."""
    eager = {(r["op"], r["variant"]): r["host_us"] for r in results
             if r["impl"] == "torch eager"}
    for r in results:
        base = eager.get((r["op"], r["variant"]))
        r["ratio_to_torch_eager"] = r["host_us"] / base if base else None


def format_table(results: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]] = ()
                 ) -> str:
    """One line per op and variant: µs per call of each implementation, eurocore's ratios to
    torch eager, and whether the fast path meets the goal; then notes and failures."""
    columns = ("op", "variant", *(f"{impl} us" for impl in IMPLS), "fast/eager",
               "custom-op/eager", f"goal <={GOAL_RATIO}x")
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault((r["op"], r["variant"]), {})[r["impl"]] = r
    rows = []
    for (op, variant), impls in by_key.items():
        micros = [f"{impls[i]['host_us']:.1f}" if i in impls else "-" for i in IMPLS]
        ratios = [impls[i].get("ratio_to_torch_eager") if i in impls else None
                  for i in IMPLS[:2]]
        fast = ratios[0]
        goal = "-" if fast is None else ("met" if fast <= GOAL_RATIO else "NOT met")
        rows.append((op, variant, *micros,
                     *("-" if x is None else f"{x:.2f}x" for x in ratios), goal))
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [line(columns), "  ".join("-" * w for w in widths), *map(line, rows)]
    for label in sorted({(r["op"], r["torch_eager"]) for r in results}):
        lines.append(f"torch eager for {label[0]}: {label[1]}")
    for note in sorted({(r["op"], r["note"]) for r in results if r["note"]}):
        lines.append(f"note: {note[0]}: {note[1]}")
    launches = sorted({r["kernel_launch"] for r in results})
    if launches:
        lines.append(f"kernel launches: {', '.join(launches)}")
    for s in skipped:
        lines.append(f"{s['status']}: {s['op']} {s['variant']} {s['impl']}: {s['reason']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks host",
        description="Host time per eager call of each eurocore op (fast path and custom-op "
                    "path) beside torch eager and torch.compile; on the CPU with the kernel "
                    "launches replaced by no-ops.")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help="ops, space- or comma-separated (default: all)")
    parser.add_argument("--calls", type=int, default=200,
                        help="calls per timed round (default: 200)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="rounds per figure; the least is kept (default: 7)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the torch.compile rows "
                             "(default: inductor)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON goes (default: {DEFAULT_OUT})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the JSON to PATH instead of DIR/<date>-<device>-host.json")
    parser.add_argument("--no-json", action="store_true", help="print only; write no JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns 1 when a eurocore row failed, else 0 (whatever the
    figures: the goal is reported, not enforced)."""
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda") or (device.type == "cuda"
                                               and not torch.cuda.is_available()):
        parser.error(f"--device: expected cpu, or cuda with a visible GPU; got {args.device!r}")
    for arg, value in (("--calls", args.calls), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{arg}: expected an integer >= 1, got {value}")
    if device.type == "cpu":
        # Triton's kernels serve CPU tensors only through its interpreter, which must be on
        # before the first @triton.jit is defined (docs/design.md); the launches are no-ops.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    known = available_ops()
    ops = known if args.ops is None else [n for item in args.ops for n in item.split(",") if n]
    unknown = [name for name in ops if name not in known]
    if unknown:
        parser.error(f"--ops: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    harness.check_output(parser, args)

    torch.manual_seed(0)
    env = harness.environment(device)
    print(harness.format_environment(env))
    if device.type == "cpu":
        print("CPU: Triton kernel launches are no-ops, so eurocore's figures are Python and "
              "dispatch alone; torch eager and torch.compile compute (tiny shapes). Not GPU "
              "figures.")
    print(flush=True)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    path = Path(args.json) if args.json else harness.result_path(env, args.out, "host")
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(no_kernel_launch())
            # One intra-op thread: tiny shapes gain nothing from more, and on a loaded machine
            # the timing would catch OpenMP's barriers waiting for a busy core.
            stack.enter_context(_intra_op_threads(1))
        for op in ops:
            print(f"{op} ...", flush=True)
            op_results, op_skipped = measure(op, device, calls=args.calls,
                                             repeats=args.repeats,
                                             compile_backend=args.compile_backend)
            results += op_results
            skipped += op_skipped
            if not args.no_json:  # after each op: a run cut short keeps what it measured
                write_json_atomically({
                    "schema": SCHEMA_VERSION, "benchmark": "host", "environment": env,
                    "goal": {"impl": IMPLS[0], "max_ratio_to_torch_eager": GOAL_RATIO},
                    "compile_backend": args.compile_backend,
                    "intra_op_threads": torch.get_num_threads(), "results": results,
                    "skipped": skipped}, path)
    print()
    print(format_table(results, skipped))
    if not args.no_json:
        print(f"\nresults written to {path}")
    failed = [s for s in skipped if s["impl"].startswith("eurocore")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
