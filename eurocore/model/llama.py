"""The Llama-style decoder, tensor- and sequence-parallel (Megatron-LM layout).

Activations between the layers are sequence-first, (seq, batch, hidden), and with sequence
parallelism each rank of the TP group holds seq / tp of them. Per decoder layer:

    x ─ norm ─ qkv (column) ─ RoPE ─ attention ─ out (row) ─ + ─ norm ─ gate,up (column)
    │                                                        │   ─ SwiGLU ─ down (row) ─ +
    └────────────────────────────────────────────────────────┘ (residuals)

Attention always runs on packed sequences (``eurocore.ops.flash_attention_varlen``): a row
of the batch may hold several documents, marked by ``position_ids`` that restart at 0 where
each document starts; RoPE uses those positions and no token attends across a boundary.
Without ``position_ids`` each row is one document.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from eurocore.model.config import ModelConfig
from eurocore.model.recompute import free_until_backward
from eurocore.nn import FlashAttention, RotaryEmbedding
from eurocore.ops import swiglu
from eurocore.ops.checks import check_index_tensor, reads_allowed
from eurocore.parallel import (
    ColumnParallelLinear,
    ParallelGroups,
    ParallelRMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    local_part,
)
from eurocore.parallel.pipeline import stage_layers
from eurocore.parallel.sharding import FullSlice
from eurocore.utils.checks import check_bool, check_int


@dataclass(frozen=True)
class PackedBatch:
    """Where the documents of a (batch, seq) token block start and end, shared by all layers.

    position_ids: (batch · seq,) int64, each token's position in its document.
    cu_seqlens: (documents + 1,) int32, document bounds in the batch-major flattened tokens.
    max_seqlen: the longest document.
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor | None, batch: int, seq: int,
                          device: torch.device) -> PackedBatch:
        """Documents from ``position_ids`` (batch, seq) restarting at 0 at each document's
        first token; None: each row is one document. Reads the device once when given."""
        if position_ids is None:
            positions = torch.arange(seq, device=device).repeat(batch)
            cu = torch.arange(0, (batch + 1) * seq, seq, device=device, dtype=torch.int32)
            return cls(positions, cu, seq)
        if position_ids.shape != (batch, seq):
            raise ValueError(f"position_ids: expected shape {(batch, seq)} like tokens, got "
                             f"{tuple(position_ids.shape)}")
        if bool((position_ids[:, 0] != 0).any()):
            raise ValueError("position_ids: every row must start a document (position 0)")
        flat = position_ids.reshape(-1).to(device=device, dtype=torch.int64)
        starts = torch.nonzero(flat == 0).flatten()
        cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        return cls(flat, cu, int((cu[1:] - cu[:-1]).max()))


# A fused matrix is stored as its parts, each split over TP on its own: the parts' names.
FUSED_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


@dataclass(frozen=True)
class WeightLayout:
    """One parameter of a model chunk and the full tensors its TP shard holds slices of.

    name: the parameter's name in the chunk (``layers.3.attention.qkv.weight``).
    slices: (canonical name, slice) pairs: the layout-free tensors of the full model,
        fused matrices as their parts (``layers.3.attention.q.weight``), the vocabulary
        without its padding rows.
    copy: the last pipeline stage's copy of a tied embedding (the first stage's original
        is the one to store; the copy reads it back).
    """

    name: str
    param: nn.Parameter
    slices: list[tuple[str, FullSlice]]
    copy: bool = False


