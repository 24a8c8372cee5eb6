"""Drop-in modules over ``eurocore.ops``."""

from eurocore.nn.attention import FlashAttention
from eurocore.nn.normalization import LlamaRMSNorm, RMSNorm
from eurocore.nn.rotary import RotaryEmbedding

__all__ = ["FlashAttention", "LlamaRMSNorm", "RMSNorm", "RotaryEmbedding"]
