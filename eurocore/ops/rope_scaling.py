"""Hugging Face rope scaling: the cos/sin tables that :func:`eurocore.ops.apply_rotary` reads.

:func:`rope_cos_sin` evaluates HF transformers' inverse frequencies for each supported
``rope_type`` (``default``, ``linear``, ``llama3``; any other is refused by name) in float64.
The rotation itself lives in :mod:`eurocore.ops.rotary`, which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from eurocore.utils.checks import check_int, check_number

# rope_type -> the fields it needs, as in HF transformers' rope_parameters.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
# Keys every rope_parameters dict may carry: the type (HF's legacy name for it is "type"),
# theta, and partial_rotary_factor, which rotary_dim already accounts for.
_COMMON_SCALING_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def rope_cos_sin(
    seqlen: int,
    rotary_dim: int,
    *,
    theta: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables for positions ``0 .. seqlen - 1``.

    ``inv_freq[i] = theta ** (-2i / rotary_dim)``, rescaled by ``scaling``, and
    ``angle[p, i] = p · inv_freq[i]``: HF transformers' formulas, evaluated in float64 and
    rounded once to fp32 (HF evaluates in fp32, which at position 65536 is off by up to
    ~4e-3 radians).

    Args:
        seqlen: number of positions, >= 0.
        rotary_dim: number of dims rotated per head; even, > 0.
        theta: the RoPE base (``rope_theta``).
        scaling: a dict as HF's ``rope_parameters`` / ``rope_scaling``: ``rope_type`` (or
            ``type``) one of ``default``, ``linear`` (``factor``) or ``llama3`` (``factor``,
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
            A ``rope_theta`` key overrides ``theta``; ``partial_rotary_factor`` is ignored
            (``rotary_dim`` says how many dims rotate).
        device: where the tables are made.

    Returns:
        ``(cos, sin)``, each float32 of shape (seqlen, rotary_dim // 2).
    """
    check_int("seqlen", seqlen, minimum=0)
    if check_int("rotary_dim", rotary_dim) <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: rotates pairs of dims, so it must be even and > 0, "
                         f"got {rotary_dim}")
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
    positions = torch.arange(seqlen, dtype=torch.float64, device=device)
    angles = torch.outer(positions, inv_freq.to(positions.device))
    return angles.cos().float(), angles.sin().float()


def rope_inv_freq(rotary_dim: int, theta: float,
                  scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """The inverse frequencies of HF's rope types: float64 of shape (rotary_dim // 2,), on
    the CPU. ``theta`` and ``scaling`` as :func:`rope_cos_sin` takes them (a ``rope_theta``
    in ``scaling`` wins); ``rotary_dim`` is not checked here."""
    params = _scaling_params(scaling)
    theta = params.pop("rope_theta", theta)
    check_number("theta", theta, minimum=1.0, inclusive=False)
    # On the CPU whatever the default device: a few dozen numbers.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    rope_type = params.pop("rope_type")
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp
        # between the two cut-offs set by the original context length.
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (context / wavelen - low) / (high - low)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > context / low, inv_freq / factor,
                               torch.where(wavelen < context / high, inv_freq, ramp))
    return inv_freq


def _scaling_params(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validates a rope_parameters dict; returns its rope_type, fields and any rope_theta."""
    if scaling is None:
        return {"rope_type": "default"}
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling: expected a dict like HF's rope_parameters, "
                        f"got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"scaling: rope_type {rope_type!r} is not supported; "
                         f"expected one of {', '.join(ROPE_TYPES)}")
    needed = ROPE_TYPES[rope_type]
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"scaling: rope_type {rope_type!r} needs {', '.join(missing)}")
    unknown = sorted(set(scaling) - set(needed) - set(_COMMON_SCALING_KEYS))
    if unknown:
        raise ValueError(f"scaling: {', '.join(map(repr, unknown))} not used by rope_type "
                         f"{rope_type!r}, which takes {', '.join(needed) or 'no fields'}")
    params: dict[str, Any] = {"rope_type": rope_type}
    for key in needed:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"scaling: {key} must be a finite number > 0, got {value!r}")
        params[key] = float(value)
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError(f"scaling: high_freq_factor ({params['high_freq_factor']}) must "
                         f"exceed low_freq_factor ({params['low_freq_factor']})")
    if "rope_theta" in scaling:
        params["rope_theta"] = scaling["rope_theta"]
    return params