def check_token_ids(config: ModelConfig, tokens: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, *,
                    ignore_index: int = -100) -> None:
    """Raises ValueError naming ``tokens``, ``labels`` or ``position_ids`` when one holds an
    id the model cannot take: a token outside ``[0, vocab_size)``, a label outside it other
    than ``ignore_index``, a position outside ``[0, max_seq_len)``.

    Without this, the embedding would map a stray token to zeros and the loss would skip a
    stray label: a plausible loss, silently wrong. One reduction per tensor and a single
    read of the results (one synchronisation on a GPU); the error path reads more to say
    where. ``LlamaModel`` calls it in eager mode; under torch.compile or CUDA graphs, check
    each batch in the data path instead (the trainer does, on the CPU, before the copy).
    """
    named = [("tokens", tokens, config.vocab_size, "the vocabulary"),
             ("labels", labels, config.vocab_size, "the vocabulary"),
             ("position_ids", position_ids, config.max_seq_len, "max_seq_len's positions")]
    named = [entry for entry in named if entry[1] is not None and entry[1].numel()]
    if not named:
        return
    ranges = []
    for arg, ids, _, _ in named:
        if arg == "labels":
            ids = ids.masked_fill(ids == ignore_index, 0)
        ranges.extend(torch.aminmax(ids))
    values = torch.stack([r.long() for r in ranges]).tolist()
    for i, (arg, ids, bound, what) in enumerate(named):
        low, high = values[2 * i], values[2 * i + 1]
        if low >= 0 and high < bound:
            continue
        outside = (ids < 0) | (ids >= bound)
        if arg == "labels":
            outside &= ids != ignore_index
        where = tuple(torch.nonzero(outside)[0].tolist())
        extra = f" and is not the ignore index {ignore_index}" if arg == "labels" else ""
        raise ValueError(f"{arg}: {int(ids[where])} at index {list(where)} is outside {what} "
                         f"[0, {bound}){extra}")


def _seed(config: ModelConfig, layer: int, role: int) -> int:
    """The initialisation seed of one weight: disjoint block ranges for every (layer, role)
    (a matrix uses ``seed .. seed + rows / 64``; 2**20 blocks is 67M rows)."""
    return config.seed * 2**32 + (layer + 1) * 2**24 + role * 2**20


