"""Rotary position embeddings: the cos/sin table and the rotation of q and k together.

``apply_rotary_reference`` is the specification (the ``torch`` backend). The kernel
backends run through the ``torch.library`` custom ops ``eurocore::rotary`` (out of place,
also the backward) and ``eurocore::rotary_`` (in place), under one ``autograd.Function``
that marks in-place outputs dirty, so ``torch.compile(fullgraph=True)`` traces both; plain
eager calls skip the dispatcher (``eurocore.ops.dispatch``).

Rotation of a pair (x1, x2) at position p and frequency i, with c = cos[p, i], s = sin[p, i]:

    rotate-half (NeoX, HF, Llama):  x1 = x[i],      x2 = x[i + rotary_dim/2]
    interleaved (GPT-J):            x1 = x[2i],     x2 = x[2i + 1]
    y1 = x1·c − x2·s,   y2 = x2·c + x1·s;   dims from rotary_dim on pass through unchanged.

The backward is the same rotation with s negated.

Positions come in four forms (position_ids; an int or one-per-sequence ``seqlen_offsets``;
``cu_seqlens``). ``apply_rotary`` turns them once into one (``normalize_positions``): None,
each token at its index in its sequence, or an int64 row of cos/sin per token. The torch
backend, the custom ops, the launchers and the kernels take only that.

The cos/sin tables and HF's rope types live in ``eurocore.ops.rope_scaling``
(``rope_cos_sin`` is re-exported here).
"""

from __future__ import annotations

import functools
import math

import torch

from eurocore.kernels.limits import ROTARY_MAX_HEAD_DIM
from eurocore.ops import dispatch
from eurocore.ops.backends import kernel_launchers, resolve_backend
from eurocore.ops.checks import (
    check_cu_seqlens_shape,
    check_disjoint,
    check_index_tensor,
    check_no_self_overlap,
    cu_seqlens_lengths,
    reads_allowed,
)

# The tables and HF's rope types live in eurocore.ops.rope_scaling; these names stay
# importable from here, where eurocore.model, eurocore.nn and the tests take them.
from eurocore.ops.rope_scaling import ROPE_TYPES as ROPE_TYPES
from eurocore.ops.rope_scaling import rope_cos_sin as rope_cos_sin
from eurocore.ops.rope_scaling import rope_inv_freq as _inv_freq  # noqa: F401
from eurocore.utils.checks import check_int

