"""Drop-in modules over ``eurocore.ops``."""

from eurocore.nn.normalization import LlamaRMSNorm, RMSNorm

__all__ = ["LlamaRMSNorm", "RMSNorm"]
