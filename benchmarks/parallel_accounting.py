"""Activation memory and collective traffic of one decoder layer under tensor and sequence
parallelism, measured on the CPU and set beside Megatron's formulas.

    python -m eurocore.benchmarks.parallel_accounting [--out DIR] [--seq S] [--batch B]
        [--preset NAME] [--hidden H] [--heads A] [--kv-heads G] [--ffn F] [--tp 1 2 4]
        [--recompute none selective full]

For one ``eurocore.model.llama.DecoderLayer`` (bf16 parameters and activations) and each
tensor-parallel degree t, sequence parallelism (SP) off and on, and each activation
recomputation setting, one rank of a real gloo process group reports what follows; and
for the output layer (final norm, head, loss) the same bytes with the fused linear
cross-entropy, at two vocabulary sizes, beside the logits path. Nothing here depends on the
hardware: bytes and counts, no times.

1. Activation bytes kept for backward per layer. The forward runs under
   ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is counted by
   its storage (once per storage, its ``nbytes()`` read after the forward: a saved view
   keeps its whole storage alive, so the storage is what costs memory, and a storage that
   selective recomputation emptied costs nothing until the backward). Excluded:
   parameters and anything sharing their storage, and the per-step tensors every layer
   shares (the rotary tables cos/sin, the PackedBatch position_ids and cu_seqlens), reported
   apart as ``shared_bytes_excluded``.

   Which tensors are saved depends on the op backends. On the CPU the ops run their torch
   reference, which keeps fp32 intermediates and the seq x seq attention scores; that count
   is reported as ``activation_bytes_torch_reference`` (information only). The headline
   ``activation_bytes_measured`` runs the layer through the *fused-kernel* autograd path
   that a GPU takes (the ``eurocore::rms_norm_fwd`` / ``rotary`` / ``flash_attn_fwd``
   custom ops and their ``register_autograd`` / ``autograd.Function`` wrappers), with the
   Triton launchers replaced by CPU stand-ins that compute the same outputs with the torch
   reference. What autograd saves is decided by those wrappers, not by the launchers, so
   this is exactly what the GPU path saves (flash attention: q, k, v, out and the fp32 lse;
   RMSNorm: its input and the fp32 rstd; RoPE: only the shared tables; SwiGLU: gate and
   up). Stand-ins only run forward; backward through them is never needed here.

2. Collectives per layer per training step (forward + backward) on one rank:
   ``torch.distributed.all_reduce``, ``all_gather_into_tensor`` and ``reduce_scatter_tensor``
   (the three calls ``eurocore/parallel/collectives.py`` makes) are wrapped with counters
   during one forward and one backward (torch reference backends). ``bytes`` is the
   full-size tensor of each call (the all-gather's output, the reduce-scatter's input, the
   all-reduce's buffer), Megatron's convention; ``ring_bytes`` is what one rank sends with a
   ring algorithm: (t-1)/t of it for all-gather and reduce-scatter, 2(t-1)/t for
   all-reduce. All-reduces of 1-D tensors (the RMSNorm weight gradients that SP reduces in
   backward, h elements each) are counted apart as ``all_reduce[norm weight]``. The paper
   states 4 collectives per layer each way with SP; like Megatron-LM's code, eurocore does 6
   in backward: the two column-parallel layers keep only their input's sequence shard and
   all-gather it again for the weight gradient (activation memory s·b·h/t instead of
   s·b·h per input, for one more all-gather each).

Megatron's formula (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Table 2) for a GPT layer with 16-bit activations and no stored attention
scores (selective recompute, or flash attention), s = seq, b = batch, h = hidden:

    TP:       s·b·h·(10 + 24/t) bytes        TP + SP:  s·b·h·34/t bytes

    34 = 4 (two LayerNorm inputs) + 2 (QKV input) + 4 (Q, K) + 2 (V) + 2 (output projection
    input) + 1 (its dropout mask) + 2 (MLP input) + 8 (GeLU input, 4h) + 8 (fc2 input, 4h)
    + 1 (MLP dropout mask); without SP the 10 = norms, QKV and MLP inputs and the two dropout
    masks are replicated on every rank, the other 24 split over t.

Why eurocore's Llama layer differs (every term below is checked against the measurement):

* SwiGLU instead of a 4h GeLU MLP: the gate/up output (2f wide), silu(gate) (f) and the
  down projection's input (f) are kept, 8·f/t bytes per token against Megatron's 16·h/t
  (GeLU input and fc2 input, 4h each): 22·h/t at this benchmark's f = 2.75h, 28·h/t at
  Llama-3-8B's f = 3.5h.
* GQA: k and v are g·d wide (g kv heads of head_dim d), not h.
* RMSNorm keeps an fp32 rstd per token (4 bytes/token); LayerNorm's mean/rstd are
  likewise ignored by Megatron's count. Flash attention keeps an fp32 log-sum-exp per
  (head, token): 4·a/t bytes per token.
* No dropout: Megatron's two 1-byte masks (2·s·b·h) are absent.
* With SP, the QKV and MLP inputs are kept as this rank's sequence shard (2·n·h bytes)
  and gathered again in backward, as Megatron-LM does
  (``LinearWithGradAccumulationAndAsyncCommunication``). (This benchmark first found them
  kept whole, 2·N·h each on every rank; the layer was changed.)
* ``v`` is copied out of the fused QKV output before the attention core saves it (at batch 1
  the packing is a view, and a saved view kept the whole (a + 2g)·d/t-wide output alive;
  found here and fixed). Likewise the output projection takes the core's output
  batch-major (at batch > 1 a transposed (seq, batch) view made F.linear save a copy: the
  attention output kept twice; found here and fixed).

Llama-adjusted analytic count (exact, what the tests assert; ``eurocore.model.memory``
holds it, for ``eurocore train --dry-run`` too). N = s·b tokens of the full
sequence, n = N/t tokens of the residual stream on this rank with SP (n = N without), a
heads, g kv heads, d = h/a, f = ffn width; bf16 = 2 bytes, fp32 = 4:

    attention_norm   2·n·h (input) + 4·n (rstd)
    attention.qkv    2·n·h (input: the norm's output; with SP its sequence shard)
    attention.core   q 2·N·a·d/t + k 2·N·g·d/t + v 2·N·g·d/t + out 2·N·a·d/t
                     + lse 4·N·a/t
    attention.out    0 (its input is a view of the core's out, already counted)
    mlp_norm         2·n·h + 4·n
    mlp.gate_up      2·n·h (input, as for qkv)
    mlp              gate_up output 2·N·2f/t (SwiGLU saves gate and up: views of it)
    mlp.down         2·N·f/t (input: the SwiGLU product)

Each term is charged to the module during whose forward autograd first saves it; the
per-module breakdown of both counts is in the JSON.

Recomputation (``--recompute``, ``eurocore.model.llama.DecoderLayer``): ``selective`` keeps
neither norm output (attention.qkv, mlp.gate_up: 0) nor the SwiGLU product (mlp.down: 0);
each is computed again in the backward from what its op keeps anyway. ``full`` keeps the
layer's input, 2·n·h, and while one layer is recomputed in the backward it holds that
layer's ``none`` bytes again (``recompute_peak_bytes``). The goals the tests assert: with
TP + SP, ``selective`` keeps at most 0.75 × Megatron's 34·s·b·h/t; ``full`` exactly 2·s·b·h/t.

The output layer + loss (``eurocore.parallel.VocabParallelHead`` with the fused linear
cross-entropy) keeps the final norm's input and rstd, the head's (gathered) input, the
labels, an fp32 lse per token and one count: O(s·b·h), the same at any vocabulary, where
Megatron's 4·s·b·h·(1 + v/h) and eurocore's logits path grow with v.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eurocore.model.config import PRESETS, ModelConfig, preset
from eurocore.model.llama import RECOMPUTE, DecoderLayer, PackedBatch
from eurocore.model.memory import llama_analytic_bytes, output_layer_analytic_bytes
from eurocore.nn import RotaryEmbedding
from eurocore.ops import activation as activation_op
from eurocore.ops import attention as attention_op
from eurocore.ops import normalization as normalization_op
from eurocore.ops import rotary as rotary_op
from eurocore.parallel import ParallelRMSNorm, VocabParallelHead
from eurocore.parallel.collectives import ALL_GATHER, REDUCE_SCATTER
from eurocore.utils.checks import check_int
from eurocore.utils.files import check_writable_dir, write_json_atomically

from . import harness, pipeline_timeline

DEFAULT_OUT = "benchmarks/results"
# The default layer: small enough for a 2-core CPU in a few minutes, large enough that the
# per-token terms dominate as in a real model. The counts scale with s·b·h. The vocabulary
# is Llama-3's: the output layer's logits path grows with it, the fused loss does not.
DEFAULT_SHAPE = {"hidden_size": 1024, "num_heads": 16, "num_kv_heads": 8,
                 "ffn_hidden_size": 2816, "vocab_size": 128256}
DEFAULT_SEQ, DEFAULT_BATCH, DEFAULT_TP = 512, 1, (1, 2, 4)
DTYPE = torch.bfloat16
# The torch.distributed functions eurocore's collectives call, by the name reported here.
COLLECTIVES = {"all_reduce": "all_reduce", ALL_GATHER: "all_gather_into_tensor",
               REDUCE_SCATTER: "reduce_scatter_tensor"}
NORM_WEIGHT_ALL_REDUCE = "all_reduce[norm weight]"


@dataclass(frozen=True)
class Setting:
    """One layout: the tensor-parallel degree, whether sequence parallelism is on, and the
    layer's activation recomputation (``eurocore.model.llama.RECOMPUTE``)."""

    tp: int
    sequence_parallel: bool
    recompute: str = "none"


