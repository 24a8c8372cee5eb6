"""The Llama-style decoder built from ``eurocore.nn`` and ``eurocore.parallel``, and its
configurations."""

from eurocore.model.config import PRESETS, ModelConfig, preset
from eurocore.model.llama import (
    MLP,
    Attention,
    DecoderLayer,
    LlamaModel,
    PackedBatch,
    WeightLayout,
    check_token_ids,
    stage_chunks,
    sum_tied_embedding_grads,
)

__all__ = ["MLP", "PRESETS", "Attention", "DecoderLayer", "LlamaModel", "ModelConfig",
           "PackedBatch", "WeightLayout", "check_token_ids", "preset", "stage_chunks",
           "sum_tied_embedding_grads"]
