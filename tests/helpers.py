"""The one comparison helper for kernels against their float64 reference.

The oracle (docs/design.md, after FlashAttention): a kernel's error against the float64
reference may be at most ``factor`` times the error of the plain PyTorch reference run in
the same low precision, plus a small absolute term scaled by the reference's magnitude.
"""

from __future__ import annotations

import os

import torch

# Triton's CPU interpreter rounds fp32 -> bf16 toward zero (triton/runtime/interpreter.py,
# cast_impl; `fp_downcast_rounding="rtne"` is ignored there), where GPUs round to nearest:
# up to twice the rounding error, so bf16 gets twice the factor under the interpreter only.
INTERPRETER_BF16_FACTOR = 2.0

# One unit in the last place at magnitude 1 for the half types: a single element may round
# the other way from the reference, which on a tiny tensor the 2x rule alone cannot absorb.
ATOL = {
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float32: 1e-6,
    torch.float64: 1e-12,
}


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    same_precision: torch.Tensor,
    *,
    name: str,
    factor: float = 2.0,
    atol: float | None = None,
    scale: float | None = None,
) -> None:
    """Asserts ``|actual - ref64| <= factor * |same_precision - ref64| + atol * scale``.

    Args:
        actual: the output of the backend under test.
        reference64: the reference evaluated in float64 on the same inputs.
        same_precision: the reference evaluated in the dtype under test (``actual``'s).
        name: what is compared, for the failure message.
        factor: allowed multiple of the same-precision reference's error.
        atol: absolute slack relative to ``scale``; by dtype when None.
        scale: the magnitude rounding errors scale with, default ``max(1, max|ref64|)``.
            A result that is a difference of much larger terms (RMSNorm's input gradient
            when eps dominates a short row) carries their rounding error, not its own.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {actual.shape} vs {reference64.shape}"
    assert actual.dtype == same_precision.dtype, f"{name}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if actual.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        factor *= INTERPRETER_BF16_FACTOR
    atol = ATOL[actual.dtype] if atol is None else atol
    ref = reference64.detach().double().cpu()
    err = (actual.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    base = (same_precision.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    if scale is None:
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    bound = factor * base + atol * scale
    assert err <= bound, (
        f"{name}: max error {err:.3g} vs float64 exceeds {bound:.3g} "
        f"({factor}x the {actual.dtype} reference's {base:.3g} + {atol:g}x{scale:.3g})")