# -------------------------------------------------------------------------------------------
# The formulas
# -------------------------------------------------------------------------------------------

# The Llama-adjusted counts, llama_analytic_bytes and output_layer_analytic_bytes, live with
# the model (eurocore.model.memory: the trainer's --dry-run uses them too) and are imported
# above under their names; this benchmark measures them. Megatron's formulas stay here.


def megatron_formula_bytes(seq: int, batch: int, hidden: int, tp: int,
                           sequence_parallel: bool) -> float:
    """Megatron's activation bytes per layer and rank without stored attention scores
    (Korthikanti et al. 2022, Table 2): s·b·h·34/t with SP, s·b·h·(10 + 24/t) without."""
    sbh = seq * batch * hidden
    return sbh * 34 / tp if sequence_parallel else sbh * (10 + 24 / tp)


def megatron_output_layer_bytes(seq: int, batch: int, hidden: int, vocab: int) -> float:
    """Megatron's output layer + loss term (Korthikanti et al. 2022): 4·s·b·h·(1 + v/h),
    the fp32 logits' 4·s·b·v being most of it, on one rank without parallelism."""
    return 4 * seq * batch * hidden * (1 + vocab / hidden)


def megatron_collectives(seq: int, batch: int, hidden: int, tp: int,
                         sequence_parallel: bool) -> dict[str, dict[str, dict[str, int]]]:
    """The collectives per layer Megatron's paper states, each of s·b·h bf16 elements:
    with SP 2 all-gathers + 2 reduce-scatters forward and the same backward (Megatron-LM's
    code adds 2 all-gathers in backward, re-gathering the saved input shards); without SP
    2 all-reduces forward and 2 backward. None for t = 1."""
    if tp == 1:
        return {"forward": {}, "backward": {}}
    size = 2 * seq * batch * hidden
    if sequence_parallel:
        ops = {"all_gather_into_tensor": {"count": 2, "bytes": 2 * size},
               "reduce_scatter_tensor": {"count": 2, "bytes": 2 * size}}
    else:
        ops = {"all_reduce": {"count": 2, "bytes": 2 * size}}
    return {"forward": ops, "backward": {k: dict(v) for k, v in ops.items()}}


