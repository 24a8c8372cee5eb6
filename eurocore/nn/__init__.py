"""Drop-in modules over ``eurocore.ops``."""

from eurocore.nn.rms_norm import LlamaRMSNorm, RMSNorm

__all__ = ["LlamaRMSNorm", "RMSNorm"]
