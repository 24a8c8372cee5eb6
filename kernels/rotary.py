"""Rotary position embeddings for q and k in one launch, forward and backward.

For each token at position p, each head of q and of k, and each frequency i < r/2 (r the
rotary dims), with c = cos[p, i] and s = sin[p, i] read in fp32:

    rotate-half:  (x1, x2) = (x[i], x[i + r/2])      interleaved:  (x1, x2) = (x[2i], x[2i+1])
    y1 = x1·c − x2·s,    y2 = x2·c + x1·s            (backward: s → −s)
    y[d] = x[d] for d >= r                          (copied only when out of place)

The position of token (outer, inner) is ``positions[outer, inner]``, read by stride (the op
has normalised position ids, offsets and packed-sequence bounds into that one form, see
``eurocore.ops.rotary.normalize_positions``), or without a positions tensor the token's
index along the sequence axis. The grid is linear in tokens, whatever the sequence lengths.

A program takes BLOCK_T tokens, loads their cos/sin once and walks a group of heads of q or
of k. x1 and x2 are loaded as two tiles of one shape, so the thread that reads a pair is
the one that writes it: in place is safe without a barrier.
"""

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, launcher, make_launch

# Elements of the widest (tokens x dims) tile a program holds per head.
TILE = 1024
MAX_BLOCK_T = 32
# Enough programs to fill a large GPU several times over before heads are grouped.
MIN_PROGRAMS = 1024
# Two warps on both vendors: 8 elements (16 bytes of bf16) per lane of AMD's 64-wide
# wavefronts, so loads stay 16 bytes wide there (4 warps gave 8-byte loads); 16 per thread
# (two 16-byte loads) with NVIDIA's 32-wide warps.
NUM_WARPS = 2


