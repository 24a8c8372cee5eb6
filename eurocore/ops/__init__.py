"""One entry point per op: input checks, backend choice, autograd, torch.library registration.

    from eurocore.ops import rms_norm
    y = rms_norm(x, weight, eps=1e-5)                   # backend chosen per call
    y, h = rms_norm(x, weight, residual=h, eps=1e-5)    # fused residual add
"""

from eurocore.ops.backends import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
)
from eurocore.ops.normalization import rms_norm, rms_norm_reference

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "rms_norm",
    "rms_norm_reference",
]
