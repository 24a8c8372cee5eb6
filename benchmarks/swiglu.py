"""SwiGLU benchmark cases: eurocore against torch eager, torch.compile and Liger.

Variants: "fwd" (inputs without grad: the forward alone), "bwd" (the backward alone: the
graph is built once, then ``torch.autograd.grad(..., retain_graph=True)`` is timed) and
"fwd+bwd". gate and up are (tokens, intermediate) of one dtype; the baseline is the eager
``F.silu(gate) * up`` of the Llama MLP.

Fewest bytes, with e the element size and N x n each input:
    fwd      read gate and up, write y                        3·N·n·e
    bwd      read dy, gate and up, write dgate and dup        5·N·n·e
    fwd+bwd  the sum of the two
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import harness
from .harness import Case

OP = "swiglu"
VARIANTS = ("fwd", "bwd", "fwd+bwd")

# GPU grid: token counts per micro-batch x the intermediate sizes of Llama-2-7B (11008),
# EuroLLM-9B (12288) and Llama-3-8B (14336).
GPU_TOKENS = (4096, 16384)
GPU_INTERMEDIATE = (11008, 12288, 14336)
# --quick on a GPU: a corner of the same grid (tiny shapes there would time launch latency).
GPU_QUICK_TOKENS = (16384,)
GPU_QUICK_INTERMEDIATE = (14336,)
# The CPU only checks the harness end to end: small shapes that finish in seconds.
CPU_TOKENS = (256, 1024)
CPU_INTERMEDIATE = (1024, 4096)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fwd_bytes(tokens: int, intermediate: int, element_size: int) -> int:
    """Reads gate and up, writes y."""
    return 3 * tokens * intermediate * element_size


def bwd_bytes(tokens: int, intermediate: int, element_size: int) -> int:
    """Reads dy, gate and up (the output is not saved), writes dgate and dup."""
    return 5 * tokens * intermediate * element_size


def make_inputs(tokens: int, intermediate: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random normal (gate, up), each (tokens, intermediate)."""
    return (torch.randn(tokens, intermediate, dtype=dtype, device=device),
            torch.randn(tokens, intermediate, dtype=dtype, device=device))


def _setup(make_forward: Callable[[], Forward], variant: str, tokens: int, intermediate: int,
           dtype: torch.dtype, device: torch.device) -> Callable[[], Callable[[], object]]:
    """The case's setup: the implementation, fresh random normal inputs, then the callable
    that runs ``variant``."""

    def setup() -> Callable[[], object]:
        forward = make_forward()
        gate, up = make_inputs(tokens, intermediate, dtype, device)
        if variant == "fwd":
            return lambda: forward(gate, up)
        dy = torch.randn(tokens, intermediate, dtype=dtype, device=device)
        gate.requires_grad_(True)
        up.requires_grad_(True)
        if variant == "bwd":
            y = forward(gate, up)
            return lambda: torch.autograd.grad(y, (gate, up), grad_outputs=dy,
                                               retain_graph=True)
        if variant == "fwd+bwd":
            return lambda: torch.autograd.grad(forward(gate, up), (gate, up), grad_outputs=dy)
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    return setup


def _eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _eurocore(backend: str) -> Forward:
    """eurocore's SwiGLU on one backend, chosen explicitly."""
    from eurocore.ops import swiglu

    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up, backend=backend)

    return forward


def _compiled() -> Forward:
    """A fresh torch.compile'd ``F.silu(gate) * up``, made when its case runs: each case
    resets Dynamo and compiles once for its own shape (see benchmarks/rms_norm.py)."""
    torch.compiler.reset()
    return torch.compile(_eager, dynamic=False)


def _liger() -> tuple[Forward | None, str | None]:
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as err:  # not installed, or installed against another torch/triton
        return None, f"liger_kernel not importable ({type(err).__name__}: {err})"

    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # Liger's backward recomputes from gate and up and writes the gradients over them
        # (in place): the timed bytes are the same, the values of repeated calls are not.
        return LigerSiLUMulFunction.apply(gate, up)

    return forward, None


def cases(device: torch.device | str, quick: bool) -> list[Case]:
    """The SwiGLU cases for ``device``: every implementation, shape and variant.

    On a GPU: bf16, tokens {4096, 16384} x intermediate {11008, 12288, 14336} (quick:
    16384 x 14336). On the CPU: float32, tokens {256, 1024} x intermediate {1024, 4096}, no
    Triton-based implementation (no interpreter runs) and torch.compile only without
    ``quick``.

    Returns:
        Cases to run, plus skipped cases (``Case.skip`` set) naming what is left out and why.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype, dtype_name, note = harness.case_dtype(device)
    if gpu:
        tokens_list, sizes = ((GPU_QUICK_TOKENS, GPU_QUICK_INTERMEDIATE) if quick
                              else (GPU_TOKENS, GPU_INTERMEDIATE))
    else:
        tokens_list, sizes = CPU_TOKENS, CPU_INTERMEDIATE

    from eurocore.ops.activation import IMPLEMENTED

    impls, out = harness.implementations(
        OP, OP, device, IMPLEMENTED, eurocore=lambda backend: harness.constant(_eurocore(backend)),
        eager=harness.constant(_eager), compiled=_compiled,
        third_party=[("liger", harness.constant_loader(_liger))], quick=quick,
        dtype_name=dtype_name)

    element_size = torch.empty((), dtype=dtype).element_size()
    for variant in VARIANTS:
        for tokens in tokens_list:
            for n in sizes:
                fwd = fwd_bytes(tokens, n, element_size)
                bwd = bwd_bytes(tokens, n, element_size)
                nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[variant]
                for name, make_forward in impls:
                    out.append(Case(
                        op=OP, variant=variant, shape={"tokens": tokens, "intermediate": n},
                        dtype=dtype_name, impl=name,
                        setup=_setup(make_forward, variant, tokens, n, dtype, device),
                        bytes=nbytes, note=note,
                    ))
    return out

