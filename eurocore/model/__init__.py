"""The Llama-style decoder built from ``eurocore.nn`` and ``eurocore.parallel``, and its
configurations."""

from eurocore.model.config import PRESETS, ModelConfig, preset
from eurocore.model.llama import MLP, Attention, DecoderLayer, LlamaModel, PackedBatch

__all__ = ["MLP", "PRESETS", "Attention", "DecoderLayer", "LlamaModel", "ModelConfig",
           "PackedBatch", "preset"]
