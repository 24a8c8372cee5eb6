"""flash-attn 2's entry points over eurocore's attention, a drop-in for its imports.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func
    from eurocore.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

    out = flash_attn_func(q, k, v, 0.0, None, True)     # positional, as flash-attn's
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

The signatures are flash-attn 2.8.3's (``flash_attn/flash_attn_interface.py`` at tag
v2.8.3.post1, the newest 2.x release; unchanged on its main branch, 2.8.4): the same
parameter names, order and defaults, so positional and keyword calls written for flash-attn
work unchanged. Both functions call :func:`eurocore.ops.flash_attention` and
:func:`eurocore.ops.flash_attention_varlen` (the same checks, backend choice and autograd;
the backend comes from ``EUROCORE_BACKEND``, else auto, as for any call without
``backend=``). The semantics are flash-attn 2's; see :mod:`eurocore.ops.attention`.

Not supported, refused with ``NotImplementedError`` naming the argument before any work:
attention dropout (``dropout_p > 0``), ALiBi (``alibi_slopes``), returning the attention
probabilities (``return_attn_probs=True``) and a paged KV cache (``block_table``). So both
return ``out`` alone, as flash-attn does without ``return_attn_probs``. ``deterministic`` is
accepted either way: eurocore's backward is always deterministic.
"""

from __future__ import annotations

import torch

from eurocore.ops.attention import flash_attention, flash_attention_varlen
from eurocore.utils.checks import check_bool, check_number

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor:
    """flash-attn 2's ``flash_attn_func``: attention over (batch, seq, heads, head_dim).

    Args:
        q: (batch, seqlen_q, heads, head_dim); float16 or bfloat16 (float32 accepted;
            float64 on the torch backend).
        k, v: (batch, seqlen_k, kv_heads, head_dim), q's dtype and device; heads divisible
            by kv_heads (GQA/MQA).
        dropout_p: must be 0.0 (eurocore has no attention dropout).
        softmax_scale: None is 1 / sqrt(head_dim).
        causal: mask keys after the query, aligned to the bottom-right.
        window_size: (left, right) sliding window, -1 for unbounded on that side.
        softcap: > 0 caps scores to ``softcap · tanh(s / softcap)``; 0.0 is off.
        alibi_slopes: must be None (ALiBi is not supported).
        deterministic: accepted, True or False; eurocore's backward is always deterministic.
        return_attn_probs: must be False (the probabilities are never materialised).

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype.

    Raises:
        NotImplementedError: an unsupported argument, named in the message.
        TypeError, ValueError: from :func:`eurocore.ops.flash_attention`, naming the argument.
    """
    _refuse_unsupported(dropout_p, alibi_slopes, return_attn_probs, block_table=None)
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                           window_size=window_size, softcap=softcap,
                           deterministic=deterministic)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn 2's ``flash_attn_varlen_func``: attention over packed sequences, each
    attending only within itself (masks aligned per sequence).

    Args:
        q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim); dtypes as
            :func:`flash_attn_func`.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (sequences + 1,): 0 first,
            non-decreasing, total_q / total_k last.
        max_seqlen_q, max_seqlen_k: int upper bounds of the sequence lengths.
        block_table: must be None (no paged KV cache).
        The rest as :func:`flash_attn_func`.

    Returns:
        out (total_q, heads, head_dim) in q's dtype.

    Raises:
        NotImplementedError: an unsupported argument, named in the message.
        TypeError, ValueError: from :func:`eurocore.ops.flash_attention_varlen`, naming the
            argument.
    """
    _refuse_unsupported(dropout_p, alibi_slopes, return_attn_probs, block_table)
    return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                  window_size=window_size, softcap=softcap,
                                  deterministic=deterministic)


def _refuse_unsupported(dropout_p: float, alibi_slopes: torch.Tensor | None,
                        return_attn_probs: bool, block_table: torch.Tensor | None) -> None:
    """Raises NotImplementedError (TypeError/ValueError for a malformed value) naming the
    first flash-attn argument eurocore cannot honour."""
    if check_number("dropout_p", dropout_p, minimum=0.0) > 0:
        raise NotImplementedError(
            f"dropout_p: {dropout_p} is not supported, only 0.0 (eurocore's attention has no "
            "dropout)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported; pass None")
    if check_bool("return_attn_probs", return_attn_probs):
        raise NotImplementedError(
            "return_attn_probs: True is not supported (the attention probabilities are never "
            "materialised); pass False")
    if block_table is not None:
        raise NotImplementedError(
            "block_table: a paged KV cache is not supported; pass None with contiguous k, v")