# -------------------------------------------------------------------------------------------
# Counting saved tensors
# -------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    """The storage's identity (its StorageImpl): unlike its data pointer, it stays unique
    when a storage is emptied and the allocator hands its bytes to another."""
    return t.untyped_storage()._cdata


class SavedTensorCounter:
    """Counts the storage bytes autograd keeps for backward from what is saved while active,
    once per storage, charged to the innermost module running when it is first saved.

    Sizes are read when asked (after the forward), not when saved: selective recomputation
    empties some saved storages once their consumer has run, and those then count 0.

    Args:
        modules: ``{name: module}`` whose forwards are tracked (saves outside them go to
            ``"<outside>"``).
        parameters: tensors never counted, nor anything sharing their storage.
        shared: tensors shared by every layer (rotary tables, packed positions): counted
            apart, in :attr:`shared_bytes`.
    """

    def __init__(self, modules: dict[str, nn.Module], parameters: Sequence[torch.Tensor],
                 shared: Sequence[torch.Tensor] = ()) -> None:
        self.modules = modules
        self.parameter_storages = {_storage_key(p) for p in parameters}
        self.shared_storages = {_storage_key(t) for t in shared if t is not None}
        self.seen: set[int] = set()
        # (owner or None for shared, storage): the storages themselves, so their sizes can
        # be read after the forward
        self._saved: list[tuple[str | None, torch.UntypedStorage]] = []
        self._stack: list[str] = []

    @property
    def by_module(self) -> dict[str, int]:
        """Bytes kept per module, modules keeping nothing left out."""
        counts: dict[str, int] = {}
        for owner, storage in self._saved:
            if owner is not None and storage.nbytes():
                counts[owner] = counts.get(owner, 0) + storage.nbytes()
        return counts

    @property
    def shared_bytes(self) -> int:
        """Bytes of the shared tensors saved."""
        return sum(storage.nbytes() for owner, storage in self._saved if owner is None)

    @property
    def total(self) -> int:
        """Activation bytes kept (shared tensors excluded)."""
        return sum(self.by_module.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if isinstance(t, nn.Parameter) or key in self.parameter_storages or key in self.seen:
            return t
        self.seen.add(key)
        if key in self.shared_storages:
            self._saved.append((None, t.untyped_storage()))
        else:
            owner = self._stack[-1] if self._stack else "<outside>"
            self._saved.append((owner, t.untyped_storage()))
        return t

    @contextlib.contextmanager
    def active(self) -> Iterator[SavedTensorCounter]:
        """Counts inside the block."""
        handles = []
        for name, module in self.modules.items():
            def enter(_module, _args, name=name):
                self._stack.append(name)

            def leave(_module, _args, _output):
                self._stack.pop()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def layer_modules(layer: DecoderLayer, rotary: RotaryEmbedding) -> dict[str, nn.Module]:
    """The layer's submodules by their dotted names (the layer itself as ``"layer"``) and the
    rotary module, which the layer calls but does not own."""
    modules = {name or "layer": module for name, module in layer.named_modules()}
    modules["rotary"] = rotary
    return modules


def saved_tensor_counter(layer: DecoderLayer, rotary: RotaryEmbedding,
                         packed: PackedBatch) -> SavedTensorCounter:
    """A counter for ``layer``'s forward: its parameters skipped, the rotary tables and the
    packed-batch tensors counted as shared."""
    return SavedTensorCounter(layer_modules(layer, rotary), list(layer.parameters()),
                              shared=[rotary.cos, rotary.sin, packed.position_ids,
                                      packed.cu_seqlens])


def count_saved_bytes(layer: DecoderLayer, x: torch.Tensor, rotary: RotaryEmbedding,
                      packed: PackedBatch) -> SavedTensorCounter:
    """Runs ``layer(x, rotary, packed)`` forward once and returns the counter of what it
    saved for backward (the graph is dropped afterwards)."""
    counter = saved_tensor_counter(layer, rotary, packed)
    with counter.active():
        out = layer(x, rotary, packed)
    del out
    return counter


# -------------------------------------------------------------------------------------------
# Op backends: the torch reference, or the fused-kernel path with CPU stand-in launchers
# -------------------------------------------------------------------------------------------


def _rms_norm_fwd_stand_in(x, weight, residual, eps, zero_centered_weight, y, h, rstd) -> None:
    """``eurocore.kernels.rms_norm.rms_norm_fwd`` on the CPU: the same outputs."""
    hx = x if residual is None else x + residual
    hf = hx.float()
    inv = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = (hf * inv).to(y.dtype)
    if weight is not None:
        scale = weight.float() + (1.0 if zero_centered_weight else 0.0)
        out = (out.float() * scale).to(y.dtype)
    y.copy_(out)
    rstd.copy_(inv.view(-1))
    if h is not None:
        h.copy_(hx)


def _rotary_stand_in(q, k, out_q, out_k, cos, sin, positions, layout, interleaved, conjugate,
                     backend, in_place=False) -> None:
    """``eurocore.ops.rotary._launch`` on the CPU: the same rotation into out_q, out_k (which
    are q and k when ``in_place``), at the op's normalised positions."""
    rotated_q, rotated_k = rotary_op.rotate_reference(
        q, k, cos, -sin if conjugate else sin, positions, layout, interleaved)
    out_q.copy_(rotated_q)
    if k is not None:
        out_k.copy_(rotated_k)