class Attention(nn.Module):
    """GQA self-attention over this rank's heads: fused q/k/v (column), RoPE, flash
    attention on packed documents, output projection (row).

    Forward: x (seq or seq / tp, batch, hidden) -> same shape.
    """

    def __init__(self, config: ModelConfig, layer: int, tp_group=None, *,
                 sequence_parallel: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        hd = config.head_dim
        self.local_heads, self.local_kv_heads = config.num_heads // tp, config.num_kv_heads // tp
        self.head_dim = hd
        self.qkv = ColumnParallelLinear(
            config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * hd, tp_group,
            output_sizes=(config.num_heads * hd, config.num_kv_heads * hd,
                          config.num_kv_heads * hd),
            sequence_parallel=sequence_parallel, std=config.init_std,
            seed=_seed(config, layer, 0), device=device, dtype=dtype)
        self.out = RowParallelLinear(
            config.num_heads * hd, config.hidden_size, tp_group,
            sequence_parallel=sequence_parallel,
            std=config.init_std / math.sqrt(2 * config.num_layers),
            seed=_seed(config, layer, 1), device=device, dtype=dtype)
        self.core = FlashAttention(causal=True)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, packed: PackedBatch, *,
                recompute_input: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``recompute_input``: x's value again; given, x's storage is freed once the
        projection has saved it and refilled in the backward (selective recomputation)."""
        qkv = self.qkv(x)
        if recompute_input is not None:
            free_until_backward(x, qkv, recompute_input)
        q, k, v = self.qkv.split_output(qkv)             # (seq, batch, local heads · hd)
        seq, batch = q.shape[0], q.shape[1]

        def tokens_first(t: torch.Tensor, heads: int) -> torch.Tensor:
            # (seq, batch, ...) -> (batch · seq, heads, hd): batch-major packed tokens
            return t.transpose(0, 1).reshape(batch * seq, heads, self.head_dim)

        q = tokens_first(q, self.local_heads)
        k = tokens_first(k, self.local_kv_heads)
        # A copy: the core saves v, and a view would keep all of qkv's output alive.
        v = tokens_first(v, self.local_kv_heads).contiguous()
        q, k = rotary(q, k, position_ids=packed.position_ids)
        o = self.core(q, k, v, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
        # batch-major into the projection: F.linear then saves a view of the core's output
        # instead of a (seq, batch) copy of it
        return self.out(o.reshape(batch, seq, self.local_heads * self.head_dim),
                        batch_first=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)), gate and up fused in one column-parallel matrix.

    Forward: x (seq or seq / tp, batch, hidden) -> same shape.
    """

    def __init__(self, config: ModelConfig, layer: int, tp_group=None, *,
                 sequence_parallel: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        ffn = config.ffn_hidden_size
        self.gate_up = ColumnParallelLinear(
            config.hidden_size, 2 * ffn, tp_group, output_sizes=(ffn, ffn),
            sequence_parallel=sequence_parallel, std=config.init_std,
            seed=_seed(config, layer, 2), device=device, dtype=dtype)
        self.down = RowParallelLinear(
            ffn, config.hidden_size, tp_group, sequence_parallel=sequence_parallel,
            std=config.init_std / math.sqrt(2 * config.num_layers),
            seed=_seed(config, layer, 3), device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *,
                recompute_input: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``recompute_input``: x's value again; given, x and the SwiGLU product (from gate
        and up, which SwiGLU keeps anyway) are freed once their projections have saved them
        and refilled in the backward (selective recomputation)."""
        gate_up = self.gate_up(x)
        if recompute_input is not None:
            free_until_backward(x, gate_up, recompute_input)
        gate, up = self.gate_up.split_output(gate_up)
        product = swiglu(gate, up)
        out = self.down(product)
        if recompute_input is not None:
            free_until_backward(product, out, lambda: swiglu(gate, up))
        return out


RECOMPUTE = ("none", "selective", "full")


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + mlp(norm(h)).

    recompute: what the layer keeps for its backward.

    * ``"none"``: every activation its ops save.
    * ``"selective"``: not the two RMSNorm outputs nor the SwiGLU product; each is
      computed again in the backward from what its op keeps anyway (the norm's input, gate
      and up), bit for bit (:mod:`eurocore.model.recompute`).
    * ``"full"``: only its input; the whole forward runs again in the backward
      (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, config: ModelConfig, layer: int, tp_group=None, *,
                 sequence_parallel: bool = False, recompute: str = "none", device=None,
                 dtype=None) -> None:
        super().__init__()
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute: expected one of {', '.join(RECOMPUTE)}, got "
                             f"{recompute!r}")
        self.recompute = recompute
        parallel = {"sequence_parallel": sequence_parallel, "device": device, "dtype": dtype}
        self.attention_norm = ParallelRMSNorm(config.hidden_size, config.norm_eps, tp_group,
                                              **parallel)
        self.attention = Attention(config, layer, tp_group, **parallel)
        self.mlp_norm = ParallelRMSNorm(config.hidden_size, config.norm_eps, tp_group,
                                        **parallel)
        self.mlp = MLP(config, layer, tp_group, **parallel)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, packed: PackedBatch
                ) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, rotary, packed,
                                                     use_reentrant=False)
        return self._forward(x, rotary, packed)

    def _forward(self, x: torch.Tensor, rotary: RotaryEmbedding, packed: PackedBatch
                 ) -> torch.Tensor:
        selective = self.recompute == "selective"
        h = x + self.attention(
            _normed(self.attention_norm, x), rotary, packed,
            recompute_input=(lambda: _normed(self.attention_norm, x)) if selective else None)
        return h + self.mlp(_normed(self.mlp_norm, h),
                            recompute_input=(lambda: _normed(self.mlp_norm, h)) if selective
                            else None)


def _normed(norm: ParallelRMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) in the dtype the projection after it computes in: under autocast the cast is
    made here, so that the tensor the projection saves is this one (which selective
    recomputation can free), not a cast of it inside the projection."""
    y = norm(x)
    if torch.is_autocast_enabled(y.device.type):
        return y.to(torch.get_autocast_dtype(y.device.type))
    return y


class LlamaModel(nn.Module):
    """The decoder with its embedding, final norm and (untied or tied) output head, or one
    pipeline stage of it.

    Args:
        config: the model's sizes (``eurocore.model.preset``).
        groups: the process groups; the tensor-parallel group is used here (None or
            ``ParallelGroups.single()``: one process).
        sequence_parallel: split the activations between the TP regions along the sequence.
        layers: the decoder layers this module holds, by global index (default: all); they
            are registered under ``layers.<index>``, so parameter names are the same in
            every pipeline layout.
        pre_process: hold the embedding (the first pipeline stage).
        post_process: hold the final norm, the head and the loss (the last stage). A last
            stage without the embedding but with tied embeddings holds a copy of it as the
            head, initialised equal; :meth:`tied_embedding_weight` names the weight whose
            gradient the first and last stages must sum.
        device, dtype: where and in which dtype the parameters are made. On the ``meta``
            device nothing is drawn (sizing a model costs no memory).
        check_ids: in eager mode, check every forward's token ids, labels and positions
            (:func:`check_token_ids`: one synchronisation per forward). A trainer that
            checks its batches in the data path turns this off.
        recompute: activation recomputation of the decoder layers, ``"none"``,
            ``"selective"`` or ``"full"`` (:class:`DecoderLayer`).
        recompute_layers: the decoder layers (global indices; those of this chunk count)
            that ``recompute`` applies to (default: all); the others keep everything.
        fused_loss: the last stage's loss from ``eurocore.ops.linear_cross_entropy`` (no
            logits kept); False: from the logits (:class:`VocabParallelHead`).

    Each rank holds only its shard; every weight is drawn from ``config.seed`` in fixed
    blocks, so every TP and PP layout starts from the same model (padding rows of the
    vocabulary start at zero and never receive a gradient).
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None, *,
                 sequence_parallel: bool = False, layers: Sequence[int] | None = None,
                 pre_process: bool = True, post_process: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, check_ids: bool = True,
                 recompute: str = "none", recompute_layers: Sequence[int] | None = None,
                 fused_loss: bool = True) -> None:
        super().__init__()
        groups = groups or ParallelGroups.single()
        for arg, flag in (("sequence_parallel", sequence_parallel), ("pre_process", pre_process),
                          ("post_process", post_process), ("check_ids", check_ids),
                          ("fused_loss", fused_loss)):
            check_bool(arg, flag)
        self.check_ids, self.fused_loss = check_ids, fused_loss
        config.check_layout(groups.tp_size, sequence_parallel)
        self.config, self.sequence_parallel = config, sequence_parallel
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group, self.tp_size = groups.tp_group, groups.tp_size
        tp_group = groups.tp_group
        parallel = {"sequence_parallel": sequence_parallel, "device": device, "dtype": dtype}
        layers = range(config.num_layers) if layers is None else list(layers)
        if any(not 0 <= i < config.num_layers for i in layers):
            raise ValueError(f"layers: expected indices in 0 .. {config.num_layers - 1}, got "
                             f"{list(layers)}")
        if recompute_layers is None:
            recompute_layers = range(config.num_layers)
        elif any(not 0 <= i < config.num_layers for i in recompute_layers):
            raise ValueError(f"recompute_layers: expected indices in 0 .. "
                             f"{config.num_layers - 1}, got {list(recompute_layers)}")
        recomputed = set(recompute_layers)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(config, i, tp_group,
                                 recompute=recompute if i in recomputed else "none", **parallel)
            for i in layers})
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len,
                                      theta=config.rope_theta, scaling=config.rope_scaling,
                                      layout="thd", device=device)
        if pre_process:
            self.embedding = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                    tp_group, std=config.init_std,
                                                    seed=_seed(config, -1, 0), **parallel)
        if post_process:
            self.norm = ParallelRMSNorm(config.hidden_size, config.norm_eps, tp_group,
                                        **parallel)
            tied = config.tie_embeddings
            # tied: the embedding's own weight on one stage, else a copy drawn like it
            self.head = VocabParallelHead(
                config.vocab_size, config.hidden_size, tp_group, std=config.init_std,
                seed=_seed(config, -1, 0 if tied else 1),
                weight=self.embedding.weight if tied and pre_process else None,
                embedding_copy=tied and not pre_process, **parallel)

    def weight_layouts(self) -> list[WeightLayout]:
        """Every parameter of this chunk with the slices of the full model's layout-free
        tensors it holds (see :class:`WeightLayout`): what a checkpoint readable by any
        layout stores."""
        layouts = []
        for name, param in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            slices = module.full_slices(leaf)
            copy = getattr(module, "embedding_copy", False)
            module_name = "embedding" if copy else module_name
            parent, _, attribute = module_name.rpartition(".")
            parts = FUSED_PARTS.get(attribute)
            named = [(f"{parent}.{parts[s.part]}.{leaf}" if parts else f"{module_name}.{leaf}",
                      s) for s in slices]
            layouts.append(WeightLayout(name, param, named, copy))
        return layouts

    def tied_embedding_weight(self) -> nn.Parameter | None:
        """With tied embeddings split over pipeline stages: the first stage's embedding or
        the last stage's copy of it (their gradients must be summed over the two stages
        before the optimizer step); None otherwise."""
        if not self.config.tie_embeddings or (self.pre_process and self.post_process):
            return None
        if self.pre_process:
            return self.embedding.weight
        return self.head.weight if self.post_process and self.head.embedding_copy else None

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The mean next-token loss, this rank's logits, or (not the last stage) the hidden
        states for the next stage.

        Args:
            tokens: (batch, seq) int64 token ids in [0, vocab_size), the same on every rank
                of the TP group; seq divisible by tp with sequence parallelism. Later
                pipeline stages use only their shape.
            labels: (batch, seq) int64 targets in [0, vocab_size) or -100 (ignored), or
                None.
            position_ids: (batch, seq) positions in [0, max_seq_len) restarting at 0 at each
                document (packed documents), or None (each row is one document).
            hidden_states: not the first stage: the previous stage's output (seq, or
                seq / tp with sequence parallelism, batch, hidden).

        Returns:
            Last stage, with labels: the fp32 mean loss over the tokens not ignored, the
            same on every TP rank; without: logits (seq, batch, padded_vocab / tp) of this
            rank's vocabulary slice (padding columns included). Other stages: hidden states
            (seq [/ tp], batch, hidden).
        """
        for arg, ids in (("tokens", tokens), ("labels", labels), ("position_ids", position_ids)):
            if ids is not None:  # a float would be truncated or crash deep in torch
                check_index_tensor(arg, ids, tokens.device, anchor="tokens")
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected (batch, seq), got shape {tuple(tokens.shape)}")
        batch, seq = tokens.shape
        if seq > self.config.max_seq_len:
            raise ValueError(f"tokens: seq {seq} exceeds max_seq_len = "
                             f"{self.config.max_seq_len}")
        if (hidden_states is None) != self.pre_process:
            raise ValueError("hidden_states: expected on stages without the embedding, and "
                             "only there")
        self.config.check_layout(self.tp_size, self.sequence_parallel, seq)
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels: expected shape {tuple(tokens.shape)} like tokens, got "
                             f"{tuple(labels.shape)}")
        if self.check_ids and reads_allowed():
            check_token_ids(self.config, tokens if self.pre_process else None,
                            labels if self.post_process else None, position_ids)
        packed = PackedBatch.from_position_ids(position_ids, batch, seq, tokens.device)
        x = self.embedding(tokens.t()) if self.pre_process else hidden_states
        for layer in self.layers.values():
            x = layer(x, self.rotary, packed)
        if not self.post_process:
            return x
        if labels is None:
            return self.head(self.norm(x))              # (seq, batch, padded vocab / tp)
        return self.head(self.norm(x), labels.t(), fused=self.fused_loss)


