"""Flash attention with flash-attn 2's interface and semantics, fixed-length and packed.

``attention_reference`` is the specification (the ``torch`` backend): plain matmuls and
masks. The kernel backends run through the ``torch.library`` custom ops
``eurocore::flash_attn_fwd`` and ``eurocore::flash_attn_bwd`` with fake implementations and
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through them; plain
eager calls skip the dispatcher (``eurocore.ops.dispatch``).

Semantics (flash-attn 2): with d = seqlen_k − seqlen_q, query i sees key j when
``i + d − left <= j <= i + d + right`` for ``window_size=(left, right)`` (−1: unbounded);
``causal`` sets right = 0 (bottom-right aligned). Scores are ``softmax_scale · q·k``, capped
to ``softcap · tanh(s / softcap)`` when ``softcap > 0``. K and V may have fewer heads than Q
(GQA/MQA): query head h reads kv head ``h // (heads / kv_heads)``. A query that sees no key
gets zeros and log-sum-exp −inf.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from eurocore.kernels.limits import ATTENTION_MAX_HEAD_DIM
from eurocore.ops import dispatch
from eurocore.ops.backends import kernel_launchers, resolve_backend
from eurocore.ops.checks import (
    check_cu_seqlens_shape,
    cu_seqlens_lengths,
    kernel_index,
    reads_allowed,
)
from eurocore.utils.checks import check_bool, check_int, check_number

IMPLEMENTED = ("torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = ATTENTION_MAX_HEAD_DIM  # the kernels' limit (eurocore.kernels.limits)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = True,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over (batch, seq, heads, head_dim) tensors, as ``flash_attn_func``.

    Args:
        q: (batch, seqlen_q, heads, head_dim); float16 or bfloat16 (float32 accepted;
            float64 on the torch backend); any strides.
        k, v: (batch, seqlen_k, kv_heads, head_dim), q's dtype and device; heads divisible
            by kv_heads.
        causal: mask keys after the query, aligned to the bottom-right.
        softmax_scale: τ; None is 1 / sqrt(head_dim).
        window_size: (left, right) sliding window, -1 for unbounded on that side.
        softcap: > 0 caps scores to ``softcap · tanh(s / softcap)``.
        deterministic: kept for flash-attn compatibility; every backend's backward is
            deterministic (no float atomics), whatever this says.
        return_lse: also return the log-sum-exp, differentiable on every backend (a loss
            on it, such as z-loss, or a merge of partial attentions backpropagates into q
            and k).
        backend: "torch", "triton", "auto" or None (see ``eurocore.ops.backends``).

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype; with ``return_lse`` also lse
        (batch, heads, seqlen_q) float32 (float64 for float64 inputs).
    """
    _check_tensors(q, k, v, packed=False)
    scale, (left, right) = _scale_and_window(q, causal, softmax_scale, window_size, softcap,
                                             deterministic, return_lse)
    name = resolve_backend("flash_attention", q.device, backend, IMPLEMENTED)
    if name == "torch":
        out, lse = attention_reference(q, k, v, softmax_scale=scale, window_size=(left, right),
                                       softcap=softcap)
    else:
        _check_kernel(q, name)
        out, lse = _flash_attn_fwd(
            q, k, v, None, None, q.shape[1], k.shape[1], scale, left, right, float(softcap),
            name)
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = True,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences, as ``flash_attn_varlen_func``: sequence b holds
    queries ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` and keys ``cu_seqlens_k[b] :
    cu_seqlens_k[b + 1]``, and attends only within itself (masks aligned per sequence).

    Args:
        q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (sequences + 1,): 0 first,
            non-decreasing, total_q / total_k last.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (the grid size).
        The rest as :func:`flash_attention`.

    Returns:
        out (total_q, heads, head_dim); with ``return_lse`` also lse (heads, total_q).

    The cu_seqlens checks read device memory (one synchronisation) in eager mode and are
    skipped while tracing or capturing a CUDA graph. There, boundaries that break the rules
    above (or a max_seqlen below the longest sequence) give wrong values in the rows they
    misdescribe, but never a read or write outside q, k, v and the outputs: the kernels
    clamp every boundary into ``[0, total]``.
    """
    _check_tensors(q, k, v, packed=True)
    scale, (left, right) = _scale_and_window(q, causal, softmax_scale, window_size, softcap,
                                             deterministic, return_lse)
    _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    name = resolve_backend("flash_attention", q.device, backend, IMPLEMENTED)
    if name == "torch":
        out, lse = attention_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=scale, window_size=(left, right),
            softcap=softcap)
    else:
        _check_kernel(q, name)
        out, lse = _flash_attn_fwd(
            q, k, v, kernel_index(cu_seqlens_q), kernel_index(cu_seqlens_k), max_seqlen_q,
            max_seqlen_k, scale, left, right, float(softcap), name)
    return (out, lse) if return_lse else out


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`flash_attention` (its ``torch`` backend): explicit
    scores, mask and softmax, K/V repeated over each GQA group.

    With ``upcast`` (the default) it computes in fp32, or in float64 for float64 inputs (the
    tests' oracle); without, in the inputs' dtype throughout (the tests' "plain PyTorch at
    the same precision" baseline). Returns (out in q's dtype, lse (batch, heads, seqlen_q)).
    """
    _, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    left, right = (window_size[0], 0) if causal else window_size
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qh = q.to(dtype).transpose(1, 2)  # (batch, heads, seqlen_q, head_dim)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = attention_mask(seqlen_q, seqlen_k, left, right, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    # A row that sees no key has lse = −inf: subtract 0 there, so its weights are exp(−inf).
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(dtype)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = (probs @ vh).transpose(1, 2).to(q.dtype)
    return out, lse.to(torch.promote_types(dtype, torch.float32))


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`flash_attention_varlen`: :func:`attention_reference` on
    each sequence alone. Returns (out (total_q, heads, head_dim), lse (heads, total_q))."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k),
                                  strict=True):
        out, lse = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def attention_mask(seqlen_q: int, seqlen_k: int, left: int, right: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool: key j visible from query i (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def _check_tensors(q, k, v, packed: bool) -> None:
    """Types, ranks, shapes, dtypes and devices of q, k, v; raises naming the argument."""
    names = "(total, heads, head_dim)" if packed else "(batch, seq, heads, head_dim)"
    ndim = 3 if packed else 4
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{arg}: expected {names}, got shape {tuple(t.shape)}")
    for arg, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{arg}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{arg}: is on {t.device} but q is on {q.device}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's {q.shape[-1]}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch {k.shape[0]} differs from q's {q.shape[0]}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: q's {heads} heads must be a multiple of k's {kv_heads} kv heads")
    if q.shape[-1] == 0:
        raise ValueError("q: head_dim must be > 0")


def check_attention_options(
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = True,
    return_lse: bool = False,
) -> tuple[int, int]:
    """Checks the options of :func:`flash_attention` (shared with ``nn.FlashAttention``,
    which checks them at construction); returns the (left, right) window with causal
    applied. Raises TypeError/ValueError naming the option."""
    for arg, flag in (("causal", causal), ("deterministic", deterministic),
                      ("return_lse", return_lse)):
        check_bool(arg, flag)
    if softmax_scale is not None:
        check_number("softmax_scale", softmax_scale)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected (left, right) ints, got {window_size!r}")
    left, right = (check_int("window_size", w, minimum=-1) for w in window_size)
    check_number("softcap", softcap, minimum=0.0)
    return left, 0 if causal else right


def _scale_and_window(q, causal, softmax_scale, window_size, softcap, deterministic,
                      return_lse) -> tuple[float, tuple[int, int]]:
    """(softmax_scale with its default, (left, right)) after :func:`check_attention_options`."""
    window = check_attention_options(causal, softmax_scale, window_size, softcap,
                                     deterministic, return_lse)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return scale, window


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    for arg, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens_shape(arg, cu, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: {cu_seqlens_k.shape[0] - 1} sequences but "
                         f"cu_seqlens_q has {cu_seqlens_q.shape[0] - 1}")
    for arg, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        check_int(arg, value, minimum=0)
    if not reads_allowed():
        return
    for arg, cu, total, bound, max_arg in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")):
        lengths = cu_seqlens_lengths(arg, cu, total)
        if max(lengths) > bound:
            raise ValueError(f"{max_arg}: {bound} is less than the longest sequence in {arg}, "
                             f"{max(lengths)}")


def _check_kernel(q, name: str) -> None:
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: the {name} backend takes float16, bfloat16 or float32, "
                        f"got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"q: the {name} backend takes head_dim a multiple of 8 up to "
                         f"{MAX_KERNEL_HEAD_DIM}, got {head_dim}")


# -------------------------------------------------------------------------------------------
# Kernel backends: custom ops and autograd
# -------------------------------------------------------------------------------------------


@functools.cache
def _launchers(backend: str):
    return kernel_launchers("flash_attention", "flash_attention", backend)


def _as_4d(t: torch.Tensor, packed: bool) -> torch.Tensor:
    """(batch, seq, heads, head_dim) with unit stride along head_dim; packed gets batch 1."""
    t = t.unsqueeze(0) if packed else t
    return t if t.stride(-1) == 1 else t.contiguous()


@dispatch.custom_op("eurocore::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): lse (batch, heads, seqlen_q), packed (heads, total_q), fp32."""
    out, lse = _flash_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, window_left, window_right,
                                    softcap, backend)
    packed = cu_seqlens_q is not None
    _launchers(backend).flash_attn_fwd(
        _as_4d(q, packed), _as_4d(k, packed), _as_4d(v, packed), _as_4d(out, packed), lse,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, (window_left, window_right),
        softcap)
    return out, lse


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, window_left, window_right, softcap, backend):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@dispatch.custom_op("eurocore::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), shaped like q, k, v; GQA sums dk, dv over each group. ``dlse``,
    the gradient reaching the log-sum-exp (None: none), is shaped like lse."""
    dq, dk, dv = _flash_attn_bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q,
                                      cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                      window_left, window_right, softcap, backend)
    packed = cu_seqlens_q is not None
    _launchers(backend).flash_attn_bwd(
        _as_4d(dout, packed), _as_4d(q, packed), _as_4d(k, packed), _as_4d(v, packed),
        _as_4d(out, packed), lse, _as_4d(dq, packed), _as_4d(dk, packed), _as_4d(dv, packed),
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        (window_left, window_right), softcap, dlse=dlse)
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                         backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, left, right, softcap, backend)


def _flash_attn_fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:  # only lse reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_attn_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, *([None] * 9)


_flash_attn_fwd.register_autograd(_flash_attn_fwd_backward,
                                  setup_context=_flash_attn_fwd_setup_context)