def _flash_attn_fwd_stand_in(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             softmax_scale, window, softcap) -> None:
    """``eurocore.kernels.flash_attention.flash_attn_fwd`` on the CPU: the same out and lse.
    q, k, v, out arrive 4-D, packed as batch 1."""
    options = {"softmax_scale": softmax_scale, "window_size": window, "softcap": softcap}
    if cu_seqlens_q is not None:
        o, m = attention_op.attention_varlen_reference(q[0], k[0], v[0], cu_seqlens_q,
                                                       cu_seqlens_k, **options)
        out[0].copy_(o)
    else:
        o, m = attention_op.attention_reference(q, k, v, **options)
        out.copy_(o)
    lse.copy_(m)


def _no_backward(*_args, **_kwargs):
    raise NotImplementedError("the CPU stand-ins of the fused kernels run forward only")


def _swiglu_fwd_stand_in(gate, up, y) -> None:
    """``eurocore.kernels.swiglu.swiglu_fwd`` on the CPU: the same output."""
    y.copy_(activation_op.swiglu_reference(gate, up))


_STAND_INS = {
    "normalization": types.SimpleNamespace(rms_norm_fwd=_rms_norm_fwd_stand_in,
                                           rms_norm_bwd=_no_backward),
    "attention": types.SimpleNamespace(flash_attn_fwd=_flash_attn_fwd_stand_in,
                                       flash_attn_bwd=_no_backward),
    "activation": types.SimpleNamespace(swiglu_fwd=_swiglu_fwd_stand_in,
                                        swiglu_bwd=_no_backward),
}


@contextlib.contextmanager
def op_backends(kind: str) -> Iterator[None]:
    """Inside the block every RMSNorm, RoPE, attention and SwiGLU call takes one path:

    ``"torch"``: the torch reference (what the CPU runs anyway). ``"fused"``: the kernel
    backends' custom ops and autograd wrappers, with CPU stand-in launchers (forward only).
    """
    if kind not in ("torch", "fused"):
        raise ValueError(f"kind: expected 'torch' or 'fused', got {kind!r}")
    name = "torch" if kind == "torch" else "triton"
    with contextlib.ExitStack() as stack:
        for module in (normalization_op, rotary_op, attention_op, activation_op):
            stack.enter_context(mock.patch.object(module, "resolve_backend",
                                                  lambda *args, **kwargs: name))
        if kind == "fused":
            stack.enter_context(mock.patch.object(normalization_op, "_launchers",
                                                  lambda _b: _STAND_INS["normalization"]))
            stack.enter_context(mock.patch.object(attention_op, "_launchers",
                                                  lambda _b: _STAND_INS["attention"]))
            stack.enter_context(mock.patch.object(activation_op, "_launchers",
                                                  lambda _b: _STAND_INS["activation"]))
            stack.enter_context(mock.patch.object(rotary_op, "_launch", _rotary_stand_in))
        yield


