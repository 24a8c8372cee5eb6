"""Flash attention (FlashAttention-2), forward and backward, fixed-length or packed.

For one (sequence, query head h, kv head h // group), with scale τ and d = seqlen_k − seqlen_q
(masks are aligned to the bottom-right, as in flash-attn 2):

    s[i, j] = τ · q[i] · k[j]                       (softcap c > 0:  s ← c · tanh(s / c))
    key j visible from query i  ⇔  i + d − left <= j <= i + d + right    (causal: right = 0;
                                                                           −1: unbounded)
    lse[i]  = log Σ_visible exp(s[i, j])            (−inf for a row that sees no key)
    o[i]    = Σ_visible exp(s[i, j] − lse[i]) · v[j]          (0 for such a row)

The forward walks the visible key blocks of one query block with an online softmax in fp32
(base 2: exp2 of log2(e)-scaled scores). The backward, with p = exp(s − lse) and
δ[i] = Σ o[i] · do[i] − dlse[i] (dlse: the gradient reaching lse, which enters ds through
∂lse[i] / ∂s[i, j] = p[i, j]):

    dv[j] = Σ_i p[i, j] · do[i]
    ds[i, j] = p[i, j] · (do[i] · v[j] − δ[i])       (softcap: ds ← ds · (1 − (s / c)²))
    dq[i] = τ · Σ_j ds[i, j] · k[j],    dk[j] = τ · Σ_i ds[i, j] · q[i]

runs as two kernels, neither with atomics: one program per key block accumulates dk and dv
over every query block and every query head of its kv group (GQA sums there, in a fixed
order), one program per query block accumulates dq. Gradients are bitwise reproducible.

Masks only on the band. A program visits exactly the blocks of the other side that hold a
visible pair (``_key_range``, ``_query_range``), in ascending order, and computes the mask
only on those outside its unmasked run (``_key_blocks``, ``_query_blocks``): a block runs
unmasked when every pair of its tile is visible and it lies inside the sequence, so only the
blocks on a window edge (the causal diagonal is one) and the ragged last block pay for the
mask, as in FlashAttention-2 and Triton's fused-attention tutorial. An unmasked block
computes what the masked code computes on it, so results are bitwise those of masking every
block.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import Launch, make_launch

# Full-precision products: fp32 inputs would otherwise go through TF32 (13 mantissa bits
# lost); fp16/bf16 ignore it. ("tf32" is not even a valid choice on gfx90a.)
INPUT_PRECISION = "ieee"
# A constexpr, so kernels may read it (Triton takes only constexpr globals); .value on the host.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _bounds(CU, batch, fixed_len, VARLEN: tl.constexpr):
    """(start token, length) of sequence ``batch``: packed from cu_seqlens, or fixed."""
    if VARLEN:
        # fixed_len is the packed total. The op checks cu_seqlens in eager mode only: clamped
        # here, bad boundaries (inside a compiled graph) misplace rows but never reach
        # outside the tensors.
        start = tl.minimum(tl.maximum(tl.load(CU + batch).to(tl.int64), 0), fixed_len)
        end = tl.minimum(tl.maximum(tl.load(CU + batch + 1).to(tl.int64), start), fixed_len)
        length = (end - start).to(tl.int32)
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = fixed_len
    return start, length


@triton.jit
def _rows(BASE, batch, start, head, stride_b, stride_s, stride_h, VARLEN: tl.constexpr):
    """``BASE`` moved to token 0 of sequence ``batch`` at head ``head``, in a (batch, seq,
    heads, ...) tensor. Fixed length: the sequence is batch row ``batch``. Packed (batch 1,
    strides from the launchers' ``_strides``): it starts at token ``start`` of the one row.
    Offsets in 64 bits."""
    offset = head.to(tl.int64) * stride_h
    if VARLEN:
        offset += start * stride_s  # start: int64 (_bounds)
    else:
        offset += batch.to(tl.int64) * stride_b
    return BASE + offset


@triton.jit
def _stats_rows(BASE, batch, start, head, n_heads, seqlen_q, VARLEN: tl.constexpr):
    """``BASE`` moved to row (sequence ``batch``, head ``head``) of lse or δ: contiguous fp32
    (batch, heads, seqlen_q), packed (heads, total_q) (``seqlen_q`` is then the total)."""
    per_head = tl.zeros([], dtype=tl.int64) + seqlen_q  # 64 bits before any product
    return _rows(BASE, batch, start, head, per_head * n_heads, 1, per_head, VARLEN)


@triton.jit
def _tile(BASE, rows, stride_s, offs_d):
    """Pointers to the (rows, head_dim) tile of ``rows`` under a row base (unit stride along
    head_dim)."""
    return BASE + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :]


@triton.jit
def _visible(i, j, seqlen_q, seqlen_k, window_left, window_right, HAS_WINDOW: tl.constexpr):
    """Mask of the pairs (query i, key j), i and j broadcasting to the tile's shape (queries
    x keys, or keys x queries in the dk/dv kernel): the query and key exist and the key lies
    in the query's window."""
    mask = (i < seqlen_q) & (j < seqlen_k)
    if HAS_WINDOW:
        diag = i + (seqlen_k - seqlen_q)
        if window_left >= 0:
            mask = mask & (j >= diag - window_left)
        if window_right >= 0:
            mask = mask & (j <= diag + window_right)
    return mask


