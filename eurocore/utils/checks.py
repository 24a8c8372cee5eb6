"""Checks of scalar arguments, shared by every layer: each raises TypeError or ValueError
whose message starts with the argument's name, before any work is done.

    check_int("seq_len", seq_len, minimum=1)
    check_number("lr", lr, minimum=0.0, inclusive=False)     # finite and > 0
"""

from __future__ import annotations

import math
from typing import Any


def check_bool(arg: str, value: Any) -> bool:
    """A real bool (not 0/1, not a tensor); returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{arg}: expected a bool, got {type(value).__name__}")
    return value


def check_int(arg: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An int (bools refused) in ``[minimum, maximum]`` (either bound optional); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{arg}: expected an int, got {type(value).__name__}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{arg}: expected an int {_range(minimum, maximum, True)}, got {value}")
    return value


def check_number(arg: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None, inclusive: bool = True) -> float:
    """A finite int or float (bools refused) within the bounds; returns it as a float.

    ``inclusive=False`` excludes the lower bound (``minimum=0, inclusive=False``: > 0).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg}: expected a number, got {type(value).__name__}")
    below = minimum is not None and (value < minimum if inclusive else value <= minimum)
    above = maximum is not None and value > maximum
    if not math.isfinite(value) or below or above:
        bounds = _range(minimum, maximum, inclusive)
        raise ValueError(f"{arg}: expected a finite number{' ' + bounds if bounds else ''}, "
                         f"got {value}")
    return float(value)


def _range(minimum: float | None, maximum: float | None, inclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]" if inclusive else f"in ({minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}" if inclusive else f"> {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""
