"""One entry point per op: input checks, backend choice, autograd, torch.library registration.

    from eurocore.ops import rms_norm
    y = rms_norm(x, weight, eps=1e-5)                   # backend chosen per call
    y, h = rms_norm(x, weight, residual=h, eps=1e-5)    # fused residual add
    cos, sin = rope_cos_sin(4096, 128, theta=500000.0)
    q, k = apply_rotary(q, k, cos, sin)                 # q and k (GQA) in one launch
    out = flash_attention(q, k, v, causal=True)         # flash_attn_func's interface
    h = swiglu(gate, up)                                # silu(gate) * up, fused
    loss = linear_cross_entropy(hidden, weight, labels)  # no (tokens x vocab) logits
"""

from eurocore.ops.activation import swiglu, swiglu_reference
from eurocore.ops.attention import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from eurocore.ops.backends import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
)
from eurocore.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from eurocore.ops.dispatch import eager_fast_path
from eurocore.ops.normalization import rms_norm, rms_norm_reference
from eurocore.ops.rope_scaling import rope_cos_sin
from eurocore.ops.rotary import apply_rotary, apply_rotary_reference

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "apply_rotary",
    "apply_rotary_reference",
    "attention_reference",
    "attention_varlen_reference",
    "available_backends",
    "eager_fast_path",
    "flash_attention",
    "flash_attention_varlen",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "swiglu",
    "swiglu_reference",
]
