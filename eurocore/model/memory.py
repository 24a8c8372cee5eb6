"""The model's memory arithmetic: parameters each rank holds and activation bytes each
rank keeps for the backward, from the config alone (no model, no process group, no GPU).

``llama_analytic_bytes`` and ``output_layer_analytic_bytes`` are the exact counts of what one
decoder layer and the output layer save for the backward on the fused-kernel path; the
activation accounting benchmark (``eurocore.benchmarks.parallel_accounting``, whose module
docstring derives every term) measures them on the CPU and asserts equality.
:func:`parameters_per_rank` mirrors how ``LlamaModel`` and ``stage_chunks`` split the weights
(TP shards, pipeline stages, FSDP2's row shards); :func:`activation_bytes_per_rank` walks each
pipeline rank's schedule (``eurocore.parallel.schedules``) to find its peak. ``eurocore train
--dry-run`` prints both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from eurocore.model.config import ModelConfig
from eurocore.model.llama import RECOMPUTE
from eurocore.parallel.layers import padded_vocab_size
from eurocore.parallel.pipeline import stage_layers
from eurocore.parallel.schedules import schedule
from eurocore.utils.checks import check_bool, check_int

__all__ = ["StageActivations", "activation_bytes_per_rank", "chunk_activation_bytes",
           "layer_activation_bytes", "llama_analytic_bytes", "output_layer_analytic_bytes",
           "output_layer_bytes", "output_layer_logits_analytic_bytes", "parameter_shapes",
           "parameters_per_rank"]

# -------------------------------------------------------------------------------------------
# Activations of one microbatch
# -------------------------------------------------------------------------------------------


def llama_analytic_bytes(config: ModelConfig, seq: int, batch: int, tp: int,
                         sequence_parallel: bool, recompute: str = "none") -> dict[str, int]:
    """The bytes one rank's DecoderLayer keeps for backward on the fused-kernel path, per
    module (``eurocore.benchmarks.parallel_accounting``'s module docstring derives each
    term). Sum the values for the layer.
    ``selective`` keeps no norm outputs (the projections' inputs) nor the SwiGLU product;
    ``full`` keeps only the layer's input."""
    h, a, g, d, f = (config.hidden_size, config.num_heads, config.num_kv_heads,
                     config.head_dim, config.ffn_hidden_size)
    full = seq * batch                                # N: tokens of the gathered sequence
    local = full // tp if sequence_parallel else full  # n: tokens of the residual stream
    bf16, fp32 = 2, 4
    norm = bf16 * local * h + fp32 * local             # input + rstd
    core = bf16 * full * (a * d + 2 * g * d + a * d) // tp + fp32 * full * a // tp
    if recompute == "full":
        return {"layer": bf16 * local * h}
    kept = recompute == "none"
    return {
        "attention_norm": norm,
        "attention.qkv": bf16 * local * h if kept else 0,
        "attention.core": core,
        "attention.out": 0,  # a view of the core's saved output
        "mlp_norm": norm,
        "mlp.gate_up": bf16 * local * h if kept else 0,
        "mlp": bf16 * full * 2 * f // tp,  # gate and up: SwiGLU's saved views of gate_up
        "mlp.down": bf16 * full * f // tp if kept else 0,
    }


def output_layer_analytic_bytes(config: ModelConfig, seq: int, batch: int, tp: int,
                                sequence_parallel: bool) -> dict[str, int]:
    """The bytes one rank's final norm, head and loss keep for backward with the fused
    linear cross-entropy: no vocabulary term. The head gathers the sequence (with SP) and
    the loss keeps that input whole, its int64 labels, an fp32 lse per token and the count
    of tokens (one int64)."""
    h, full = config.hidden_size, seq * batch
    local = full // tp if sequence_parallel else full
    return {"norm": 2 * local * h + 4 * local,
            "head": 2 * full * h + 8 * full + 4 * full + 8}


def output_layer_logits_analytic_bytes(config: ModelConfig, seq: int, batch: int, tp: int,
                                       sequence_parallel: bool) -> dict[str, int]:
    """The same bytes on the logits path (``fused_loss`` off: the head's bf16 logits, then
    ``eurocore.parallel.vocab_parallel_cross_entropy``), per module. N tokens, V_l = the
    padded vocabulary / tp columns of this rank: the norm as with the fused loss; the head
    keeps its (gathered) bf16 input 2·N·h, the fp32 logits twice (exp's output, and
    gather's input, which autograd saves whole) 8·N·V_l, the padding-column mask V_l
    (bool), per token the int64 gather index, the fp32 sum of exponentials and two bool
    masks (14·N), and the int64 count of tokens. The benchmark's logits measurement
    (``measure_output_layer``) equals it."""
    h, full = config.hidden_size, seq * batch
    local = full // tp if sequence_parallel else full
    columns = padded_vocab_size(config.vocab_size, tp) // tp
    return {"norm": 2 * local * h + 4 * local,
            "head": 2 * full * h + 8 * full * columns + columns + 14 * full + 8}


def layer_activation_bytes(config: ModelConfig, seq: int, batch: int, tp: int,
                           sequence_parallel: bool, recompute: str = "none") -> int:
    """What one decoder layer keeps for one microbatch of ``batch`` x ``seq`` tokens on one
    rank: the sum of :func:`llama_analytic_bytes`."""
    return sum(llama_analytic_bytes(config, seq, batch, tp, sequence_parallel,
                                    recompute).values())


def output_layer_bytes(config: ModelConfig, seq: int, batch: int, tp: int,
                       sequence_parallel: bool, fused_loss: bool = True) -> int:
    """What the final norm, head and loss keep for one microbatch on one rank: the fused
    linear cross-entropy's count, or the logits path's."""
    count = output_layer_analytic_bytes if fused_loss else output_layer_logits_analytic_bytes
    return sum(count(config, seq, batch, tp, sequence_parallel).values())


def chunk_activation_bytes(config: ModelConfig, layers: Sequence[int], *, seq: int, batch: int,
                           tp: int, sequence_parallel: bool, recompute: str = "none",
                           recompute_layers: Sequence[int] | None = None,
                           post_process: bool = False, fused_loss: bool = True) -> int:
    """What one model chunk (the decoder ``layers``, global indices, and the output layer
    when ``post_process``) keeps for one microbatch on one rank. ``recompute`` applies to
    ``recompute_layers`` (default: all); the other layers keep everything. The embedding's
    saved token ids (8 bytes per token) are left out."""
    recomputed = set(range(config.num_layers) if recompute_layers is None
                     else recompute_layers)
    total = sum(layer_activation_bytes(config, seq, batch, tp, sequence_parallel,
                                       recompute if i in recomputed else "none")
                for i in layers)
    if post_process:
        total += output_layer_bytes(config, seq, batch, tp, sequence_parallel, fused_loss)
    return total


# -------------------------------------------------------------------------------------------
# Per pipeline rank
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageActivations:
    """The activation peak of one pipeline rank.

    Attributes:
        bytes: the most bytes the rank keeps for backward at once, over its schedule.
        in_flight: the most microbatch-chunks whose forward has run and backward has not.
        per_microbatch: bytes each of the rank's chunks keeps for one microbatch.
        recompute_bytes: with full recomputation, what the one layer being recomputed
            holds again during its backward (counted in ``bytes``, once); else 0.
    """

    bytes: int
    in_flight: int
    per_microbatch: tuple[int, ...]
    recompute_bytes: int


def activation_bytes_per_rank(
        config: ModelConfig, *, seq: int, micro_batch: int, num_microbatches: int,
        tp: int = 1, pp: int = 1, vpp: int = 1, layers_per_stage: Sequence[int] | None = None,
        sequence_parallel: bool = False, recompute: str = "none",
        recompute_layers: Sequence[int] | None = None, fused_loss: bool = True,
        schedule_name: str | None = None) -> list[StageActivations]:
    """The activation peak of each pipeline rank (index = pipeline rank) for one training
    step: the rank's schedule (``schedule_name``, default 1F1B, interleaved with vpp > 1) is
    walked step by step, each forward adding what its chunk keeps for one microbatch
    (:func:`chunk_activation_bytes`) and each backward releasing it; the peak is the most
    held at once (1F1B: rank r holds up to p - r microbatches). With ``full``
    recomputation the layer being recomputed holds its ``none`` bytes again during its
    backward, once, on top. bf16 activations (autocast), fp32 where the kernels keep fp32.

    Raises:
        ValueError: naming the argument that cannot hold (sizes below 1, an unknown
            recompute setting, layers that do not fill the stages).
    """
    for name, value in (("seq", seq), ("micro_batch", micro_batch),
                        ("num_microbatches", num_microbatches), ("tp", tp), ("pp", pp),
                        ("vpp", vpp)):
        check_int(name, value, minimum=1)
    check_bool("sequence_parallel", sequence_parallel)
    check_bool("fused_loss", fused_loss)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute: expected one of {', '.join(RECOMPUTE)}, got "
                         f"{recompute!r}")
    stages = pp * vpp
    splits = stage_layers(config.num_layers, stages, layers_per_stage)
    name = schedule_name or ("interleaved-1f1b" if vpp > 1 else "1f1b")
    recomputed = set(range(config.num_layers) if recompute_layers is None
                     else recompute_layers)
    shape = {"seq": seq, "batch": micro_batch, "tp": tp, "sequence_parallel": sequence_parallel}
    result = []
    for rank in range(pp):
        chunks = [splits[chunk * pp + rank] for chunk in range(vpp)]
        per_microbatch = tuple(
            chunk_activation_bytes(config, layers, recompute=recompute,
                                   recompute_layers=recompute_layers,
                                   post_process=chunk * pp + rank == stages - 1,
                                   fused_loss=fused_loss, **shape)
            for chunk, layers in enumerate(chunks))
        transient = 0
        if recompute == "full":
            transient = max((layer_activation_bytes(config, **shape)
                             for layers in chunks for i in layers if i in recomputed),
                            default=0)
        held = peak = live = most_live = 0
        for step in schedule(name, rank, pp, num_microbatches, vpp):
            if step.kind == "F":
                held += per_microbatch[step.chunk]
                live += 1
                peak, most_live = max(peak, held), max(most_live, live)
            else:  # the backward runs with its microbatch still held, then frees it
                peak = max(peak, held + transient)
                held -= per_microbatch[step.chunk]
                live -= 1
        result.append(StageActivations(peak, most_live, per_microbatch, transient))
    return result


