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
"""

import functools

import torch
import triton
import triton.language as tl

# Full-precision products: fp32 inputs would otherwise go through TF32 (13 mantissa bits
# lost); fp16/bf16 ignore it. ("tf32" is not even a valid choice on gfx90a.)
INPUT_PRECISION = "ieee"
LOG2E = 1.4426950408889634


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
def _visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
             HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: the key exists and lies in the query's window."""
    mask = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_WINDOW:
        diag = offs_m[:, None] + (seqlen_k - seqlen_q)
        if window_left >= 0:
            mask = mask & (offs_n[None, :] >= diag - window_left)
        if window_right >= 0:
            mask = mask & (offs_n[None, :] <= diag + window_right)
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
def _scores(q, k, qk_scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores in base 2 (s · log2 e) for q (M, D) and k^T (D, N), and the capped natural
    scores divided by the cap (t = tanh(.), for the softcap gradient) when softcapping."""
    s = tl.dot(q, k, input_precision=PRECISION)
    if SOFTCAP:
        # tanh(x) = 2·sigmoid(2x) − 1; qk_scale is τ / c here.
        t = 2.0 * tl.sigmoid(2.0 * s * qk_scale) - 1.0
        return t * (softcap * 1.4426950408889634), t
    return s * qk_scale, s


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    fixed_seqlen_q, fixed_seqlen_k, n_heads, group, head_dim,
    qk_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
    Q += batch.to(tl.int64) * stride_qb + q_start * stride_qs + head.to(tl.int64) * stride_qh
    K += batch.to(tl.int64) * stride_kb + k_start * stride_ks + kv_head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + k_start * stride_vs + kv_head.to(tl.int64) * stride_vh
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=(offs_m[:, None] < seqlen_q) & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
                        BLOCK_M, BLOCK_N, HAS_WINDOW)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(K + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s, _ = _scores(q, tl.trans(k), qk_scale, softcap, SOFTCAP, PRECISION)
        visible = _visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right,
                           HAS_WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = −inf: subtract 0 instead (no inf − inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    OUT += batch.to(tl.int64) * stride_ob + q_start * stride_os + head.to(tl.int64) * stride_oh
    tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & d_mask[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    LSE += batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_delta_kernel(
    OUT, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
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
    rows = (q_start + offs_m[:, None].to(tl.int64))
    o = tl.load(OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + rows * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + rows * stride_dos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    DELTA += batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    tl.store(DELTA + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    fixed_seqlen_q, fixed_seqlen_k, n_kv_heads, group, head_dim,
    qk_scale, sm_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
    rows_n = (k_start + offs_n[:, None].to(tl.int64))
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                + rows_n * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                + rows_n * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(n_start, seqlen_q, seqlen_k, window_left, window_right,
                          BLOCK_M, BLOCK_N, HAS_WINDOW)
    for g in range(group):  # the query heads of this kv head, in a fixed order
        head = (kv_head * group + g).to(tl.int64)
        Qh = Q + batch.to(tl.int64) * stride_qb + head * stride_qh + q_start * stride_qs
        DOh = DO + batch.to(tl.int64) * stride_dob + head * stride_doh + q_start * stride_dos
        row_stats = batch.to(tl.int64) * stride_lb + head * stride_lh + q_start
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + offs_m
            q_mask = (rows[:, None] < seqlen_q) & d_mask[None, :]
            q = tl.load(Qh + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                        mask=q_mask, other=0.0)
            do = tl.load(DOh + rows[:, None].to(tl.int64) * stride_dos + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_stats + rows, mask=rows < seqlen_q, other=0.0)
            delta = tl.load(DELTA + row_stats + rows, mask=rows < seqlen_q, other=0.0)
            # Transposed tiles (keys x queries): dk and dv accumulate along the key rows.
            s, t = _scores(k, tl.trans(q), qk_scale, softcap, SOFTCAP, PRECISION)
            visible = tl.trans(_visible(rows, offs_n, seqlen_q, seqlen_k, window_left,
                                        window_right, HAS_WINDOW))
            p = tl.where(visible, tl.exp2(s - lse[None, :] * 1.4426950408889634), 0.0)
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds = p * (dp.to(tl.float32) - delta[None, :])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    store_mask = (offs_n[:, None] < seqlen_k) & d_mask[None, :]
    tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
             + (k_start + offs_n[:, None].to(tl.int64)) * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
             + (k_start + offs_n[:, None].to(tl.int64)) * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    fixed_seqlen_q, fixed_seqlen_k, n_heads, group, head_dim,
    qk_scale, sm_scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
    rows = q_start + offs_m[:, None].to(tl.int64)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + rows * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + rows * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
    row_stats = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    lse = tl.load(LSE + row_stats + offs_m, mask=offs_m < seqlen_q, other=0.0)
    delta = tl.load(DELTA + row_stats + offs_m, mask=offs_m < seqlen_q, other=0.0)
    K += batch.to(tl.int64) * stride_kb + k_start * stride_ks + kv_head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + k_start * stride_vs + kv_head.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
                        BLOCK_M, BLOCK_N, HAS_WINDOW)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(K + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s, t = _scores(q, tl.trans(k), qk_scale, softcap, SOFTCAP, PRECISION)
        visible = _visible(offs_m, cols, seqlen_q, seqlen_k, window_left, window_right,
                           HAS_WINDOW)
        p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp.to(tl.float32) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
             + rows * stride_dqs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
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
MAX_HEAD_DIM = 256


def vendor(device) -> str:
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


def _strides4(t):
    """(batch, seq, head) strides of a (batch, seq, heads, head_dim) view."""
    return t.stride(0), t.stride(1), t.stride(2)


def flash_attn_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                   softmax_scale: float, window: tuple[int, int], softcap: float) -> None:
    """Launches the forward into ``out`` and ``lse``.

    q, out: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim);
    packed: batch = 1 and cu_seqlens_q/k (sequences + 1,) int32 give the sequences (then
    max_seqlen_q bounds their lengths). Unit stride along head_dim. lse: fp32, (batch, heads,
    seqlen_q), packed (heads, total_q). window: (left, right), -1 for unbounded.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.shape[0] - 1 if varlen else batch
    cfg = launch_config(head_dim, vendor(q.device), "forward", fp32=q.dtype == torch.float32)
    if n_seqs == 0 or max_seqlen_q == 0 or heads == 0:
        return
    grid = (_blocks(max_seqlen_q, cfg["BLOCK_M"]), n_seqs * heads)
    qs, ks, vs, os_ = (_strides4(t) for t in (q, k, v, out))
    if varlen:  # one packed row: the batch index walks sequences, not memory
        qs, ks, vs, os_ = ((0, s[1], s[2]) for s in (qs, ks, vs, os_))
        lse_strides = (0, lse.stride(0))
    else:
        lse_strides = (lse.stride(0), lse.stride(1))
    scale, cap, flags = _scale_args(softmax_scale, softcap, window)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q,
        *qs, *ks, *vs, *os_, *lse_strides,
        seqlen_q, seqlen_k, heads, heads // kv_heads, head_dim,
        scale, cap, window[0], window[1],
        VARLEN=varlen, **flags, PRECISION=INPUT_PRECISION,
        **cfg,
    )