@triton.jit
def _rotary_kernel(
    Q, K, OUT_Q, OUT_K, COS, SIN, POSITIONS,
    n_tokens, n_inner,
    stride_q_outer, stride_q_inner, stride_q_head,
    stride_k_outer, stride_k_inner, stride_k_head,
    stride_oq_outer, stride_oq_inner, stride_oq_head,
    stride_ok_outer, stride_ok_inner, stride_ok_head,
    n_q_heads, n_k_heads, q_groups, heads_per_program,
    head_dim, stride_cos, n_positions,
    stride_pos_outer, stride_pos_inner,
    HAS_POSITIONS: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    # Tokens are (outer, inner) pairs: (batch, seq) in bshd and thd, (seq, batch) in sbhd.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < n_tokens
    outer = tokens // n_inner
    inner = tokens % n_inner
    # With a positions tensor this is the token's element of it; without, the plan's strides
    # (0, 1) or (1, 0) make it the token's index along the sequence axis.
    pos = outer * stride_pos_outer + inner * stride_pos_inner
    if HAS_POSITIONS:
        pos = tl.load(POSITIONS + pos, mask=live, other=0).to(tl.int64)

    i = tl.arange(0, BLOCK_HALF)
    pair_mask = live[:, None] & (i < HALF)[None, :]
    in_table = (pos >= 0) & (pos < n_positions)
    table = pos[:, None] * stride_cos + i[None, :]
    cos = tl.load(COS + table, mask=pair_mask & in_table[:, None], other=0.0).to(tl.float32)
    sin = tl.load(SIN + table, mask=pair_mask & in_table[:, None], other=0.0).to(tl.float32)
    # A position outside the table (only when the op's checks were skipped) gives NaN.
    cos = tl.where(in_table[:, None], cos, float("nan"))
    if CONJUGATE:
        sin = -sin
    if INTERLEAVED:
        d1 = 2 * i
        d2 = 2 * i + 1
    else:
        d1 = i
        d2 = i + HALF
    tail = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    tail_mask = live[:, None] & (tail < head_dim)[None, :]

    group = tl.program_id(1)
    if group < q_groups:
        _rotate_heads(Q, OUT_Q, stride_q_outer, stride_q_inner, stride_q_head,
                      stride_oq_outer, stride_oq_inner, stride_oq_head,
                      group.to(tl.int64) * heads_per_program, n_q_heads, heads_per_program,
                      outer, inner, cos, sin, d1, d2, pair_mask, tail, tail_mask, COPY_TAIL)
    else:
        _rotate_heads(K, OUT_K, stride_k_outer, stride_k_inner, stride_k_head,
                      stride_ok_outer, stride_ok_inner, stride_ok_head,
                      (group - q_groups).to(tl.int64) * heads_per_program, n_k_heads,
                      heads_per_program, outer, inner, cos, sin, d1, d2, pair_mask, tail,
                      tail_mask, COPY_TAIL)


@triton.jit
def _rotate_heads(X, OUT, stride_outer, stride_inner, stride_head,
                  stride_o_outer, stride_o_inner, stride_o_head,
                  first_head, n_heads, heads_per_program,
                  outer, inner, cos, sin, d1, d2, pair_mask, tail, tail_mask,
                  COPY_TAIL: tl.constexpr):
    x_rows = X + (outer * stride_outer + inner * stride_inner)[:, None]
    o_rows = OUT + (outer * stride_o_outer + inner * stride_o_inner)[:, None]
    for h in range(heads_per_program):
        head = first_head + h
        if head < n_heads:
            x = x_rows + head * stride_head
            o = o_rows + head * stride_o_head
            x1 = tl.load(x + d1[None, :], mask=pair_mask, other=0.0).to(tl.float32)
            x2 = tl.load(x + d2[None, :], mask=pair_mask, other=0.0).to(tl.float32)
            tl.store(o + d1[None, :], (x1 * cos - x2 * sin).to(OUT.dtype.element_ty),
                     mask=pair_mask)
            tl.store(o + d2[None, :], (x2 * cos + x1 * sin).to(OUT.dtype.element_ty),
                     mask=pair_mask)
            if COPY_TAIL:
                rest = tl.load(x + tail[None, :], mask=tail_mask)
                tl.store(o + tail[None, :], rest, mask=tail_mask)


def launch_config(half: int, tail: int) -> dict:
    """Tile sizes for ``half`` rotary pairs and ``tail`` pass-through dims per head.

    The single source of launch configurations: the plan uses it, and the ahead-of-time
    compile check enumerates its outputs. ``HALF`` is a compile-time constant
    (one binary per rotary width, a handful in practice), so Triton knows the alignment of
    the second half and keeps 16-byte loads for widths like 80.
    """
    block_half = triton.next_power_of_2(half)
    block_tail = triton.next_power_of_2(tail) if tail else 1
    return {
        "HALF": half,
        "BLOCK_T": max(1, min(MAX_BLOCK_T, TILE // max(block_half, block_tail))),
        "BLOCK_HALF": block_half,
        "BLOCK_TAIL": block_tail,
        "num_warps": NUM_WARPS,
    }


def heads_per_program(token_blocks: int, n_q_heads: int, n_k_heads: int) -> int:
    """Heads a program walks (cos/sin loaded once for all): 8, unless fewer fill the GPU
    better. A pure function of the shapes."""
    for heads in (8, 4, 2):
        groups = triton.cdiv(n_q_heads, heads) + triton.cdiv(n_k_heads, heads)
        if token_blocks * groups >= MIN_PROGRAMS:
            return heads
    return 1


@functools.lru_cache(maxsize=1024)
def _static(n_tokens: int, n_q_heads: int, n_k_heads: int, half: int, head_dim: int,
            flags: tuple[bool, bool, bool, bool], patchables: tuple
            ) -> tuple[tuple[int, int], dict, dict, int, int]:
    """(grid, constexprs, launch options, heads per program, q head groups) of a launch:
    pure functions of the shape and the flags (HAS_POSITIONS, INTERLEAVED, CONJUGATE,
    COPY_TAIL), cached, since deriving them afresh costs more host time (some 10 µs:
    triton.cdiv and triton.next_power_of_2 are constexpr functions, slow to call from the
    host) than the rest of the launch. The key also holds what may be patched (the functions
    and the module's tile limits: benchmarks/tune.py, the tests), so a patched one never
    meets a stale entry."""
    copy_tail = flags[3]
    cfg = launch_config(half, head_dim - 2 * half if copy_tail else 0)
    token_blocks = triton.cdiv(n_tokens, cfg["BLOCK_T"])
    heads = heads_per_program(token_blocks, n_q_heads, n_k_heads)
    q_groups = triton.cdiv(n_q_heads, heads)
    grid = (token_blocks, q_groups + triton.cdiv(n_k_heads, heads))
    constexprs = dict(zip(("HAS_POSITIONS", "INTERLEAVED", "CONJUGATE", "COPY_TAIL"), flags,
                          strict=True))
    constexprs.update(HALF=half, BLOCK_T=cfg["BLOCK_T"], BLOCK_HALF=cfg["BLOCK_HALF"],
                      BLOCK_TAIL=cfg["BLOCK_TAIL"])
    return grid, constexprs, {"num_warps": cfg["num_warps"]}, heads, q_groups


def _patchables() -> tuple:
    """What the plan reads that a tuning sweep or a test may patch (part of its key)."""
    return launch_config, heads_per_program, TILE, MAX_BLOCK_T, MIN_PROGRAMS, NUM_WARPS


def rotary_plan(
    q: torch.Tensor,
    k: torch.Tensor | None,
    out_q: torch.Tensor,
    out_k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    batch_first: bool,
    interleaved: bool,
    conjugate: bool,
    in_place: bool,
) -> Launch:
    """The launch of out_q, out_k = rotate(q, k) (conjugate: by the negated angle); in place
    when out_q, out_k are q, k: (token blocks, head groups of q then of k) programs, none for
    no tokens or no heads (:meth:`Launch.run` then launches nothing). :func:`rotary` runs it.

    q, out_q: (outer, inner, q_heads, head_dim), k, out_k likewise with k_heads (or None);
    unit stride along head_dim, any other strides. (outer, inner) is (batch, seq) when
    ``batch_first``, else (seq, batch); packed batches have outer = 1.
    cos, sin: (positions, rotary_dim // 2), contiguous, any float dtype.
    positions: int64 (outer, inner), any strides (an expanded view is read with stride 0),
    each token's row of cos/sin; or None: the token's index along the sequence axis (inner
    when ``batch_first``, else outer).

    Without k, q and out_q stand in for k and out_k (the kernel walks no k head). Without
    positions, the positions strides make a token's index along the sequence axis its
    position; a positions dimension of size 1 gets stride 0 (its index is always 0, and an
    odd stride there would only cost a divisibility specialisation). In place, the
    pass-through dims are left where they are, not copied.
    """
    n_outer, n_inner, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2] if k is not None else 0
    half = cos.shape[1]
    copy_tail = not in_place and head_dim > 2 * half
    grid, constexprs, options, heads, q_groups = _static(
        n_outer * n_inner, n_q_heads, n_k_heads, half, head_dim,
        (positions is not None, interleaved, conjugate, copy_tail), _patchables())
    if positions is None:
        positions, stride_pos = cos, ((0, 1) if batch_first else (1, 0))  # cos: never read
    else:
        stride_pos = tuple(s if n > 1 else 0 for n, s in zip(positions.shape,
                                                               positions.stride(), strict=True))
    if k is None:
        k, out_k = q, out_q
    return make_launch((
        _rotary_kernel, grid,
        (q, k, out_q, out_k, cos, sin, positions, n_outer * n_inner, n_inner,
         *q.stride()[:3], *k.stride()[:3], *out_q.stride()[:3], *out_k.stride()[:3],
         n_q_heads, n_k_heads, q_groups, heads, head_dim, cos.stride()[0], cos.shape[0],
         *stride_pos),
        constexprs, options))



rotary = launcher(rotary_plan, "rotary")