# -------------------------------------------------------------------------------------------
# Parameters
# -------------------------------------------------------------------------------------------


def parameter_shapes(config: ModelConfig, tp: int = 1, layers: Sequence[int] | None = None,
                     pre_process: bool = True, post_process: bool = True
                     ) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter one TP rank of a model chunk holds, by its name in
    ``LlamaModel`` (a tied head sharing the embedding is the embedding, once): what
    ``LlamaModel(config, groups, layers=..., pre_process=..., post_process=...)`` makes at
    tensor-parallel degree ``tp``, without building it. Norm weights are whole on every
    rank; the vocabulary is padded to a multiple of tp."""
    check_int("tp", tp, minimum=1)
    config.check_layout(tp)
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    a, g = config.num_heads, config.num_kv_heads
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_layers) if layers is None else layers:
        shapes[f"layers.{i}.attention_norm.weight"] = (h,)
        shapes[f"layers.{i}.attention.qkv.weight"] = ((a + 2 * g) * d // tp, h)
        shapes[f"layers.{i}.attention.out.weight"] = (h, a * d // tp)
        shapes[f"layers.{i}.mlp_norm.weight"] = (h,)
        shapes[f"layers.{i}.mlp.gate_up.weight"] = (2 * f // tp, h)
        shapes[f"layers.{i}.mlp.down.weight"] = (h, f // tp)
    rows = padded_vocab_size(config.vocab_size, tp) // tp
    if pre_process:
        shapes["embedding.weight"] = (rows, h)
    if post_process:
        shapes["norm.weight"] = (h,)
        if not (config.tie_embeddings and pre_process):  # else the embedding, shared
            shapes["head.weight"] = (rows, h)
    return shapes


def _shard_numel(shape: tuple[int, ...], dp: int, dp_rank: int) -> int:
    """Elements FSDP2 leaves on ``dp_rank`` of a parameter of ``shape``: its rows cut in
    ``dp`` chunks of ceil(rows / dp) (``torch.chunk``), the last ones shorter or empty."""
    rows, rest = shape[0], math.prod(shape[1:])
    size = -(-rows // dp)
    return max(0, min(size, rows - dp_rank * size)) * rest


def parameters_per_rank(config: ModelConfig, tp: int = 1, pp: int = 1, dp: int = 1,
                        vpp: int = 1, layers_per_stage: Sequence[int] | None = None,
                        dp_rank: int = 0) -> list[int]:
    """The parameters one rank of each pipeline stage holds (index = pipeline rank), as
    ``stage_chunks`` builds its chunks and FSDP2 shards them over ``dp`` data-parallel
    ranks (the rank ``dp_rank``; rank 0 holds the most). Every TP rank of a stage holds the
    same. The count the trainer logs as "parameters per rank"."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("vpp", vpp)):
        check_int(name, value, minimum=1)
    check_int("dp_rank", dp_rank, minimum=0, maximum=dp - 1)
    stages = pp * vpp
    splits = stage_layers(config.num_layers, stages, layers_per_stage)
    counts = []
    for rank in range(pp):
        total = 0
        for chunk in range(vpp):
            stage = chunk * pp + rank
            shapes = parameter_shapes(config, tp, splits[stage], pre_process=stage == 0,
                                      post_process=stage == stages - 1)
            total += sum(_shard_numel(shape, dp, dp_rank) for shape in shapes.values())
        counts.append(total)
    return counts
