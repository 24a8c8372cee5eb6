"""The Llama-style decoder built from ``eurocore.nn`` and ``eurocore.parallel``, its
configurations, and its memory arithmetic (``eurocore.model.memory``)."""

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
from eurocore.model.memory import (
    activation_bytes_per_rank,
    llama_analytic_bytes,
    output_layer_analytic_bytes,
    parameters_per_rank,
)

__all__ = ["MLP", "PRESETS", "Attention", "DecoderLayer", "LlamaModel", "ModelConfig",
           "PackedBatch", "WeightLayout", "activation_bytes_per_rank", "check_token_ids",
           "llama_analytic_bytes", "output_layer_analytic_bytes", "parameters_per_rank",
           "preset", "stage_chunks", "sum_tied_embedding_grads"]