# -------------------------------------------------------------------------------------------
# Counting collectives
# -------------------------------------------------------------------------------------------


class CollectiveCounter:
    """Counts the calls to ``torch.distributed``'s all_reduce, all_gather_into_tensor and
    reduce_scatter_tensor while active, per phase (set :attr:`phase` to "forward" or
    "backward"), with the full-size tensor's bytes and the bytes a rank sends in a ring."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.phase = "forward"
        self.calls: dict[str, dict[str, dict[str, int]]] = {"forward": {}, "backward": {}}

    def _record(self, op: str, full: torch.Tensor) -> None:
        name = NORM_WEIGHT_ALL_REDUCE if op == "all_reduce" and full.dim() == 1 else op
        nbytes = full.numel() * full.element_size()
        share = (self.world_size - 1) / self.world_size
        ring = round(nbytes * share * (2 if op == "all_reduce" else 1))
        entry = self.calls[self.phase].setdefault(name, {"count": 0, "bytes": 0,
                                                         "ring_bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
        entry["ring_bytes"] += ring

    def _wrap(self, function: str, original: Callable) -> Callable:
        op = COLLECTIVES[function]

        def counted(*args, **kwargs):
            if op == "all_reduce":
                full = args[0] if args else kwargs["tensor"]
            elif op == "all_gather_into_tensor":
                full = args[0] if args else kwargs["output_tensor"]
            else:  # reduce_scatter_tensor(output, input): the input is the full tensor
                full = args[1] if len(args) > 1 else kwargs["input"]
            self._record(op, full)
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def active(self) -> Iterator[CollectiveCounter]:
        """Counts inside the block."""
        with contextlib.ExitStack() as stack:
            for function in COLLECTIVES:
                counted = self._wrap(function, getattr(dist, function))
                stack.enter_context(mock.patch.object(dist, function, counted))
            yield self


# -------------------------------------------------------------------------------------------
# One rank, one setting
# -------------------------------------------------------------------------------------------


def build_layer(config: ModelConfig, seq: int, batch: int, tp_group: dist.ProcessGroup | None,
                sequence_parallel: bool, recompute: str = "none"
                ) -> tuple[DecoderLayer, torch.Tensor, RotaryEmbedding, PackedBatch]:
    """Layer 0 in bf16 on the CPU, this rank's input x (seq / t with SP, batch, hidden)
    requiring grad, the shared rotary module and the packed-batch bounds (one document
    per row), as ``LlamaModel`` builds them."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    config.check_layout(tp, sequence_parallel, seq)
    device = torch.device("cpu")
    layer = DecoderLayer(config, 0, tp_group, sequence_parallel=sequence_parallel,
                         recompute=recompute, device=device, dtype=DTYPE)
    rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, theta=config.rope_theta,
                             scaling=config.rope_scaling, layout="thd", device=device)
    packed = PackedBatch.from_position_ids(None, batch, seq, device)
    return layer, _layer_input(config, seq, batch, tp_group, sequence_parallel), rotary, packed


def _layer_input(config: ModelConfig, seq: int, batch: int,
                 tp_group: dist.ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """This rank's bf16 residual stream (seq, or seq / t with SP, batch, hidden), requiring
    grad."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_seq = seq // tp if sequence_parallel else seq
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(local_seq, batch, config.hidden_size, generator=gen).to(DTYPE)
    return x.requires_grad_()


def measure_setting(config: ModelConfig, seq: int, batch: int,
                    tp_group: dist.ProcessGroup | None, sequence_parallel: bool,
                    recompute: str = "none") -> dict[str, Any]:
    """This rank's measurements for one layout: kept bytes on the fused-kernel path and
    (without recomputation) on the torch reference, and the collectives of one forward +
    backward (torch reference). Collectives are real: every rank of ``tp_group`` must call
    this together."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    layer, x, rotary, packed = build_layer(config, seq, batch, tp_group, sequence_parallel,
                                           recompute)
    with op_backends("fused"):
        fused = count_saved_bytes(layer, x, rotary, packed)
    result = {
        "activation_bytes_measured": fused.total,
        "activation_by_module_measured": dict(sorted(fused.by_module.items())),
        "shared_bytes_excluded": fused.shared_bytes,
    }
    if recompute != "none":
        return result
    reference = saved_tensor_counter(layer, rotary, packed)
    counter = CollectiveCounter(tp)
    with op_backends("torch"), counter.active():
        with reference.active():
            out = layer(x, rotary, packed)
        counter.phase = "backward"
        out.backward(torch.ones_like(out))
    return {
        **result,
        "activation_bytes_torch_reference": reference.total,
        "activation_by_module_torch_reference": dict(sorted(reference.by_module.items())),
        "collectives": counter.calls,
    }