IMPLEMENTED = ("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("bshd", "sbhd", "thd")
MAX_KERNEL_HEAD_DIM = ROTARY_MAX_HEAD_DIM  # the kernels' limit (eurocore.kernels.limits)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seqlen_offsets: int | torch.Tensor = 0,
    interleaved: bool = False,
    layout: str = "bshd",
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotates q and k (GQA: their head counts may differ) in one launch.

    The first ``rotary_dim = 2 * cos.shape[1]`` dims of each head rotate, the rest pass
    through. Token (b, s) takes row ``position_ids[b, s]`` of cos/sin, else row
    ``s + seqlen_offsets[b]``; in ``thd`` with ``cu_seqlens``, b is the packed sequence and
    s restarts at 0 in each. No gradient flows to cos and sin.

    Args:
        q: ``bshd`` (batch, seq, heads, head_dim), ``sbhd`` (seq, batch, heads, head_dim) or
            ``thd`` (total_tokens, heads, head_dim); float16, bfloat16 or float32 (float64
            on the torch backend); any strides. HF's (batch, heads, seq, head_dim) is
            ``q.transpose(1, 2)`` in ``bshd``.
        k: like q with its own head count, same dtype and other dims; or None.
        cos, sin: (positions, rotary_dim // 2) floating point, as from :func:`rope_cos_sin`.
        position_ids: integer (batch or 1, seq); in ``thd`` (total_tokens,). Not together
            with cu_seqlens or nonzero seqlen_offsets.
        cu_seqlens: ``thd`` only: int32/int64 (sequences + 1,), 0 first, non-decreasing,
            total_tokens last.
        seqlen_offsets: an int >= 0, or an integer tensor (batch,) (in ``thd``: one per
            sequence) added to every position of that sequence.
        interleaved: GPT-J pairs (2i, 2i + 1) instead of rotate-half pairs (i, i + r/2).
        layout: "bshd", "sbhd" or "thd".
        inplace: write the result into q and k (which must not be leaves requiring grad);
            autograd stays correct. Neither may have elements sharing memory (an expanded
            tensor), nor share one with the other (checked in eager mode; inside
            torch.compile, trusted).
        backend: "torch", "triton", "cuda", "auto" or None (see ``eurocore.ops.backends``).

    Returns:
        ``(q_rotated, k_rotated)``: new tensors, or q and k themselves when ``inplace``;
        ``k_rotated`` is None when k is None.

    Positions are checked against the table size, and cu_seqlens for consistency, in eager
    mode; those checks read device tensors (one synchronisation) only when position_ids,
    cu_seqlens or tensor offsets are given, and are skipped while tracing or capturing a
    CUDA graph. A kernel given positions outside the table writes NaN there.
    """
    _check_args(q, k, cos, sin, position_ids, cu_seqlens, seqlen_offsets, interleaved, layout,
                inplace)
    name = resolve_backend("apply_rotary", q.device, backend, IMPLEMENTED)
    # The one form every backend, custom op and launcher takes from here on.
    positions = normalize_positions(q, layout, position_ids, cu_seqlens, seqlen_offsets)
    if reads_allowed():
        _check_positions(q, cos, positions, position_ids, cu_seqlens, seqlen_offsets, layout)
    if name == "torch":
        out_q, out_k = rotate_reference(q, k, cos, sin, positions, layout, interleaved)
        if not inplace:
            return out_q, out_k
        q.copy_(out_q)
        if k is not None:
            k.copy_(out_k)
        return q, k
    for arg, tensor in (("q", q), ("k", k)):
        if tensor is not None and tensor.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{arg}: the {name} backend takes float16, bfloat16 or float32, "
                            f"got {tensor.dtype}")
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"q: the {name} backend takes head_dim up to {MAX_KERNEL_HEAD_DIM}, "
                         f"got {q.shape[-1]}")
    rotation = (cos, sin, positions, layout, interleaved)
    if not inplace:
        return _ApplyRotary.apply(q, k, *rotation, name)
    with torch.no_grad():  # autograd learns of the rotation from _RotatedInPlace below
        _rotary_inplace(q, k, *rotation, False, name)
    return (_RotatedInPlace.apply(q, *rotation, name),
            _RotatedInPlace.apply(k, *rotation, name) if k is not None else None)


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seqlen_offsets: int | torch.Tensor = 0,
    interleaved: bool = False,
    layout: str = "bshd",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The specification of :func:`apply_rotary` in plain PyTorch (its ``torch`` backend).

    Rotates in fp32 (float64 for float64 inputs, which makes it the tests' float64 oracle)
    and rounds once to the input dtype. Out of place; gradients are autograd's.
    """
    positions = token_positions(q, layout, position_ids, cu_seqlens, seqlen_offsets)
    return rotate_reference(q, k, cos, sin, positions, layout, interleaved)


def rotate_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    layout: str,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply_rotary_reference` at normalised positions (:func:`normalize_positions`:
    an integer tensor of q's token shape, or None for each token's index in its sequence).

    q, k, cos, sin as :func:`apply_rotary` takes them (k may be None); the result is new
    tensors of their shapes and dtypes.
    """
    if positions is None:
        positions = token_positions(q, layout)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        half = cos.shape[-1]
        c = cos.to(compute_dtype)[positions].unsqueeze(-2)  # (tokens..., 1, half)
        s = sin.to(compute_dtype)[positions].unsqueeze(-2)
        pairs = x[..., : 2 * half].to(compute_dtype)
        if interleaved:
            x1, x2 = pairs[..., 0::2], pairs[..., 1::2]
        else:
            x1, x2 = pairs[..., :half], pairs[..., half:]
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        rotated = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
        return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), -1)

    return rotate(q), rotate(k) if k is not None else None


def normalize_positions(
    q: torch.Tensor,
    layout: str,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seqlen_offsets: int | torch.Tensor = 0,
) -> torch.Tensor | None:
    """The one form of positions that the custom ops, launchers and kernels take.

    None when every token sits at its index in its sequence (no position_ids, no cu_seqlens,
    seqlen_offsets 0: the common case, which the kernels compute instead of reading). Else
    :func:`token_positions`: int64 of q's token shape, each token's row of cos/sin.

    Arguments as :func:`apply_rotary` takes them, already checked by its argument checks.
    Reads no device data: fine inside torch.compile and CUDA graph capture.
    """
    if (position_ids is None and cu_seqlens is None
            and not isinstance(seqlen_offsets, torch.Tensor) and seqlen_offsets == 0):
        return None
    return token_positions(q, layout, position_ids, cu_seqlens, seqlen_offsets)


def token_positions(
    q: torch.Tensor,
    layout: str,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seqlen_offsets: int | torch.Tensor = 0,
) -> torch.Tensor:
    """The row of cos/sin each token takes, int64 of q's token shape: (batch, seq) in
    ``bshd``, (seq, batch) in ``sbhd``, (total_tokens,) in ``thd``. A row shared by every
    sequence stays one row, expanded (stride 0), not a copy per sequence; int64 position_ids
    come back as a view of themselves."""
    device = q.device
    if layout == "thd":
        total = q.shape[0]
        if position_ids is not None:
            return position_ids.reshape(total).long()
        if cu_seqlens is None:
            return _offset_arange(total, seqlen_offsets, device)
        tokens = torch.arange(total, device=device)
        cu = cu_seqlens.long().contiguous()  # searchsorted warns on strided boundaries
        # Clamped so that tokens past cu_seqlens[-1] (bounds unchecked inside a graph) count
        # in the last sequence rather than index past the per-sequence offsets.
        sequence = torch.searchsorted(cu[1:], tokens, right=True).clamp_(max=cu.shape[0] - 2)
        positions = tokens - cu[sequence]
        if isinstance(seqlen_offsets, torch.Tensor):
            return positions + seqlen_offsets.long()[sequence]
        return positions + int(seqlen_offsets)
    batch, seq = (q.shape[0], q.shape[1]) if layout == "bshd" else (q.shape[1], q.shape[0])
    if position_ids is not None:
        positions = position_ids.long().expand(batch, seq)
    elif isinstance(seqlen_offsets, torch.Tensor):
        positions = torch.arange(seq, device=device) + seqlen_offsets.long().reshape(-1, 1)
    else:
        positions = _offset_arange(seq, seqlen_offsets, device).expand(batch, seq)
    return positions if layout == "bshd" else positions.t()


def _offset_arange(n: int, seqlen_offsets: int | torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """``offset .. offset + n - 1`` (int64, (n,)) for an int or a one-element tensor offset;
    an int one is folded into the arange (no host-to-device copy of it)."""
    if isinstance(seqlen_offsets, torch.Tensor):
        return torch.arange(n, device=device) + seqlen_offsets.long()
    start = int(seqlen_offsets)
    return torch.arange(start, start + n, device=device)


def _check_args(q, k, cos, sin, position_ids, cu_seqlens, seqlen_offsets, interleaved, layout,
                inplace) -> None:
    """Raises ValueError/TypeError naming the first bad argument; reads no device data."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    dims = {"bshd": "(batch, seq, heads, head_dim)", "sbhd": "(seq, batch, heads, head_dim)",
            "thd": "(total_tokens, heads, head_dim)"}[layout]
    ndim = 3 if layout == "thd" else 4
    for arg, tensor in (("q", q), ("k", k)):
        if tensor is None and arg == "k":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.dim() != ndim:
            raise ValueError(f"{arg}: layout {layout!r} expects {dims}, got shape "
                             f"{tuple(tensor.shape)}")
    if k is not None:
        if k.dtype != q.dtype:
            raise TypeError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
        if k.device != q.device:
            raise ValueError(f"k: is on {k.device} but q is on {q.device}")
        if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
            raise ValueError(f"k: shape {tuple(k.shape)} must match q {tuple(q.shape)} in "
                             f"every dim but heads ({layout!r}: {dims})")
    head_dim = q.shape[-1]
    for arg, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(table).__name__}")
        if not table.is_floating_point():
            raise TypeError(f"{arg}: expected a floating-point tensor, got {table.dtype}")
        if table.dim() != 2 or table.shape[1] == 0:
            raise ValueError(f"{arg}: expected (positions, rotary_dim // 2), got shape "
                             f"{tuple(table.shape)}")
        if table.device != q.device:
            raise ValueError(f"{arg}: is on {table.device} but q is on {q.device}")
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{arg}: requires grad, but no gradient flows to the table; "
                             f"pass {arg}.detach()")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos {tuple(cos.shape)}")
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(f"cos: rotates 2 * {cos.shape[1]} = {2 * cos.shape[1]} dims, more "
                         f"than head_dim {head_dim}")
    for arg, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{arg}: expected a bool, got {type(flag).__name__}")
    if inplace:
        for arg, tensor in (("q", q), ("k", k)):
            if tensor is None:
                continue
            if (torch.is_grad_enabled() and tensor.requires_grad
                    and _leaf_or_view_of_leaf(tensor)):
                raise ValueError(f"{arg}: inplace=True would overwrite a leaf tensor that "
                                 f"requires grad (or a view of one); rotate a copy, or pass "
                                 f"inplace=False")
            check_no_self_overlap(arg, tensor)
        # Else elements of both would rotate twice. Pointers exist in eager mode only (a
        # traced graph gets fake tensors): inside torch.compile, q and k are trusted.
        if k is not None and not torch.compiler.is_compiling():
            check_disjoint("k", k, "q", q)

    batch = {"bshd": q.shape[0], "sbhd": q.shape[1], "thd": None}[layout]
    seq = {"bshd": q.shape[1], "sbhd": q.shape[0], "thd": q.shape[0]}[layout]
    if cu_seqlens is not None:
        if layout != "thd":
            raise ValueError(f"cu_seqlens: only the 'thd' layout takes cu_seqlens, got layout "
                             f"{layout!r}")
        check_cu_seqlens_shape("cu_seqlens", cu_seqlens, q.device)
        batch = cu_seqlens.shape[0] - 1
    if position_ids is not None:
        check_index_tensor("position_ids", position_ids, q.device)
        if cu_seqlens is not None:
            raise ValueError("position_ids: give position_ids or cu_seqlens, not both")
        if not (isinstance(seqlen_offsets, int) and seqlen_offsets == 0):
            raise ValueError("position_ids: give position_ids or seqlen_offsets, not both")
        shape = tuple(position_ids.shape)
        if layout == "thd":
            ok = shape in ((seq,), (1, seq))
            expected = f"({seq},)"
        else:
            ok = len(shape) == 2 and shape[0] in (1, batch) and shape[1] == seq
            expected = f"({batch} or 1, {seq})"
        if not ok:
            raise ValueError(f"position_ids: expected {expected} for q of shape "
                             f"{tuple(q.shape)} in layout {layout!r}, got {shape}")
    if isinstance(seqlen_offsets, torch.Tensor):
        check_index_tensor("seqlen_offsets", seqlen_offsets, q.device)
        expected_len = batch if batch is not None else 1
        if tuple(seqlen_offsets.shape) != (expected_len,):
            raise ValueError(f"seqlen_offsets: expected one offset per sequence, shape "
                             f"({expected_len},), got {tuple(seqlen_offsets.shape)}")
    else:
        check_int("seqlen_offsets", seqlen_offsets, minimum=0)


def _leaf_or_view_of_leaf(tensor: torch.Tensor) -> bool:
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


def _check_positions(q, cos, positions, position_ids, cu_seqlens, seqlen_offsets,
                     layout) -> None:
    """The checks that read device data: cu_seqlens well formed, positions inside cos.
    ``positions`` is the normalised form of the other three (:func:`normalize_positions`)."""
    n_positions = cos.shape[0]
    if cu_seqlens is not None:
        cu_seqlens_lengths("cu_seqlens", cu_seqlens, q.shape[0])
    if math.prod(q.shape[:-2]) == 0:  # no tokens: no position is asked
        return
    if position_ids is None and cu_seqlens is None and isinstance(seqlen_offsets, int):
        seq = q.shape[1] if layout == "bshd" else q.shape[0]
        first, last = seqlen_offsets, seqlen_offsets + seq - 1  # no device data to read
    else:
        first, last = torch.stack((positions.min(), positions.max())).tolist()
    if first < 0:
        raise ValueError(f"{'position_ids' if position_ids is not None else 'seqlen_offsets'}: "
                         f"positions must be >= 0, got {first}")
    if last >= n_positions:
        raise ValueError(f"cos: has {n_positions} positions, too short for position {last} "
                         f"asked by {_position_source(position_ids, seqlen_offsets)}")


def _position_source(position_ids, seqlen_offsets) -> str:
    if position_ids is not None:
        return "position_ids"
    if isinstance(seqlen_offsets, torch.Tensor) or seqlen_offsets:
        return "the sequence length plus seqlen_offsets"
    return "the sequence length"


# -------------------------------------------------------------------------------------------
# Kernel backends: custom ops and autograd
# -------------------------------------------------------------------------------------------


@functools.cache
def _launchers(backend: str):
    return kernel_launchers("apply_rotary", "rotary", backend)


def _launch(q, k, out_q, out_k, cos, sin, positions, layout, interleaved, conjugate, backend,
            in_place=False) -> None:
    """Brings every tensor to the launchers' form: (outer, inner, heads, head_dim) with unit
    stride along head_dim (thd: outer 1), positions as (outer, inner) (any strides: the
    kernels read them by stride), contiguous tables."""
    launchers = _launchers(backend)

    def as_4d(t):
        if t is None:
            return None
        t = t.unsqueeze(0) if layout == "thd" else t
        return t if t.stride(-1) == 1 else t.contiguous()

    if positions is not None and layout == "thd":
        positions = positions.unsqueeze(0)
    launchers.rotary(
        as_4d(q), as_4d(k), as_4d(out_q), as_4d(out_k), cos.contiguous(), sin.contiguous(),
        positions, batch_first=layout != "sbhd", interleaved=interleaved, conjugate=conjugate,
        in_place=in_place)


# The custom ops take the rotation as (cos, sin, positions, layout, interleaved): positions
# normalised by apply_rotary (normalize_positions), then conjugate (the backward negates sin)
# and the backend.


@dispatch.custom_op("eurocore::rotary", mutates_args=())
def _rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    layout: str,
    interleaved: bool,
    conjugate: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place; returns (q_out, k_out), k_out empty when k is None (an output may not
    be None). ``conjugate`` negates sin: the backward."""
    out_q, out_k = _rotary_fake(q, k, cos, sin, positions, layout, interleaved, conjugate,
                                backend)
    _launch(q, k, out_q, out_k if k is not None else None, cos, sin, positions, layout,
            interleaved, conjugate, backend)
    return out_q, out_k


@_rotary.register_fake
def _rotary_fake(q, k, cos, sin, positions, layout, interleaved, conjugate, backend):
    out_k = q.new_empty(k.shape) if k is not None else q.new_empty(0)
    return q.new_empty(q.shape), out_k


@dispatch.custom_op("eurocore::rotary_", mutates_args=("q", "k"))
def _rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    layout: str,
    interleaved: bool,
    conjugate: bool,
    backend: str,
) -> None:
    """In place: overwrites the rotary dims of q and k, leaves the rest untouched."""
    if q.stride(-1) == 1 and (k is None or k.stride(-1) == 1):
        _launch(q, k, q, k, cos, sin, positions, layout, interleaved, conjugate, backend,
                in_place=True)
        return
    # The kernel needs unit stride along head_dim: rotate a copy, then write it back.
    out_q, out_k = _rotary(q, k, cos, sin, positions, layout, interleaved, conjugate, backend)
    q.copy_(out_q)
    if k is not None:
        k.copy_(out_k)


@_rotary_inplace.register_fake
def _rotary_inplace_fake(q, k, cos, sin, positions, layout, interleaved, conjugate, backend):
    return None


def _save_rotation(ctx, cos, sin, positions, layout, interleaved, backend) -> None:
    """Keeps what the backward rotation needs: the table and the positions."""
    ctx.save_for_backward(cos, sin, positions)
    ctx.layout, ctx.interleaved, ctx.backend = layout, interleaved, backend


def _rotate_back(ctx, dq_out, dk_out):
    """The backward of a rotation: the same rotation with the sine negated, in one launch."""
    cos, sin, positions = ctx.saved_tensors
    return _rotary(dq_out, dk_out, cos, sin, positions, ctx.layout, ctx.interleaved, True,
                   ctx.backend)


class _ApplyRotary(torch.autograd.Function):
    """Kernel-backend autograd, out of place: the backward rotates the output gradients of q
    and k by the negated angle, in one launch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, layout, interleaved, backend):
        out_q, out_k = _rotary(q, k, cos, sin, positions, layout, interleaved, False, backend)
        _save_rotation(ctx, cos, sin, positions, layout, interleaved, backend)
        ctx.has_k = k is not None
        return out_q, out_k if k is not None else None

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        dq, dk = _rotate_back(ctx, dq_out, dk_out if ctx.has_k else None)
        return (dq, dk if ctx.has_k else None, *([None] * 6))


class _RotatedInPlace(torch.autograd.Function):
    """Records that x was rotated in place (by one launch for q and k, run before under
    no_grad) and rebases its autograd history; the backward rotates x's gradient back.

    One Function per tensor because autograd lets a Function that modifies a view (a slice
    of a fused qkv projection, a transposed tensor) return only that one tensor.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, positions, layout, interleaved, backend):
        ctx.mark_dirty(x)
        _save_rotation(ctx, cos, sin, positions, layout, interleaved, backend)
        return x

    @staticmethod
    def backward(ctx, dx_out):
        dx, _ = _rotate_back(ctx, dx_out, None)
        return (dx, *([None] * 6))
