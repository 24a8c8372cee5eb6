"""RMSNorm benchmark cases: eurocore against torch eager, torch.compile, Liger and apex.

Variants: "fwd" (inputs without grad: the forward alone), "bwd" (the backward alone: the
graph is built once, then ``torch.autograd.grad(..., retain_graph=True)`` is timed) and
"fwd+bwd". x is (tokens, hidden), the weight (hidden,) of x's dtype, eps 1e-5 (Llama's).

Fewest bytes, with e the element size and N x n the input:
    fwd      read x and the weight, write y                      2·N·n·e + n·e
    bwd      read dy, x, the weight and rstd (fp32, one per row),
             write dx and dweight                                3·N·n·e + 2·n·e + 4·N
    fwd+bwd  the sum of the two
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import harness
from .harness import Case

OP = "rms_norm"
EPS = 1e-5
VARIANTS = ("fwd", "bwd", "fwd+bwd")

# GPU grid: Llama/EuroLLM token counts per micro-batch x hidden sizes up to 12288.
GPU_TOKENS = (4096, 16384, 65536)
GPU_HIDDEN = (2048, 4096, 8192, 12288)
# --quick on a GPU: a corner of the same grid (tiny shapes there would time launch latency).
GPU_QUICK_TOKENS = (16384,)
GPU_QUICK_HIDDEN = (4096, 8192)
# The CPU only checks the harness end to end: small shapes that finish in seconds.
CPU_TOKENS = (256, 1024)
CPU_HIDDEN = (1024, 4096)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fwd_bytes(tokens: int, hidden: int, element_size: int) -> int:
    """Reads x and the weight, writes y."""
    return 2 * tokens * hidden * element_size + hidden * element_size


def bwd_bytes(tokens: int, hidden: int, element_size: int) -> int:
    """Reads dy, x, the weight and rstd (fp32 per row), writes dx and dweight."""
    return 3 * tokens * hidden * element_size + 2 * hidden * element_size + 4 * tokens


def _setup(make_forward: Callable[[], Forward], variant: str, tokens: int, hidden: int,
           dtype: torch.dtype, device: torch.device) -> Callable[[], Callable[[], object]]:
    """The case's setup: the implementation, fresh random normal inputs, then the callable
    that runs ``variant``."""

    def setup() -> Callable[[], object]:
        forward = make_forward()
        x = torch.randn(tokens, hidden, dtype=dtype, device=device)
        w = torch.randn(hidden, dtype=dtype, device=device)
        if variant == "fwd":
            return lambda: forward(x, w)
        dy = torch.randn(tokens, hidden, dtype=dtype, device=device)
        x.requires_grad_(True)
        w.requires_grad_(True)
        if variant == "bwd":
            y = forward(x, w)
            return lambda: torch.autograd.grad(y, (x, w), grad_outputs=dy, retain_graph=True)
        if variant == "fwd+bwd":
            return lambda: torch.autograd.grad(forward(x, w), (x, w), grad_outputs=dy)
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    return setup


def _eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, x.shape[-1:], w, EPS)


def _eurocore(backend: str) -> Forward:
    """eurocore's RMSNorm on one backend, chosen explicitly."""
    from eurocore.ops import rms_norm

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, EPS, backend=backend)

    return forward


def _compiled() -> Forward:
    """A fresh torch.compile'd F.rms_norm, made when its case runs.

    Dynamo caches compiled graphs per code object, up to a recompile limit (8): one compiled
    function shared across a dozen shapes would silently fall back to eager. Each case
    therefore resets Dynamo and compiles once for its own shape (static shapes); the
    harness's first call compiles, outside the timing.
    """
    torch.compiler.reset()
    return torch.compile(_eager, dynamic=False)


def _liger() -> tuple[Forward | None, str | None]:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as err:  # not installed, or installed against another torch/triton
        return None, f"liger_kernel not importable ({type(err).__name__}: {err})"

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # offset 0, Llama casting, in_place=False: in place would overwrite dy with dx,
        # and the backward case reuses dy on every call.
        return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)

    return forward, None


def _apex() -> tuple[Forward | None, str | None]:
    # PyPI's "apex" is an unrelated web toolkit: only NVIDIA apex has this module.
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except Exception as err:
        return None, f"NVIDIA apex not importable ({type(err).__name__}: {err})"

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm_affine(x, w, x.shape[-1:], EPS)

    return forward, None


def cases(device: torch.device | str, quick: bool) -> list[Case]:
    """The RMSNorm cases for ``device``: every implementation, shape and variant.

    On a GPU: bf16, tokens {4096, 16384, 65536} x hidden {2048, 4096, 8192, 12288} (quick: a
    corner of that grid). On the CPU: float32 (CPU bf16 is not representative; the dtype
    field says float32), tokens {256, 1024} x hidden {1024, 4096}, no Triton-based
    implementation (no interpreter runs) and torch.compile only without ``quick``.

    Returns:
        Cases to run, plus skipped cases (``Case.skip`` set) naming what is left out and why.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype, dtype_name, note = harness.case_dtype(device)
    if gpu:
        tokens_list, hidden_list = ((GPU_QUICK_TOKENS, GPU_QUICK_HIDDEN) if quick
                                    else (GPU_TOKENS, GPU_HIDDEN))
    else:
        tokens_list, hidden_list = CPU_TOKENS, CPU_HIDDEN

    from eurocore.ops.normalization import IMPLEMENTED

    impls, out = harness.implementations(
        OP, OP, device, IMPLEMENTED, eurocore=lambda backend: harness.constant(_eurocore(backend)),
        eager=harness.constant(_eager), compiled=_compiled,
        third_party=[("liger", harness.constant_loader(_liger)),
                     ("apex", harness.constant_loader(_apex))],
        quick=quick, dtype_name=dtype_name)

    element_size = torch.empty((), dtype=dtype).element_size()
    for variant in VARIANTS:
        for tokens in tokens_list:
            for hidden in hidden_list:
                fwd = fwd_bytes(tokens, hidden, element_size)
                bwd = bwd_bytes(tokens, hidden, element_size)
                nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[variant]
                for name, make_forward in impls:
                    out.append(Case(
                        op=OP, variant=variant, shape={"tokens": tokens, "hidden": hidden},
                        dtype=dtype_name, impl=name,
                        setup=_setup(make_forward, variant, tokens, hidden, dtype, device),
                        bytes=nbytes, note=note,
                    ))
    return out