def measure_output_layer(config: ModelConfig, seq: int, batch: int,
                         tp_group: dist.ProcessGroup | None, sequence_parallel: bool
                         ) -> dict[str, Any]:
    """Bytes this rank's final norm + head + loss keep for backward (fused-kernel path):
    with the fused linear cross-entropy at the config's vocabulary and at twice it, and
    with the logits path (``fused=False``). Every rank of ``tp_group`` calls this together
    (the loss exchanges per-token numbers)."""
    x = _layer_input(config, seq, batch, tp_group, sequence_parallel)
    result = {}
    for name, vocab, fused in (("fused", config.vocab_size, True),
                               ("fused_double_vocab", 2 * config.vocab_size, True),
                               ("logits", config.vocab_size, False)):
        norm = ParallelRMSNorm(config.hidden_size, config.norm_eps, tp_group,
                               sequence_parallel=sequence_parallel, dtype=DTYPE)
        head = VocabParallelHead(vocab, config.hidden_size, tp_group,
                                 sequence_parallel=sequence_parallel, dtype=DTYPE)
        labels = torch.randint(0, vocab, (seq, batch), generator=torch.Generator().manual_seed(3))
        counter = SavedTensorCounter({"norm": norm, "head": head},
                                     [*norm.parameters(), *head.parameters()])
        with op_backends("fused"), counter.active():
            loss = head(norm(x), labels, fused=fused)
        del loss
        result[name] = {"bytes": counter.total, "vocab_size": vocab,
                        "by_module": dict(sorted(counter.by_module.items()))}
    return result


def _worker(rank: int, world_size: int, port: int, config: ModelConfig, seq: int, batch: int,
            settings: Sequence[Setting], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = [_measure_one(config, seq, batch, dist.group.WORLD, s) for s in settings]
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _measure_one(config: ModelConfig, seq: int, batch: int,
                 tp_group: dist.ProcessGroup | None, setting: Setting) -> dict[str, Any]:
    """The layer's measurements; with no recomputation, the output layer's too."""
    result = measure_setting(config, seq, batch, tp_group, setting.sequence_parallel,
                             setting.recompute)
    if setting.recompute == "none":
        result["output_layer"] = measure_output_layer(config, seq, batch, tp_group,
                                                      setting.sequence_parallel)
    return result


def run_tp(config: ModelConfig, seq: int, batch: int, tp: int,
           settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """Measures each of ``settings`` (all at tensor-parallel degree ``tp``): in this process
    for tp = 1, else in ``tp`` spawned processes joined in a gloo group. Returns rank 0's
    results; raises if the ranks disagree (they are symmetric)."""
    if tp == 1:
        return [_measure_one(config, seq, batch, None, s) for s in settings]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tp, harness.free_port(), config, seq, batch, list(settings),
                                tmp), nprocs=tp, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(tp)]
    for rank, results in enumerate(ranks[1:], start=1):
        if results != ranks[0]:
            raise RuntimeError(f"rank {rank}'s counts differ from rank 0's at tp = {tp}")
    return ranks[0]


def selective_goal_bytes(seq: int, batch: int, hidden: int, tp: int) -> float:
    """The goal for ``selective`` with TP + SP: 0.75 × Megatron's 34·s·b·h/t."""
    return 0.75 * megatron_formula_bytes(seq, batch, hidden, tp, True)


def measure(config: ModelConfig, seq: int, batch: int,
            settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """One row per setting: the measurements next to the Megatron formula and the
    Llama-adjusted analytic count, the goals, and (no recomputation) the output layer."""
    rows = []
    sbh = seq * batch * config.hidden_size
    for tp in sorted({s.tp for s in settings}):
        chosen = [s for s in settings if s.tp == tp]
        for setting, result in zip(chosen, run_tp(config, seq, batch, tp, chosen),
                                   strict=True):
            sp = setting.sequence_parallel
            analytic = llama_analytic_bytes(config, seq, batch, tp, sp, setting.recompute)
            megatron = megatron_formula_bytes(seq, batch, config.hidden_size, tp, sp)
            measured = result["activation_bytes_measured"]
            row = {
                "tp": tp,
                "sequence_parallel": sp,
                "recompute": setting.recompute,
                "activation_bytes_measured": measured,
                "llama_analytic_bytes": sum(analytic.values()),
                "megatron_formula_bytes": megatron,
                "measured_over_megatron": measured / megatron,
                "measured_per_sbh": measured / sbh,
                "activation_by_module_analytic": analytic,
                **{k: v for k, v in result.items()
                   if k not in ("activation_bytes_measured", "output_layer")},
            }
            if setting.recompute == "none":
                row["megatron_collectives"] = megatron_collectives(
                    seq, batch, config.hidden_size, tp, sp)
                output = result["output_layer"]
                output["analytic_bytes"] = sum(output_layer_analytic_bytes(
                    config, seq, batch, tp, sp).values())
                output["megatron_bytes"] = megatron_output_layer_bytes(
                    seq, batch, config.hidden_size, config.vocab_size)
                row["output_layer"] = output
            if setting.recompute == "full":
                row["recompute_peak_bytes"] = sum(llama_analytic_bytes(
                    config, seq, batch, tp, sp).values())
            if setting.recompute == "selective" and sp:
                row["goal_bytes"] = selective_goal_bytes(seq, batch, config.hidden_size, tp)
                row["meets_goal"] = measured <= row["goal_bytes"]
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f}"


