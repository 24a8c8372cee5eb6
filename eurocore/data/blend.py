"""Which source each global sample comes from, in exact proportions.

``--data-path`` takes Megatron-LM's syntax: ``W1 PREFIX1 W2 PREFIX2 ...``, or prefixes
alone (each weighted by its tokens). Weights are normalised to shares ``w_d``.

The order: source d's k-th sample is due at time ``(k + 1/2) / w_d``; global sample i is
the i-th due sample over all sources (ties to the lower source index). Every source is
then within one sample of its share in every prefix of the order, so within two samples in
any window (0.2 percentage points of a window of 1,000), and sample i is a pure function of
the weights and i: a longer run extends the order without changing its start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def parse_data_path(items: Sequence[str], arg: str = "data_path"
                    ) -> list[tuple[float | None, str]]:
    """(weight or None, prefix) pairs from Megatron's syntax; ValueError naming ``arg``."""
    items = [str(i) for i in items]
    if not items:
        raise ValueError(f"{arg}: expected W1 PREFIX1 W2 PREFIX2 ..., or prefixes alone")
    if not _is_number(items[0]):
        numbers = [i for i in items if _is_number(i)]
        if numbers:
            raise ValueError(f"{arg}: give a weight before every prefix, or none at all; "
                             f"got {items}")
        return [(None, prefix) for prefix in items]
    if len(items) % 2:
        raise ValueError(f"{arg}: weights and prefixes come in pairs (W1 PREFIX1 W2 PREFIX2 "
                         f"...), got {len(items)} items")
    pairs = []
    for weight, prefix in zip(items[::2], items[1::2], strict=True):
        if not _is_number(weight) or _is_number(prefix):
            raise ValueError(f"{arg}: expected W PREFIX pairs, got {weight!r} {prefix!r}")
        value = float(weight)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{arg}: weights must be finite and > 0, got {weight} for "
                             f"{prefix!r}")
        pairs.append((value, prefix))
    return pairs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def shares(weights: Sequence[float]) -> np.ndarray:
    """The weights normalised to sum to 1 (float64)."""
    w = np.asarray(weights, np.float64)
    return w / w.sum()


def blend(weights: Sequence[float], first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample index within the source) of global samples ``first .. first +
    count - 1``, int64 each (see the module docstring). The work is proportional to
    ``count`` and the number of sources, not to ``first``."""
    w = shares(weights)
    n = len(w)

    def due(d: int, k: np.ndarray | int) -> np.ndarray:
        return (np.asarray(k, np.float64) + 0.5) / w[d]

    # Each source's samples due before t: about t·w_d; so before t0 = first - n - 1 there
    # are at most `first` of them in all. Count them exactly, with the same arithmetic as
    # the due times (so the sort below agrees with the counts).
    t0 = float(max(0, first - n - 1))
    before = []
    for d in range(n):
        k = max(0, math.ceil(t0 * w[d] - 0.5))
        while k > 0 and due(d, k - 1) >= t0:
            k -= 1
        while due(d, k) < t0:
            k += 1
        before.append(k)
    skip = first - sum(before)
    horizon = first + count - t0 + n + 2  # enough due times past t0 for every source
    ks = [np.arange(before[d], before[d] + math.ceil(horizon * w[d]) + 2, dtype=np.int64)
          for d in range(n)]
    times = np.concatenate([due(d, k) for d, k in enumerate(ks)])
    source = np.concatenate([np.full(len(k), d, np.int64) for d, k in enumerate(ks)])
    index = np.concatenate(ks)
    order = np.lexsort((source, times))[skip:skip + count]  # by due time, ties: lower source
    return source[order], index[order]
