"""Attention module: the swap point models call for the attention core (softmax(QKᵀ)V)."""

from __future__ import annotations

import torch
from torch import nn

from eurocore.ops import flash_attention, flash_attention_varlen
from eurocore.ops.attention import check_attention_options
from eurocore.ops.backends import check_backend_name


class FlashAttention(nn.Module):
    """The attention core of a layer, fixed at construction, over
    :func:`eurocore.ops.flash_attention` / :func:`eurocore.ops.flash_attention_varlen`.

    No parameters: projections, rotary embeddings and the output projection belong to the
    model. ``forward(q, k, v)`` takes (batch, seq, heads, head_dim) tensors, as
    ``flash_attn_func``; with ``cu_seqlens`` it takes packed (total_tokens, heads, head_dim)
    tensors of documents that attend only within themselves, as ``flash_attn_varlen_func``
    with the same boundaries for queries and keys (self-attention over a packed batch).

    Args:
        causal: mask future keys (bottom-right aligned when lengths differ).
        softmax_scale: None is 1 / sqrt(head_dim).
        window_size: (left, right) sliding window, -1 for unbounded.
        softcap: > 0 caps scores to ``softcap · tanh(s / softcap)``.
        backend: fixes the op backend for this module (None: chosen per call).

    The options are checked here, at construction, as the op checks them.
    """

    def __init__(
        self,
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_attention_options(causal, softmax_scale, window_size, softcap)
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = tuple(window_size)
        self.softcap = softcap
        self.backend = check_backend_name(backend)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Attention output shaped like q.

        Args:
            q: (batch, seq, heads, head_dim), or packed (total_tokens, heads, head_dim).
            k, v: like q with kv_heads heads (heads divisible by kv_heads).
            cu_seqlens: packed only: int32 (documents + 1,) boundaries, shared by q and k.
            max_seqlen: packed only: the longest document (computed when None, which reads
                cu_seqlens from the device once).
        """
        options = dict(causal=self.causal, softmax_scale=self.softmax_scale,
                       window_size=self.window_size, softcap=self.softcap, backend=self.backend)
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError("max_seqlen: only packed inputs (with cu_seqlens) take it")
            return flash_attention(q, k, v, **options)
        if max_seqlen is None:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_seqlen = int(lengths.max()) if lengths.numel() else 0
        return flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      **options)

    def extra_repr(self) -> str:
        parts = [f"causal={self.causal}"]
        if self.softmax_scale is not None:
            parts.append(f"softmax_scale={self.softmax_scale}")
        if self.window_size != (-1, -1):
            parts.append(f"window_size={self.window_size}")
        if self.softcap:
            parts.append(f"softcap={self.softcap}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