def format_activation_table(rows: Sequence[dict[str, Any]], sbh: int) -> str:
    """Measured, analytic and Megatron bytes per layer and rank, in MiB and per s·b·h."""
    header = (f"{'recompute':>9} {'t':>2} {'SP':>3} | {'measured':>9} {'analytic':>9} "
              f"{'exact':>5} | {'Megatron':>9} {'ratio':>6} | {'/sbh':>6} "
              f"{'Megatron/sbh':>12} | {'goal/sbh':>8} | {'torch ref':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        exact = "yes" if r["activation_bytes_measured"] == r["llama_analytic_bytes"] else "NO"
        goal = (f"{r['goal_bytes'] / sbh:>7.2f}{'' if r['meets_goal'] else '!'}"
                if "goal_bytes" in r else "")
        reference = r.get("activation_bytes_torch_reference")
        lines.append(
            f"{r['recompute']:>9} {r['tp']:>2} {'on' if r['sequence_parallel'] else 'off':>3} | "
            f"{_mib(r['activation_bytes_measured']):>9} {_mib(r['llama_analytic_bytes']):>9} "
            f"{exact:>5} | {_mib(r['megatron_formula_bytes']):>9} "
            f"{r['measured_over_megatron']:>6.3f} | {r['measured_per_sbh']:>6.2f} "
            f"{r['megatron_formula_bytes'] / sbh:>12.2f} | {goal:>8} | "
            f"{_mib(reference) if reference is not None else '':>9}")
    return "\n".join(lines)


def format_output_layer_table(rows: Sequence[dict[str, Any]], sbh: int) -> str:
    """The output layer + loss per layout: fused linear-CE (at v and 2v), the logits path
    and Megatron's 4·s·b·h·(1 + v/h), in MiB and per s·b·h."""
    header = (f"{'t':>2} {'SP':>3} | {'fused':>8} {'exact':>5} {'fused 2v':>8} | "
              f"{'logits':>8} | {'Megatron':>8} | {'fused/sbh':>9} {'logits/sbh':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "output_layer" not in r:
            continue
        o = r["output_layer"]
        exact = "yes" if o["fused"]["bytes"] == o["analytic_bytes"] else "NO"
        lines.append(
            f"{r['tp']:>2} {'on' if r['sequence_parallel'] else 'off':>3} | "
            f"{_mib(o['fused']['bytes']):>8} {exact:>5} "
            f"{_mib(o['fused_double_vocab']['bytes']):>8} | {_mib(o['logits']['bytes']):>8} | "
            f"{_mib(o['megatron_bytes']):>8} | {o['fused']['bytes'] / sbh:>9.2f} "
            f"{o['logits']['bytes'] / sbh:>10.2f}")
    return "\n".join(lines)


def format_collective_table(rows: Sequence[dict[str, Any]], sbh: int) -> str:
    """Per layout and phase: each collective's count and bytes (full-size tensor, in units
    of s·b·h bf16 elements), next to Megatron's."""
    header = (f"{'t':>2} {'SP':>3} {'phase':>8} | {'collective':<24} {'count':>5} "
              f"{'bytes':>10} {'x 2sbh':>7} {'ring bytes':>10} | {'Megatron':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["tp"] == 1 or "collectives" not in r:
            continue
        for phase in ("forward", "backward"):
            calls = r["collectives"][phase]
            expected = r["megatron_collectives"][phase]
            for name in sorted(set(calls) | set(expected)):
                c = calls.get(name, {"count": 0, "bytes": 0, "ring_bytes": 0})
                e = expected.get(name, {"count": 0})
                lines.append(
                    f"{r['tp']:>2} {'on' if r['sequence_parallel'] else 'off':>3} "
                    f"{phase:>8} | {name:<24} {c['count']:>5} {c['bytes']:>10} "
                    f"{c['bytes'] / (2 * sbh):>7.3f} {c['ring_bytes']:>10} | "
                    f"{e['count']:>8}")
    return "\n".join(lines)


def write_json(payload: dict[str, Any], out_dir: str | os.PathLike[str], date: str) -> Path:
    """Writes ``<out_dir>/parallel-accounting-<date>.json`` atomically; returns its path."""
    path = Path(out_dir) / f"parallel-accounting-{date}.json"
    return write_json_atomically(payload, path)


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The preset named by ``--preset`` (default: ``tiny`` reshaped to DEFAULT_SHAPE) with
    the size flags applied, its max_seq_len raised to ``--seq`` if shorter."""
    overrides = dict(DEFAULT_SHAPE) if args.preset is None else {}
    for flag, field in (("hidden", "hidden_size"), ("heads", "num_heads"),
                        ("kv_heads", "num_kv_heads"), ("ffn", "ffn_hidden_size"),
                        ("vocab", "vocab_size")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    name = args.preset or "tiny"
    overrides["max_seq_len"] = max(PRESETS[name].max_seq_len if name in PRESETS else 0,
                                   args.seq)
    return preset(name, **overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eurocore.benchmarks.parallel_accounting",
        description="Activation bytes saved for backward and collectives per decoder layer "
                    "under tensor and sequence parallelism (CPU, gloo), next to Megatron's "
                    "formulas and an exact Llama-adjusted count.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the JSON goes (default: {DEFAULT_OUT})")
    parser.add_argument("--no-json", action="store_true", help="print only")
    parser.add_argument("--seq", type=int, default=DEFAULT_SEQ,
                        help=f"sequence length (default {DEFAULT_SEQ})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"micro-batch size (default {DEFAULT_BATCH})")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default: 'tiny' with hidden 1024, 16 heads, "
                             "8 kv heads, ffn 2816, vocabulary 128256)")
    parser.add_argument("--hidden", type=int, default=None, help="override hidden_size")
    parser.add_argument("--heads", type=int, default=None, help="override num_heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="override num_kv_heads")
    parser.add_argument("--ffn", type=int, default=None, help="override ffn_hidden_size")
    parser.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    parser.add_argument("--tp", type=int, nargs="+", default=list(DEFAULT_TP),
                        help="tensor-parallel degrees (default: 1 2 4)")
    parser.add_argument("--recompute", nargs="+", default=list(RECOMPUTE), choices=RECOMPUTE,
                        help="activation recomputation settings (default: all)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip the pipeline timeline (PP 2 and 4, with and without "
                             "virtual stages)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measures every (recompute, t, SP) setting, prints the tables and writes the JSON."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        for option, value in (("--seq", args.seq), ("--batch", args.batch),
                              *(("--tp", t) for t in args.tp)):
            check_int(option, value, minimum=1)
        config = config_from_args(args)
        settings = [Setting(t, sp, recompute) for recompute in args.recompute
                    for t in args.tp for sp in ((False,) if t == 1 else (False, True))]
        for s in settings:
            config.check_layout(s.tp, s.sequence_parallel, args.seq)
        if not args.no_json:
            check_writable_dir("--out", args.out)
    except ValueError as err:
        parser.error(str(err))
    sbh = args.seq * args.batch * config.hidden_size
    print(f"layer: hidden {config.hidden_size}, heads {config.num_heads}, kv heads "
          f"{config.num_kv_heads}, head_dim {config.head_dim}, ffn {config.ffn_hidden_size}; "
          f"seq {args.seq}, batch {args.batch}; bf16", flush=True)
    rows = measure(config, args.seq, args.batch, settings)
    print("\nActivation bytes saved for backward per layer, one rank (MiB; fused-kernel "
          "path, flash attention)")
    print(format_activation_table(rows, sbh))
    print(f"\nOutput layer + loss, one rank (MiB; vocabulary {config.vocab_size})")
    print(format_output_layer_table(rows, sbh))
    print("\nCollectives per layer, one rank, one forward + backward (bytes: full-size "
          "tensor per call, summed)")
    print(format_collective_table(rows, sbh))
    pipeline = [] if args.no_pipeline else pipeline_timeline.measure()
    if pipeline:
        print("\n" + pipeline_timeline.format_table(pipeline))
    if not args.no_json:
        date = dt.date.today().isoformat()
        payload = {
            "benchmark": "parallel_accounting",
            "date": date,
            "torch": torch.__version__,
            "command": " ".join(["python -m eurocore.benchmarks.parallel_accounting",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "config": {"preset": args.preset or "tiny", **dataclasses.asdict(config),
                       "seq": args.seq, "batch": args.batch, "dtype": "bfloat16"},
            "method": {
                "activation_bytes_measured": "storages saved by autograd in one forward on "
                    "the fused-kernel path (eurocore's custom ops and autograd wrappers, CPU "
                    "stand-in launchers): flash attention saves q, k, v, out, lse",
                "activation_bytes_torch_reference": "the same on the torch reference "
                    "backends (materialised seq x seq scores, fp32 intermediates)",
                "excluded": "parameters and views of them; rotary tables and packed "
                    "positions / cu_seqlens (shared by all layers): shared_bytes_excluded",
                "collectives": "torch.distributed calls in one forward + backward; bytes: "
                    "full-size tensor (all-gather output, reduce-scatter input, all-reduce "
                    "buffer); ring_bytes: sent per rank by a ring algorithm",
                "pipeline": "eurocore.benchmarks.pipeline_timeline: the schedule runner on "
                    "gloo with sleeping steps; idle fraction per stage from its trace",
            },
            "rows": rows,
            "pipeline": pipeline,
        }
        path = write_json(payload, args.out, date)
        print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