def flash_attn_bwd(do, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                   window: tuple[int, int], softcap: float, dlse=None) -> None:
    """Launches the backward: δ, then dk and dv, then dq, into preallocated gradients laid
    out like their inputs. Shapes as for :func:`flash_attn_fwd`; do like out; dlse (the
    gradient reaching lse, any strides) like lse, or None."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.shape[0] - 1 if varlen else batch
    fp32 = q.dtype == torch.float32
    dkdv_cfg, dq_cfg = (launch_config(head_dim, vendor(q.device), kernel, fp32)
                        for kernel in ("dkdv", "dq"))
    if n_seqs == 0 or heads == 0:
        dk.zero_()
        dv.zero_()
        return
    delta = torch.empty_like(lse)
    strides = [_strides4(t) for t in (q, k, v, do, out, dq, dk, dv)]
    if varlen:
        strides = [(0, s[1], s[2]) for s in strides]
        lse_strides = (0, lse.stride(0))
    else:
        lse_strides = (lse.stride(0), lse.stride(1))
    qs, ks, vs, dos, os_, dqs, dks, dvs = strides
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    scale, cap, flags = _scale_args(softmax_scale, softcap, window)
    q_grid = (_blocks(max_seqlen_q, dq_cfg["BLOCK_M"]), n_seqs * heads)
    _attn_bwd_delta_kernel[q_grid](
        out, do, delta, cu_q, *os_, *dos, *lse_strides, seqlen_q, heads, head_dim,
        VARLEN=varlen, **_without(dq_cfg, "BLOCK_N"))
    if dlse is not None:  # lse's gradient joins ds as −δ does (module docstring)
        delta.sub_(dlse)
    common = (seqlen_q, seqlen_k)
    _attn_bwd_dkdv_kernel[(_blocks(max_seqlen_k, dkdv_cfg["BLOCK_N"]), n_seqs * kv_heads)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *qs, *ks, *vs, *dos, *dks, *dvs,
        *lse_strides, *common, kv_heads, heads // kv_heads, head_dim,
        scale, softmax_scale, cap, window[0], window[1],
        VARLEN=varlen, **flags, PRECISION=INPUT_PRECISION, **dkdv_cfg)
    _attn_bwd_dq_kernel[q_grid](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *qs, *ks, *vs, *dos, *dqs, *lse_strides,
        *common, heads, heads // kv_heads, head_dim,
        scale, softmax_scale, cap, window[0], window[1],
        VARLEN=varlen, **flags, PRECISION=INPUT_PRECISION, **dq_cfg)


def _without(cfg: dict, key: str) -> dict:
    """``cfg`` less one entry (the δ kernel has no BLOCK_N)."""
    return {k: v for k, v in cfg.items() if k != key}


def _scale_args(softmax_scale: float, softcap: float, window: tuple[int, int]):
    """The kernels' score scale (base 2, or τ / c under a softcap), cap and flags."""
    scale = softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E
    flags = {"HAS_WINDOW": window[0] >= 0 or window[1] >= 0, "SOFTCAP": softcap > 0}
    return float(scale), float(softcap), flags