def stage_chunks(config: ModelConfig, groups: ParallelGroups, *, num_chunks: int = 1,
                 layers_per_stage: Sequence[int] | None = None, sequence_parallel: bool = False,
                 device: torch.device | str | None = None,
                 check_ids: bool = True, recompute: str = "none",
                 recompute_layers: Sequence[int] | None = None, fused_loss: bool = True
                 ) -> list[LlamaModel]:
    """This rank's model chunks, one per virtual stage it holds: chunk c is virtual stage
    c · pp + pp_rank of pp · num_chunks, its layers from ``eurocore.parallel.pipeline.
    stage_layers``; the first holds the embedding, the last the head (the whole model
    without pipeline parallelism)."""
    num_stages = groups.pp_size * check_int("num_chunks", num_chunks, minimum=1)
    splits = stage_layers(config.num_layers, num_stages, layers_per_stage)
    stages = [chunk * groups.pp_size + groups.pp_rank for chunk in range(num_chunks)]
    return [LlamaModel(config, groups, sequence_parallel=sequence_parallel,
                       layers=splits[stage], pre_process=stage == 0,
                       post_process=stage == num_stages - 1, device=device,
                       check_ids=check_ids, recompute=recompute,
                       recompute_layers=recompute_layers, fused_loss=fused_loss)
            for stage in stages]


def sum_tied_embedding_grads(chunks: Sequence[LlamaModel], groups: ParallelGroups) -> None:
    """Sums the gradient of a tied embedding split over the first and last pipeline stages
    (the embedding and the head's copy), so both take the same step; a no-op otherwise."""
    for chunk in chunks:
        tied = chunk.tied_embedding_weight()
        if tied is not None:
            dist.all_reduce(local_part(tied.grad), group=groups.embedding_group)