@triton.jit
def _key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The key blocks a query block [m_start, m_start + BLOCK_M) can see: [lo, hi)."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + seqlen_k
    if HAS_WINDOW:
        diag = m_start + seqlen_k - seqlen_q
        if window_left >= 0:
            lo = tl.maximum(diag - window_left, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if window_right >= 0:
            hi = tl.minimum(diag + BLOCK_M + window_right, seqlen_k)
    return lo, hi


@triton.jit
def _query_range(n_start, seqlen_q, seqlen_k, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The query blocks that can see a key block [n_start, n_start + BLOCK_N): [lo, hi)."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + seqlen_q
    if HAS_WINDOW:
        shift = seqlen_k - seqlen_q
        if window_right >= 0:
            lo = tl.maximum(n_start - shift - window_right, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        if window_left >= 0:
            hi = tl.minimum(n_start + BLOCK_N - shift + window_left, seqlen_q)
    return lo, hi


@triton.jit
def _key_blocks(m_start, seqlen_q, seqlen_k, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, hi, full_lo, full_hi): query block [m_start, m_start + BLOCK_M) visits the key
    blocks lo, lo + BLOCK_N, ... below hi (``_key_range``); of those, the blocks starting in
    [full_lo, full_hi) need no mask (both multiples of BLOCK_N; the run may be empty).

    Key block [n, n + BLOCK_N) needs no mask when it lies inside the keys
    (n + BLOCK_N <= seqlen_k) and every row i of the tile sees all of it: the last row from
    its left edge on (n >= m_start + BLOCK_M − 1 + d − left) and the first row up to its
    right edge (n + BLOCK_N <= m_start + d + right + 1). Rows past seqlen_q count as rows
    here: they are never stored, and each output row depends on its own scores only.
    """
    lo, hi = _key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
                        BLOCK_M, BLOCK_N, HAS_WINDOW)
    full_lo = lo
    end = tl.zeros([], dtype=tl.int32) + seqlen_k  # a tensor: the runtime ifs may move it
    if HAS_WINDOW:
        diag = m_start + seqlen_k - seqlen_q
        if window_left >= 0:
            full_lo = tl.cdiv(tl.maximum(diag + BLOCK_M - 1 - window_left, 0),
                              BLOCK_N) * BLOCK_N
        if window_right >= 0:
            end = tl.minimum(diag + window_right + 1, end)
    full_hi = (tl.maximum(end, 0) // BLOCK_N) * BLOCK_N  # the blocks that end by ``end``
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_blocks(n_start, seqlen_q, seqlen_k, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, hi, full_lo, full_hi): the query blocks lo, lo + BLOCK_M, ... below hi see key
    block [n_start, n_start + BLOCK_N) (``_query_range``); of those, the blocks starting in
    [full_lo, full_hi) need no mask (both multiples of BLOCK_M; the run may be empty).

    Query block [m, m + BLOCK_M) needs no mask when it lies inside the queries
    (m + BLOCK_M <= seqlen_q) and each of its rows sees every key of the tile: the last key
    from row m on (m >= n_start + BLOCK_N − 1 − d − right) and the first key up to its last
    row (m + BLOCK_M <= n_start − d + left + 1). Keys past seqlen_k count as keys here:
    their dk and dv rows are never stored and depend on their own scores only. The ragged
    last query block is masked: its missing rows are summed into every key's dk and dv, and
    the mask is what keeps them out.
    """
    lo, hi = _query_range(n_start, seqlen_q, seqlen_k, window_left, window_right,
                          BLOCK_M, BLOCK_N, HAS_WINDOW)
    full_lo = lo
    end = tl.zeros([], dtype=tl.int32) + seqlen_q  # a tensor: the runtime ifs may move it
    if HAS_WINDOW:
        shift = seqlen_k - seqlen_q
        if window_right >= 0:
            full_lo = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - shift - window_right, 0),
                              BLOCK_M) * BLOCK_M
        if window_left >= 0:
            end = tl.minimum(n_start - shift + window_left + 1, end)
    full_hi = (tl.maximum(end, 0) // BLOCK_M) * BLOCK_M  # the blocks that end by ``end``
    return lo, hi, full_lo, full_hi


@triton.jit
def _scores(q, k, qk_scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores in base 2 (s · log2 e) for q (M, D) and k^T (D, N), and the capped natural
    scores divided by the cap (t = tanh(.), for the softcap gradient) when softcapping."""
    s = tl.dot(q, k, input_precision=PRECISION)
    if SOFTCAP:
        # tanh(x) = 2·sigmoid(2x) − 1; qk_scale is τ / c here.
        t = 2.0 * tl.sigmoid(2.0 * s * qk_scale) - 1.0
        return t * (softcap * LOG2E), t
    return s * qk_scale, s


# The block loops below run over exactly the visible blocks, in ascending order, and compute
# the mask (``_visible``) only on a block outside the unmasked run [full_lo, full_hi): one on
# a window edge (the causal diagonal is one) or at a sequence's ragged end. The test is one
# scalar comparison per block, the same for the whole program, so the branch never diverges.
#
# One loop with that branch, not the fused-attention tutorial's separate masked and unmasked
# loops, because of what the compile check (kernels/aot.py) reported for them: on sm_90 the
# separate loops took the backward kernels to the 255-register cap (the causal GQA dk/dv
# kernel at head_dim 128 spilled 1.3 KB where masking every block spilled 48 bytes; the
# causal dq kernel 116-128 bytes where it spilled none), and this loop stays close to the
# masked-everywhere registers. The backward kernels select with an all-true mask off the
# band rather than select inside the branch: the latter made ptxas give sm_80's head_dim 64
# dk/dv kernel 32 registers and 10 KB of spills.


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    fixed_seqlen_q, fixed_seqlen_k, n_heads, group, head_dim,
    qk_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block of one (sequence, head): the online softmax over its visible key
    blocks, with s in base 2,

        m' = max(m, max_j s[:, j]),  l' = l · 2^(m − m') + Σ_j 2^(s[:, j] − m'),
        acc' = acc · 2^(m − m') + 2^(s − m') · v,

    then o = acc / l and lse = (m + log2 l) / log2 e (0 and −inf for a row that saw no key).
    """
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    q_start, seqlen_q = _bounds(CU_Q, batch, fixed_seqlen_q, VARLEN)
    k_start, seqlen_k = _bounds(CU_K, batch, fixed_seqlen_k, VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    kv_head = head // group
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]
    Q = _rows(Q, batch, q_start, head, stride_qb, stride_qs, stride_qh, VARLEN)
    K = _rows(K, batch, k_start, kv_head, stride_kb, stride_ks, stride_kh, VARLEN)
    V = _rows(V, batch, k_start, kv_head, stride_vb, stride_vs, stride_vh, VARLEN)
    q = tl.load(_tile(Q, offs_m, stride_qs, offs_d), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, full_lo, full_hi = _key_blocks(m_start, seqlen_q, seqlen_k, window_left,
                                           window_right, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(_tile(K, cols, stride_ks, offs_d), mask=kv_mask, other=0.0)
        s, _ = _scores(q, tl.trans(k), qk_scale, softcap, SOFTCAP, PRECISION)
        if (n_start < full_lo) | (n_start >= full_hi):  # on the band: mask
            visible = _visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k,
                               window_left, window_right, HAS_WINDOW)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = −inf: subtract 0 instead (no inf − inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(_tile(V, cols, stride_vs, offs_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    OUT = _rows(OUT, batch, q_start, head, stride_ob, stride_os, stride_oh, VARLEN)
    tl.store(_tile(OUT, offs_m, stride_os, offs_d), out.to(OUT.dtype.element_ty), mask=q_mask)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / LOG2E, float("-inf"))
    LSE = _stats_rows(LSE, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_delta_kernel(
    OUT, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    fixed_seqlen_q, n_heads, head_dim,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """δ[i] = Σ_d o[i, d] · do[i, d] in fp32, laid out like lse."""
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    q_start, seqlen_q = _bounds(CU_Q, batch, fixed_seqlen_q, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    OUT = _rows(OUT, batch, q_start, head, stride_ob, stride_os, stride_oh, VARLEN)
    DO = _rows(DO, batch, q_start, head, stride_dob, stride_dos, stride_doh, VARLEN)
    o = tl.load(_tile(OUT, offs_m, stride_os, offs_d), mask=mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, stride_dos, offs_d), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    DELTA = _stats_rows(DELTA, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
    tl.store(DELTA + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkvb, stride_dkvs, stride_dkvh,
    fixed_seqlen_q, fixed_seqlen_k, n_kv_heads, group, head_dim,
    qk_scale, sm_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of one (sequence, kv head), over the query heads of its group in order
    and their visible query blocks, in transposed tiles (keys x queries):

        p = 2^(s − lse · log2 e),  ds = p · (v · doᵀ − δ)  (· (1 − t²) under a softcap),
        dv = Σ p · do,  dk = τ · Σ ds · q.

    DK and DV share one layout (``stride_dkv*``)."""
    pid_n = tl.program_id(0)
    batch = tl.program_id(1) // n_kv_heads
    kv_head = tl.program_id(1) % n_kv_heads
    q_start, seqlen_q = _bounds(CU_Q, batch, fixed_seqlen_q, VARLEN)
    k_start, seqlen_k = _bounds(CU_K, batch, fixed_seqlen_k, VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen_k:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_mask = (offs_n[:, None] < seqlen_k) & d_mask[None, :]
    K = _rows(K, batch, k_start, kv_head, stride_kb, stride_ks, stride_kh, VARLEN)
    V = _rows(V, batch, k_start, kv_head, stride_vb, stride_vs, stride_vh, VARLEN)
    k = tl.load(_tile(K, offs_n, stride_ks, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, offs_n, stride_vs, offs_d), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi, full_lo, full_hi = _query_blocks(n_start, seqlen_q, seqlen_k, window_left,
                                             window_right, BLOCK_M, BLOCK_N, HAS_WINDOW)
    n_heads = n_kv_heads * group
    for g in range(group):  # the query heads of this kv head, in a fixed order
        head = kv_head * group + g
        Qh = _rows(Q, batch, q_start, head, stride_qb, stride_qs, stride_qh, VARLEN)
        DOh = _rows(DO, batch, q_start, head, stride_dob, stride_dos, stride_doh, VARLEN)
        LSEh = _stats_rows(LSE, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
        DELTAh = _stats_rows(DELTA, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + offs_m
            q_mask = (rows[:, None] < seqlen_q) & d_mask[None, :]
            q = tl.load(_tile(Qh, rows, stride_qs, offs_d), mask=q_mask, other=0.0)
            do = tl.load(_tile(DOh, rows, stride_dos, offs_d), mask=q_mask, other=0.0)
            lse = tl.load(LSEh + rows, mask=rows < seqlen_q, other=0.0)
            delta = tl.load(DELTAh + rows, mask=rows < seqlen_q, other=0.0)
            s, t = _scores(k, tl.trans(q), qk_scale, softcap, SOFTCAP, PRECISION)
            p = tl.exp2(s - lse[None, :] * LOG2E)
            visible = tl.full([BLOCK_N, BLOCK_M], 1, tl.int1)
            if (m_start < full_lo) | (m_start >= full_hi):  # on the band: mask
                visible = _visible(rows[None, :], offs_n[:, None], seqlen_q, seqlen_k,
                                   window_left, window_right, HAS_WINDOW)
            p = tl.where(visible, p, 0.0)
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds = p * (dp.to(tl.float32) - delta[None, :])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    DK = _rows(DK, batch, k_start, kv_head, stride_dkvb, stride_dkvs, stride_dkvh, VARLEN)
    DV = _rows(DV, batch, k_start, kv_head, stride_dkvb, stride_dkvs, stride_dkvh, VARLEN)
    tl.store(_tile(DK, offs_n, stride_dkvs, offs_d), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(_tile(DV, offs_n, stride_dkvs, offs_d), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    fixed_seqlen_q, fixed_seqlen_k, n_heads, group, head_dim,
    qk_scale, sm_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block of one (sequence, head), over its visible key blocks:

        p = 2^(s − lse · log2 e),  ds = p · (do · vᵀ − δ)  (· (1 − t²) under a softcap),
        dq = τ · Σ ds · k.
    """
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    q_start, seqlen_q = _bounds(CU_Q, batch, fixed_seqlen_q, VARLEN)
    k_start, seqlen_k = _bounds(CU_K, batch, fixed_seqlen_k, VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    kv_head = head // group
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]
    Q = _rows(Q, batch, q_start, head, stride_qb, stride_qs, stride_qh, VARLEN)
    DO = _rows(DO, batch, q_start, head, stride_dob, stride_dos, stride_doh, VARLEN)
    q = tl.load(_tile(Q, offs_m, stride_qs, offs_d), mask=q_mask, other=0.0)
    do = tl.load(_tile(DO, offs_m, stride_dos, offs_d), mask=q_mask, other=0.0)
    LSE = _stats_rows(LSE, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
    DELTA = _stats_rows(DELTA, batch, q_start, head, n_heads, fixed_seqlen_q, VARLEN)
    lse = tl.load(LSE + offs_m, mask=offs_m < seqlen_q, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < seqlen_q, other=0.0)
    K = _rows(K, batch, k_start, kv_head, stride_kb, stride_ks, stride_kh, VARLEN)
    V = _rows(V, batch, k_start, kv_head, stride_vb, stride_vs, stride_vh, VARLEN)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, full_lo, full_hi = _key_blocks(m_start, seqlen_q, seqlen_k, window_left,
                                           window_right, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(_tile(K, cols, stride_ks, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, cols, stride_vs, offs_d), mask=kv_mask, other=0.0)
        s, t = _scores(q, tl.trans(k), qk_scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None] * LOG2E)
        visible = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
        if (n_start < full_lo) | (n_start >= full_hi):  # on the band: mask
            visible = _visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k,
                               window_left, window_right, HAS_WINDOW)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp.to(tl.float32) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    DQ = _rows(DQ, batch, q_start, head, stride_dqb, stride_dqs, stride_dqh, VARLEN)
    tl.store(_tile(DQ, offs_m, stride_dqs, offs_d), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# Block sizes per (vendor, head_dim bound) and kernel: (BLOCK_M, BLOCK_N, num_warps,
# num_stages). The dk/dv kernel holds a key block and steps over query rows, the dq kernel
# the reverse, so each gets its own shape (the δ kernel takes dq's BLOCK_M). Pinned, not
# autotuned: the configuration (and with it the summation order) is a pure function of the
# device model, the dtype and the shapes, the same on every rank and every run. AMD: one
# stage (no software pipelining on CDNA), warps counted in 64-wide wavefronts.
FWD_CONFIGS = {
    # head_dim 128 on an H100 (benchmarks/tune.py, 4 x 4096 tokens, 16 heads, bf16): (64, 64,
    # 4 warps, 3 stages) took causal 1.040 -> 0.917 ms, non-causal 1.340 -> 1.365 ms.
    "nvidia": {64: (128, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 4, 2)},
    "amd": {64: (128, 64, 4, 1), 128: (128, 64, 4, 1), 256: (64, 32, 4, 1)},
}
BWD_CONFIGS = {
    # head_dim 128 on an H100 (same sweep): the whole backward took 12.4 ms non-causal and
    # 6.7 ms causal with (32, 64, 8 warps, 1 stage) for both kernels. 4 warps and 2 stages
    # cut dk/dv's share by 4.2 / 2.3 ms with (32, 64) (64 query rows: 4.6 / 2.3 ms, but 500
    # bytes of spills with GQA in the sm_90 compile) and dq's by 4.2 / 2.0 ms with (64, 64).
    "nvidia": {64: {"dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)},
               128: {"dkdv": (32, 64, 4, 2), "dq": (64, 64, 4, 2)},
               256: {"dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)}},
    "amd": {64: {"dkdv": (64, 64, 4, 1), "dq": (64, 64, 4, 1)},
            128: {"dkdv": (64, 64, 4, 1), "dq": (64, 64, 4, 1)},
            256: {"dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}},
}
KERNELS = ("forward", "dkdv", "dq")
# Two waves per SIMD cap a program at 256 VGPRs: the forward fits; the backward, holding dk
# and dv accumulators, spilled 50-330 VGPRs there, and gets one wave (512 VGPRs) instead.
AMD_WAVES_PER_EU = {"forward": 2, "dkdv": 1, "dq": 1}
# fp32 inputs multiply in full fp32, which Triton emulates with FMAs (no tensor cores):
# large tiles spilled heavily, so fp32 (a testing dtype) gets small ones everywhere.
FP32_CONFIGS = {"forward": (32, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (16, 32, 4, 1)}
# Triton's CPU interpreter: the smallest tiles tl.dot takes, so odd test shapes span blocks.
INTERPRETER_CONFIG = (16, 16, 4, 1)


def vendor(device: torch.device) -> str:
    """"nvidia", "amd" or "interpreter" (CPU tensors under TRITON_INTERPRET)."""
    if device.type != "cuda":
        return "interpreter"
    return "amd" if torch.version.hip else "nvidia"


# Host-side integer arithmetic, cached per value: triton.next_power_of_2 and triton.cdiv are
# constexpr functions, about 2 µs a call from the host, several per launch. The configuration
# itself is not cached: benchmarks/tune.py patches the tables above in place.
@functools.lru_cache(maxsize=256)
def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@functools.lru_cache(maxsize=1024)
def _blocks(length: int, block: int) -> int:
    """Blocks of ``block`` covering ``length`` (at least one)."""
    return triton.cdiv(max(length, 1), block)


def launch_config(head_dim: int, vendor_name: str, kernel: str, fp32: bool = False) -> dict:
    """Tiles, warps and stages of ``kernel`` ("forward", "dkdv" or "dq") for one head_dim:
    the single source of launch configurations (the launchers use it; the ahead-of-time
    compile check enumerates its outputs)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    block_d = _block_d(head_dim)
    if vendor_name == "interpreter":
        block_m, block_n, warps, stages = INTERPRETER_CONFIG
    elif fp32:
        block_m, block_n, warps, stages = FP32_CONFIGS[kernel]
    else:
        table = (FWD_CONFIGS if kernel == "forward" else BWD_CONFIGS)[vendor_name]
        bound = next(b for b in sorted(table) if block_d <= b)
        entry = table[bound]
        block_m, block_n, warps, stages = entry if kernel == "forward" else entry[kernel]
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
           "num_warps": warps, "num_stages": stages}
    if vendor_name == "amd":
        cfg["waves_per_eu"] = AMD_WAVES_PER_EU[kernel]
    return cfg


def _strides(t, varlen: bool):
    """(batch, seq, head) strides of a (batch, seq, heads, head_dim) view, as the kernels take
    them (``_rows``). Packed inputs come as batch 1, where the batch index walks sequences
    (their starts come from cu_seqlens), not memory: batch stride 0, one binary whatever
    the packed total."""
    batch, seq, head = t.stride()[:3]  # one stride() call: plans run on every launch
    return (0 if varlen else batch), seq, head


def _with_strides(t, like):
    """``t`` when it is laid out as the kernels need (contiguous, or with ``like``'s strides),
    else an empty tensor of its shape that is: the kernel writes there and the launcher
    copies the result into ``t`` after. The kernels take no strides for lse and δ (they
    derive them) and one set for dk and dv; the op's own tensors always fit."""
    if like is None:
        if t.is_contiguous():
            return t
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if t.stride() == like.stride():
        return t
    return torch.empty_strided(t.shape, like.stride(), dtype=t.dtype, device=t.device)


# What a launch_config entry is to a kernel: a tile (a constexpr) or a launch option.
_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_D")


def _static(cfg: dict, tiles: tuple[str, ...], flags: dict) -> tuple[dict, dict]:
    """(constexprs, launch options) of a launch under ``cfg`` (launch_config's): the flags
    and the kernel's ``tiles``; the warps, stages and vendor options (AMD's waves_per_eu)."""
    constexprs, options = dict(flags), dict(cfg)
    for tile in _TILES:
        value = options.pop(tile)
        if tile in tiles:
            constexprs[tile] = value
    return constexprs, options


def _shared_args(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, window, softcap):
    """What every launch of one attention derives alike: (varlen, sequences, heads, kv
    heads, head_dim, the cu_seqlens pointers, the score scale, the cap, the flags)."""
    varlen = cu_seqlens_q is not None
    heads, head_dim = q.shape[2], q.shape[3]
    n_seqs = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    # Not packed: q stands in for cu_seqlens, never read (VARLEN is off).
    cu = (cu_seqlens_q, cu_seqlens_k) if varlen else (q, q)
    scale, cap, flags = _scale_args(softmax_scale, softcap, window)
    return varlen, n_seqs, heads, k.shape[2], head_dim, cu, scale, cap, flags


def _group(heads: int, kv_heads: int) -> int:
    """Query heads per kv head (1 for no heads at all: the grid is then empty)."""
    return heads // kv_heads if heads else 1


def attn_fwd_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
                  softmax_scale: float, window: tuple[int, int], softcap: float,
                  vendor_name: str) -> Launch:
    """The forward launch over :func:`flash_attn_fwd`'s arguments, on ``vendor_name``'s GPUs
    (:func:`vendor`), with ``lse`` contiguous: one program per (query block, sequence x
    head); none for no sequences, no heads or max_seqlen_q 0."""
    varlen, n_seqs, heads, kv_heads, head_dim, cu, scale, cap, flags = _shared_args(
        q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, window, softcap)
    cfg = launch_config(head_dim, vendor_name, "forward", fp32=q.dtype == torch.float32)
    constexprs, options = _static(cfg, _TILES, dict(VARLEN=varlen, **flags,
                                                    PRECISION=INPUT_PRECISION))
    grid = (_blocks(max_seqlen_q, cfg["BLOCK_M"]) if max_seqlen_q else 0, n_seqs * heads)
    return make_launch((
        _attn_fwd_kernel, grid,
        (q, k, v, out, lse, *cu, *_strides(q, varlen), *_strides(k, varlen),
         *_strides(v, varlen), *_strides(out, varlen), q.shape[1], k.shape[1], heads,
         _group(heads, kv_heads), head_dim, scale, cap, *window),
        constexprs, options))


class AttnBwdLaunches(NamedTuple):
    """The backward's three launches, in the order they run."""

    delta: Launch  # δ = Σ o · do per query row
    dkdv: Launch
    dq: Launch


def attn_bwd_plan(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
                  cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
                  max_seqlen_k: int, softmax_scale: float, window: tuple[int, int],
                  softcap: float, vendor_name: str) -> AttnBwdLaunches:
    """The backward's launches over :func:`flash_attn_bwd`'s arguments, on ``vendor_name``'s
    GPUs, with ``lse`` and ``delta`` contiguous and dv laid out as dk: δ, dk/dv (one program
    per key block of each kv head) and dq (one per query block of each head). Without
    sequences or heads every grid is empty (the launcher then zeroes dk and dv itself)."""
    varlen, n_seqs, heads, kv_heads, head_dim, cu, scale, cap, flags = _shared_args(
        q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, window, softcap)
    fp32 = q.dtype == torch.float32
    dkdv_cfg, dq_cfg = (launch_config(head_dim, vendor_name, kernel, fp32)
                        for kernel in ("dkdv", "dq"))
    qs, ks, vs, dos = (_strides(t, varlen) for t in (q, k, v, do))
    q_grid = (_blocks(max_seqlen_q, dq_cfg["BLOCK_M"]), n_seqs * heads)
    lengths = (q.shape[1], k.shape[1])  # fixed, or the packed totals
    tail = (_group(heads, kv_heads), head_dim, scale, softmax_scale, cap, *window)
    flags = dict(VARLEN=varlen, **flags, PRECISION=INPUT_PRECISION)
    return AttnBwdLaunches(
        make_launch((_attn_bwd_delta_kernel, q_grid,
                     (out, do, delta, cu[0], *_strides(out, varlen), *dos, q.shape[1], heads,
                      head_dim),
                     *_static(dq_cfg, ("BLOCK_M", "BLOCK_D"), {"VARLEN": varlen}))),
        make_launch((_attn_bwd_dkdv_kernel,
                     (_blocks(max_seqlen_k, dkdv_cfg["BLOCK_N"]), n_seqs * kv_heads),
                     (q, k, v, do, lse, delta, dk, dv, *cu, *qs, *ks, *vs, *dos,
                      *_strides(dk, varlen), *lengths, kv_heads, *tail),
                     *_static(dkdv_cfg, _TILES, flags))),
        make_launch((_attn_bwd_dq_kernel, q_grid,
                     (q, k, v, do, lse, delta, dq, *cu, *qs, *ks, *vs, *dos,
                      *_strides(dq, varlen), *lengths, heads, *tail),
                     *_static(dq_cfg, _TILES, flags))))


def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
                   softmax_scale: float, window: tuple[int, int], softcap: float) -> None:
    """Launches the forward into ``out`` and ``lse``.

    q, out: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim);
    packed: batch = 1 and cu_seqlens_q/k (sequences + 1,) int32 give the sequences (then
    max_seqlen_q bounds their lengths). Unit stride along head_dim. lse: fp32, (batch, heads,
    seqlen_q), packed (heads, total_q) (a strided one is written through a contiguous copy).
    window: (left, right), -1 for unbounded.
    """
    stats = _with_strides(lse, None)
    attn_fwd_plan(q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  softmax_scale, window, softcap, vendor(q.device)).run()
    if stats is not lse:
        lse.copy_(stats)


def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   dq: Tensor, dk: Tensor, dv: Tensor, cu_seqlens_q: Tensor | None,
                   cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                   softmax_scale: float, window: tuple[int, int], softcap: float,
                   dlse: Tensor | None = None) -> None:
    """Launches the backward: δ, then dk and dv, then dq, into preallocated gradients shaped
    like their inputs (dv is written through a copy when its strides are not dk's). Shapes
    as for :func:`flash_attn_fwd`; do like out; dlse (the gradient reaching lse, any
    strides) like lse, or None."""
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # contiguous, like lse
    dv_out = _with_strides(dv, dk)
    launches = attn_bwd_plan(do, q, k, v, out, lse, delta, dq, dk, dv_out, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window,
                             softcap, vendor(q.device))
    if 0 in launches.dkdv.grid:  # no sequences or no heads: no key's gradient
        dk.zero_()
        dv.zero_()
        return
    launches.delta.run()
    if dlse is not None:  # lse's gradient joins ds as −δ does (module docstring)
        delta.sub_(dlse)
    launches.dkdv.run()
    if dv_out is not dv:
        dv.copy_(dv_out)
    launches.dq.run()


def _scale_args(softmax_scale: float, softcap: float, window: tuple[int, int]):
    """The kernels' score scale (base 2, or τ / c under a softcap), cap and flags."""
    scale = softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E.value
    flags = {"HAS_WINDOW": window[0] >= 0 or window[1] >= 0, "SOFTCAP": softcap > 0}
    return float(scale), float(softcap), flags
