"""eurocore.ops.flash_attention and flash_attention_varlen against their float64 reference,
on every kernel backend.

The oracle (docs/design.md, after FlashAttention): the error against the float64 reference is at
most twice the error of the plain PyTorch reference run in the same low precision
(``attention_reference(..., upcast=False)``), plus 1e-5. Under the CPU interpreter the tiles
are 16 x 16, so lengths 17, 33 and 113 span several query and key blocks.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

import eurocore.ops.attention as attention
from eurocore.kernels import flash_attention as fa
from eurocore.ops import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from eurocore.ops.attention import attention_mask
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

KERNEL_BACKENDS = [b for b in attention.IMPLEMENTED if b != "torch"]
# The interpreter multiplies raw bits in a bfloat16 tl.dot (docs/design.md): bf16 on a GPU only.
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if torch.cuda.is_available() else [])]
# The absolute term of the oracle, for outputs and gradients alike (scaled by max|ref|, >= 1).
ATOL = 1e-5
NAMES = ("out", "lse", "dq", "dk", "dv")

# Packed sequences: q lengths 1, 17, 0, 7 against k lengths 3, 7, 2, 18 (a single query, more
# queries than keys, an empty query sequence beside two keys, more keys than queries).
CU_Q = [0, 1, 18, 18, 25]
CU_K = [0, 3, 10, 12, 30]
MAX_Q, MAX_K = 17, 18


# -------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------


def _randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _inputs(gen, shape, dtype):
    """q, k, v leaves and an output gradient for (batch, seqlen_q, seqlen_k, heads, kv_heads,
    head_dim); packed (no batch) for a 5-tuple (total_q, total_k, heads, kv_heads, head_dim)."""
    if len(shape) == 6:
        batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = shape
        q_shape = (batch, seqlen_q, heads, head_dim)
        k_shape = (batch, seqlen_k, kv_heads, head_dim)
    else:
        total_q, total_k, heads, kv_heads, head_dim = shape
        q_shape, k_shape = (total_q, heads, head_dim), (total_k, kv_heads, head_dim)
    q = _randn(gen, *q_shape, dtype=dtype, requires_grad=True)
    k = _randn(gen, *k_shape, dtype=dtype, requires_grad=True)
    v = _randn(gen, *k_shape, dtype=dtype, requires_grad=True)
    dout = _randn(gen, *q_shape, dtype=dtype)
    return q, k, v, dout


def _leaf64(t):
    return t.detach().double().requires_grad_()


def _run(fn, q, k, v, dout, **kwargs):
    """fn(q, k, v, **kwargs) -> (out, lse); returns [out, lse, dq, dk, dv]."""
    out, lse = fn(q, k, v, **kwargs)
    return [out, lse, *torch.autograd.grad(out, (q, k, v), dout)]


def _kernel(backend, **fixed):
    return functools.partial(flash_attention, return_lse=True, backend=backend, **fixed)


def _kernel_varlen(backend, cu_q, cu_k, max_q=MAX_Q, max_k=MAX_K):
    def fn(q, k, v, **kwargs):
        return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                      backend=backend, **kwargs)

    return fn


def _assert_lse_close(lse, reference64, same_precision, name):
    """Rows that see no key have lse -inf exactly; the finite rest within the oracle."""
    assert lse.shape == reference64.shape, f"{name}: shape {lse.shape} vs {reference64.shape}"
    assert lse.dtype == torch.float32, f"{name}: dtype {lse.dtype}"
    assert not lse.isnan().any(), f"{name}: NaN"
    ref = reference64.detach().to(lse.device)
    dead = ref == float("-inf")
    assert torch.equal(lse == float("-inf"), dead), f"{name}: -inf where the reference is not"
    assert_close_to_reference(lse[~dead], ref[~dead], same_precision.detach()[~dead],
                              name=name, atol=ATOL)


def _assert_all_close(actual, same_precision, reference64, what):
    for name, a, s, ref in zip(NAMES, actual, same_precision, reference64, strict=True):
        if name == "lse":
            _assert_lse_close(a, ref, s, f"{what} lse")
        else:
            assert_close_to_reference(a, ref, s, name=f"{what} {name}", atol=ATOL)


def _unseen_rows(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), **_):
    """(seqlen_q,) bool: the queries that see no key."""
    left, right = (window_size[0], 0) if causal else window_size
    return ~attention_mask(seqlen_q, seqlen_k, left, right, DEVICE).any(dim=-1)


def _assert_unseen_rows_zero(actual, unseen, what):
    """out and dq are exactly 0 and lse is -inf on the rows that see no key (fixed length)."""
    out, lse, dq = actual[0], actual[1], actual[2]
    assert torch.equal(out[:, unseen], torch.zeros_like(out[:, unseen])), f"{what}: out"
    assert (lse[:, :, unseen] == float("-inf")).all(), f"{what}: lse"
    assert torch.equal(dq[:, unseen], torch.zeros_like(dq[:, unseen])), f"{what}: dq"
    for name, t in zip(NAMES, actual, strict=True):
        assert not t.isnan().any(), f"{what}: NaN in {name}"


def _compare(backend, dtype, shape, *, seed=0, **options):
    """Kernel forward (out, lse) and backward (dq, dk, dv) within the oracle; returns the
    kernel's [out, lse, dq, dk, dv] and the mask of queries that see no key."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = _inputs(gen, shape, dtype)
    actual = _run(_kernel(backend), q, k, v, dout, **options)
    same_precision = _run(functools.partial(attention_reference, upcast=False), q, k, v, dout,
                          **options)
    reference64 = _run(attention_reference, _leaf64(q), _leaf64(k), _leaf64(v), dout.double(),
                       **options)
    what = f"{backend} {shape} {dtype} {options}"
    _assert_all_close(actual, same_precision, reference64, what)
    unseen = _unseen_rows(shape[1], shape[2], **options)
    _assert_unseen_rows_zero(actual, unseen, what)
    return actual, unseen


def _compare_varlen(backend, dtype, heads, kv_heads, head_dim, *, bounds_q=CU_Q,
                    bounds_k=CU_K, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = _inputs(gen, (bounds_q[-1], bounds_k[-1], heads, kv_heads, head_dim), dtype)
    cu_q, cu_k = _cu(bounds_q), _cu(bounds_k)
    max_q, max_k = (max(b - a for a, b in itertools.pairwise(c)) for c in (bounds_q, bounds_k))
    actual = _run(_kernel_varlen(backend, cu_q, cu_k, max_q, max_k), q, k, v, dout, **options)

    def reference(q, k, v, **kwargs):
        return attention_varlen_reference(q, k, v, cu_q, cu_k, **kwargs)

    same_precision = _run(reference, q, k, v, dout, upcast=False, **options)
    reference64 = _run(reference, _leaf64(q), _leaf64(k), _leaf64(v), dout.double(), **options)
    _assert_all_close(actual, same_precision, reference64,
                      f"{backend} varlen {dtype} {heads}/{kv_heads} {head_dim} {options}")
    for name, t in zip(NAMES, actual, strict=True):
        assert not t.isnan().any(), f"NaN in {name}"
    return actual


# -------------------------------------------------------------------------------------------
# Forward and backward against the float64 reference
# -------------------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)
CASES = {
    "b2-h4-17": (2, 17, 17, 4, 4, 32),
    "17x33": (1, 17, 33, 2, 2, 16),
    "33x17": (1, 33, 17, 2, 2, 16),
    # seqlen_k - seqlen_q = 1: the causal diagonal of each query block ends one key into the
    # next key block.
    "gqa4/2-17x18": (1, 17, 18, 4, 2, 16),
    "1x1": (2, 1, 1, 2, 2, 16),
    "1x17": (1, 1, 17, 2, 1, 24),
    "17x1": (1, 17, 1, 2, 1, 16),
    "gqa4/2-b2-33": (2, 33, 33, 4, 2, 32),
    "mqa4/1-17x33": (1, 17, 33, 4, 1, 32),
    "d64": (1, 17, 17, 2, 1, 64),
    "d128": (1, 17, 9, 1, 1, 128),
    "d96": (1, 9, 17, 1, 1, 96),
    "d40-gqa": (1, 17, 17, 2, 1, 40),
    "d256": (1, 17, 33, 2, 1, 256),  # the largest head_dim the kernel takes
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(backend, case, causal, dtype):
    _compare(backend, dtype, CASES[case], causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_long_sequences_match_float64_reference(backend, causal, dtype):
    """Eight query and key blocks each way (113 = 7 x 16 + 1), GQA 2/1."""
    _compare(backend, dtype, (1, 113, 113, 2, 1, 32), causal=causal)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_queries_that_see_no_key_give_zeros(backend, dtype):
    """Causal with seqlen_q > seqlen_k (bottom-right aligned): the first 16 queries see no
    key: out 0, lse -inf, dq 0, and no NaN anywhere, gradients included."""
    actual, unseen = _compare(backend, dtype, (2, 33, 17, 2, 1, 16), causal=True)
    assert unseen.tolist() == [True] * 16 + [False] * 17
    lse = actual[1]
    assert torch.isfinite(lse[:, :, 16:]).all()
    # The keys are still seen by the later queries: their gradients are not all zero.
    assert actual[3].abs().amax(dim=(0, 2, 3)).gt(0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_lse_layout(backend):
    """lse is (batch, heads, seqlen_q) fp32 for fp16 inputs; without return_lse only out."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, _ = _inputs(gen, (2, 7, 9, 3, 1, 16), torch.float16)
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    alone = flash_attention(q, k, v, backend=backend)
    assert isinstance(alone, torch.Tensor)
    assert torch.equal(alone, out)


# -------------------------------------------------------------------------------------------
# The specification: masks and the reference itself
# -------------------------------------------------------------------------------------------

# (9, -1) with seqlen_k - seqlen_q = +-8: the last query a key block reaches starts a new
# query block.
WINDOWS = [(5, 3), (0, 0), (7, -1), (-1, 2), (9, -1)]


def _rule(i, j, seqlen_q, seqlen_k, left, right):
    """flash-attn 2: query i sees key j when i + d - left <= j <= i + d + right."""
    d = seqlen_k - seqlen_q
    return (left < 0 or j >= i + d - left) and (right < 0 or j <= i + d + right)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(5, 5), (3, 8), (8, 3), (1, 6), (6, 1), (0, 4),
                                                (4, 0)])
def test_attention_mask_follows_the_rule(seqlen_q, seqlen_k):
    for left, right in [*WINDOWS, (-1, -1), (-1, 0), (2, 0), (0, -1), (9, 9)]:
        expected = [[_rule(i, j, seqlen_q, seqlen_k, left, right) for j in range(seqlen_k)]
                    for i in range(seqlen_q)]
        got = attention_mask(seqlen_q, seqlen_k, left, right)
        assert got.shape == (seqlen_q, seqlen_k)
        assert got.tolist() == expected, f"window ({left}, {right})"


def _explicit_attention(q, k, v, causal, softmax_scale, window_size, softcap):
    """Attention with python loops, one query at a time, float64: (out, lse)."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float64)
    for b, h, i in itertools.product(range(batch), range(heads), range(seqlen_q)):
        g = h // (heads // kv_heads)
        scores = {}
        for j in range(seqlen_k):
            if _rule(i, j, seqlen_q, seqlen_k, left, right):
                s = softmax_scale * float(q[b, i, h] @ k[b, j, g])
                scores[j] = softcap * math.tanh(s / softcap) if softcap > 0 else s
        if not scores:
            continue
        top = max(scores.values())
        total = sum(math.exp(s - top) for s in scores.values())
        lse[b, h, i] = top + math.log(total)
        for j, s in scores.items():
            out[b, i, h] += math.exp(s - lse[b, h, i].item()) * v[b, j, g]
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("options", [
    dict(window_size=(2, 1), softcap=1.5, softmax_scale=0.7),
    dict(window_size=(-1, -1), softcap=0.0, softmax_scale=0.5),
    dict(window_size=(0, 2), softcap=4.0, softmax_scale=1.1),
], ids=["window-softcap", "plain", "window0-softcap"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(4, 6), (6, 4)])
def test_reference_matches_explicit_loops(seqlen_q, seqlen_k, options, causal):
    """The specification itself, in float64, against one query at a time (GQA 4/2)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, seqlen_q, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, seqlen_k, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, seqlen_k, 2, 8, generator=gen, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, causal=causal, **options)
    expected_out, expected_lse = _explicit_attention(q, k, v, causal, **options)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    dead = expected_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)
    torch.testing.assert_close(lse[~dead], expected_lse[~dead], rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------
# Sliding window, softcap, softmax_scale
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("window_size", WINDOWS, ids=str)
# seqlen_k - seqlen_q = 8, -8 and 14 (with right = 3: a query block's last key one into the
# next key block).
@pytest.mark.parametrize("shape", [(1, 33, 41, 2, 1, 16), (1, 41, 33, 2, 2, 16),
                                   (1, 20, 34, 2, 1, 16)], ids=str)
def test_sliding_window(backend, shape, window_size, causal, dtype):
    _compare(backend, dtype, shape, causal=causal, window_size=window_size)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_softcap(backend, softcap, causal, dtype):
    # A scale of 1 makes the scores large enough (|s| ~ 5) for a cap of 2 to bend them.
    _compare(backend, dtype, (2, 17, 33, 2, 1, 24), causal=causal, softcap=softcap,
             softmax_scale=1.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_softcap_with_window(backend):
    _compare(backend, torch.float16, (1, 33, 33, 4, 2, 16), window_size=(6, 4), softcap=5.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_softmax_scale(backend, dtype):
    _compare(backend, dtype, (1, 17, 33, 2, 1, 32), causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_default_softmax_scale_is_inverse_sqrt_head_dim(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = _inputs(gen, (1, 17, 17, 2, 1, 24), torch.float16)
    default = _run(_kernel(backend), q, k, v, dout, causal=True)
    explicit = _run(_kernel(backend), q, k, v, dout, causal=True,
                    softmax_scale=1 / math.sqrt(24))
    for name, a, b in zip(NAMES, default, explicit, strict=True):
        assert torch.equal(a, b), name
    other = _run(_kernel(backend), q, k, v, dout, causal=True, softmax_scale=0.3)
    assert not torch.equal(default[0], other[0])


# -------------------------------------------------------------------------------------------
# Packed sequences
# -------------------------------------------------------------------------------------------

VARLEN_OPTIONS = {
    "": {},
    "causal": dict(causal=True),
    "window-softcap": dict(window_size=(4, 1), softcap=5.0),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", VARLEN_OPTIONS)
def test_varlen_matches_float64_reference(backend, options, dtype):
    actual = _compare_varlen(backend, dtype, 4, 2, 32, **VARLEN_OPTIONS[options])
    out, lse, _, dk, dv = actual
    assert out.shape == (CU_Q[-1], 4, 32) and lse.shape == (4, CU_Q[-1])
    # The empty query sequence's two keys get no gradient.
    assert torch.equal(dk[10:12], torch.zeros_like(dk[10:12]))
    assert torch.equal(dv[10:12], torch.zeros_like(dv[10:12]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_sequence_without_keys(backend, dtype):
    """Queries of a sequence with no keys see none: out and dq 0, lse -inf; the next
    sequence (causal, more queries than keys) has such rows too."""
    out, lse, dq, _, _ = _compare_varlen(backend, dtype, 2, 1, 16, bounds_q=[0, 3, 23],
                                         bounds_k=[0, 0, 17], causal=True)
    unseen = torch.zeros(23, dtype=torch.bool, device=DEVICE)
    unseen[:6] = True  # 3 without keys, then 3 before the diagonal (20 queries, 17 keys)
    assert torch.equal(out[unseen], torch.zeros_like(out[unseen]))
    assert torch.equal(dq[unseen], torch.zeros_like(dq[unseen]))
    assert torch.equal(lse == float("-inf"), unseen[None].expand_as(lse))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_varlen_equals_each_sequence_alone(backend, causal, cu_dtype):
    """Each packed sequence gives bitwise what it gives alone through flash_attention (its
    blocks start at its first token either way), forward and backward; a larger max_seqlen
    (more programs, the extra ones idle) changes nothing."""
    gen = torch.Generator().manual_seed(6)
    q, k, v, dout = _inputs(gen, (CU_Q[-1], CU_K[-1], 4, 2, 16), torch.float16)
    cu_q, cu_k = _cu(CU_Q, cu_dtype), _cu(CU_K, cu_dtype)
    packed = _run(_kernel_varlen(backend, cu_q, cu_k), q, k, v, dout, causal=causal)
    wide = _run(_kernel_varlen(backend, cu_q, cu_k, 40, 33), q, k, v, dout, causal=causal)
    for name, a, b in zip(NAMES, packed, wide, strict=True):
        assert torch.equal(a, b), f"max_seqlen 40/33: {name}"
    out, lse, dq, dk, dv = packed
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(itertools.pairwise(CU_Q),
                                                 itertools.pairwise(CU_K), strict=True)):
        leaves = [t.detach()[None, a:b].clone().requires_grad_()
                  for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        alone = _run(_kernel(backend), *leaves, dout[None, q0:q1], causal=causal)
        expected = [out[q0:q1], lse[:, q0:q1], dq[q0:q1], dk[k0:k1], dv[k0:k1]]
        for name, a, b in zip(NAMES, alone, expected, strict=True):
            assert a.shape[0] == 1, f"sequence {i} {name}"
            assert torch.equal(a[0], b), f"sequence {i} ({q0}:{q1}, {k0}:{k1}): {name} differs"


# -------------------------------------------------------------------------------------------
# Masks only on the band: every tile shape a configuration can pick
# -------------------------------------------------------------------------------------------


def _tile_shapes():
    """Each distinct (BLOCK_M, BLOCK_N) of the launch tables: forward and backward, both
    vendors, fp32 and the interpreter's."""
    tables = [*fa.FWD_CONFIGS.values(), *(entry for table in fa.BWD_CONFIGS.values()
                                          for entry in table.values()), fa.FP32_CONFIGS]
    shapes = {config[:2] for table in tables for config in table.values()}
    return sorted(shapes | {fa.INTERPRETER_CONFIG[:2]})


TILES = _tile_shapes()


def _tiles_id(tiles):
    return "x".join(map(str, tiles))


def _use_tiles(monkeypatch, tiles):
    """Every kernel launches with (BLOCK_M, BLOCK_N) = ``tiles``, on any device (the rest of
    the configuration as the tables give it)."""
    block_m, block_n = tiles
    pinned = fa.launch_config

    def launch_config(*args, **kwargs):
        return {**pinned(*args, **kwargs), "BLOCK_M": block_m, "BLOCK_N": block_n}

    monkeypatch.setattr(fa, "launch_config", launch_config)


def _band_cases(block_m, block_n):
    """(seqlen_q, seqlen_k, options) whose band edges fall on block edges and inside blocks
    for tiles (block_m, block_n), each spanning several blocks both ways (d = seqlen_k -
    seqlen_q; query blocks start at multiples of block_m)."""
    n = max(block_m, block_n)
    return {
        # d = 0: each query block's diagonal starts on a key-block edge when block_n divides
        # block_m, inside a key block otherwise.
        "causal": (2 * n + 3, 2 * n + 3, dict(causal=True)),
        # d = block_n - 1: the first row's last key ends a key block, which is unmasked;
        # d = block_n, block_n - 2: one key further, into the next block, or one short.
        "causal-d=bn-1": (n + 5, n + 5 + block_n - 1, dict(causal=True)),
        "causal-d=bn": (n + 5, n + 5 + block_n, dict(causal=True)),
        "causal-d=bn-2": (n + 5, n + 5 + block_n - 2, dict(causal=True)),
        # seqlen_q > seqlen_k, bottom-right aligned: the first block_m + 3 queries see no key.
        "causal-q>k": (3 * n + 3, 3 * n - block_m, dict(causal=True)),
        # d = 0, both edges on block edges: the last row's first key and the first row's
        # last key start and end key blocks; three unmasked key blocks per query block.
        "window-on-edges": (3 * n + 1, 3 * n + 1,
                            dict(window_size=(block_m + block_n - 1, 2 * block_n - 1))),
        # each edge one key inside that, and one key outside
        "window-one-in": (3 * n + 1, 3 * n + 1,
                          dict(window_size=(block_m + block_n - 2, 2 * block_n - 2))),
        "window-one-out": (3 * n + 1, 3 * n + 1,
                           dict(window_size=(block_m + block_n, 2 * block_n))),
        # d = 7, both edges inside blocks.
        "window-inside": (2 * n + 3, 2 * n + 10,
                          dict(window_size=(block_m + block_n + 2, 2 * block_n + 3))),
        # six keys wide: no block is unmasked.
        "window-smaller-than-a-block": (2 * n + 3, 2 * n + 1, dict(window_size=(3, 2))),
        "causal-left-window": (2 * n + 3, 2 * n + 3,
                               dict(causal=True, window_size=(block_m + block_n + 5, -1))),
        "right-window": (2 * n + 3, 2 * n + 6, dict(window_size=(-1, block_n))),
        # no window: only the ragged last key (and, backward, query) block is masked.
        "ragged": (n + 3, 2 * n + 1, {}),
    }


BAND_CASES = list(_band_cases(16, 16))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", BAND_CASES)
@pytest.mark.parametrize("tiles", TILES, ids=_tiles_id)
def test_band_edges_on_and_inside_blocks(backend, tiles, case, monkeypatch):
    """The float64 oracle where unmasked and masked blocks meet, for every tile shape (GQA
    2/1: the dk/dv programs walk two query heads)."""
    _use_tiles(monkeypatch, tiles)
    seqlen_q, seqlen_k, options = _band_cases(*tiles)[case]
    _compare(backend, torch.float16, (1, seqlen_q, seqlen_k, 2, 1, 16), **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(17, 15), softcap=5.0)],
                         ids=["causal", "window-softcap"])
@pytest.mark.parametrize("tiles", TILES, ids=_tiles_id)
def test_band_edges_varlen(backend, tiles, options, monkeypatch):
    """Packed documents whose lengths are not multiples of either block (one of five
    queries), more keys than queries and fewer, in fp32."""
    _use_tiles(monkeypatch, tiles)
    n = max(tiles)
    bounds_q = [0, n + 3, n + 8, 3 * n + 9]
    bounds_k = [0, n + 3, n + 17, 3 * n + 4]
    _compare_varlen(backend, torch.float32, 2, 1, 16, bounds_q=bounds_q, bounds_k=bounds_k,
                    **options)


# What each program did, recorded by wrapping kernel helpers (the interpreter looks them up in
# the module at each call; the kernel asking is the caller's frame): the block ranges
# _key_blocks / _query_blocks gave it, and each block where it computed the mask (_visible).
_BY_QUERY = {"_attn_fwd_kernel": True, "_attn_bwd_dq_kernel": True,
             "_attn_bwd_dkdv_kernel": False}


def _first_value(x):
    """The (first) value of an interpreted scalar or block, as an int."""
    return int(np.asarray(getattr(getattr(x, "handle", None), "data", x)).flat[0])


def _record_programs(monkeypatch):
    """{kernel: {program's first query (forward, dq) or key (dk/dv): [(lo, hi, full_lo,
    full_hi), blocks masked]}}, filled as the kernels run."""
    programs = {kernel: {} for kernel in _BY_QUERY}
    block_ranges, visible = fa._key_blocks, fa._visible

    def ranges(own, *args, _helper):
        kernel = sys._getframe(1).f_code.co_name
        result = _helper(own, *args)
        programs[kernel][_first_value(own)] = [tuple(map(_first_value, result)), []]
        return result

    def mask(i, j, *args):
        kernel = sys._getframe(1).f_code.co_name
        own, other = (i, j) if _BY_QUERY[kernel] else (j, i)
        programs[kernel][_first_value(own)][1].append(_first_value(other))
        return visible(i, j, *args)

    monkeypatch.setattr(fa, "_key_blocks", functools.partial(ranges, _helper=block_ranges))
    monkeypatch.setattr(fa, "_query_blocks",
                        functools.partial(ranges, _helper=fa._query_blocks))
    monkeypatch.setattr(fa, "_visible", mask)
    return programs


def _band(rows, cols, seqlen_q, seqlen_k, left, right):
    """The rule (see _rule) on a tile, for any rows and columns, in or out of bounds."""
    diag = rows[:, None] + (seqlen_k - seqlen_q)
    seen = torch.ones(len(rows), len(cols), dtype=torch.bool)
    if left >= 0:
        seen &= cols[None, :] >= diag - left
    if right >= 0:
        seen &= cols[None, :] <= diag + right
    return seen


def _expected_blocks(seqlen_q, seqlen_k, left, right, block_m, block_n, by_query):
    """{program's first query (by_query) or key: (blocks visited, blocks unmasked)} from the
    rule alone. A block is visited when a pair of its tile is visible (rows of the program's
    own block count past its sequence's end: they are never stored); unmasked when every
    pair is, inside both sequences."""
    own_len, own_block, other_len, other_block = (
        (seqlen_q, block_m, seqlen_k, block_n) if by_query else
        (seqlen_k, block_n, seqlen_q, block_m))
    expected = {}
    for own in range(0, own_len, own_block):
        mine = torch.arange(own, own + own_block)
        visited, unmasked = [], []
        for other in range(0, other_len, other_block):
            theirs = torch.arange(other, other + other_block)
            rows, cols = (mine, theirs) if by_query else (theirs, mine)
            seen = _band(rows, cols, seqlen_q, seqlen_k, left, right)
            exists = (theirs < other_len)[None, :] if by_query else (theirs < other_len)[:, None]
            if (seen & exists).any():
                visited.append(other)
            if seen.all() and other + other_block <= other_len:
                unmasked.append(other)
        expected[own] = (visited, unmasked)
    return expected


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records what interpreted kernels do")
@pytest.mark.parametrize("case", BAND_CASES)
@pytest.mark.parametrize("tiles", TILES, ids=_tiles_id)
def test_only_band_blocks_are_masked(tiles, case, monkeypatch):
    """Each program of the forward, dk/dv and dq kernels visits exactly the visible blocks,
    in order; its unmasked run holds exactly the blocks whose every pair is visible inside
    the sequences, and it computes the mask on each other block it visits, once, and on no
    block of the run: the mask is paid on the band and the ragged ends only."""
    _use_tiles(monkeypatch, tiles)
    block_m, block_n = tiles
    seqlen_q, seqlen_k, options = _band_cases(*tiles)[case]
    programs = _record_programs(monkeypatch)
    gen = torch.Generator().manual_seed(18)
    q, k, v, dout = _inputs(gen, (1, seqlen_q, seqlen_k, 1, 1, 16), torch.float16)
    out = flash_attention(q, k, v, backend="triton", **options)
    torch.autograd.grad(out, (q, k, v), dout)
    left, right = options.get("window_size", (-1, -1))
    right = 0 if options.get("causal") else right
    unmasked_blocks = 0
    for kernel, by_query in _BY_QUERY.items():
        step = block_n if by_query else block_m
        expected = _expected_blocks(seqlen_q, seqlen_k, left, right, block_m, block_n,
                                    by_query)
        assert sorted(programs[kernel]) == sorted(expected), kernel
        for program, ((lo, hi, full_lo, full_hi), masked) in programs[kernel].items():
            visited = list(range(lo, hi, step))
            unmasked = [b for b in visited if full_lo <= b < full_hi]
            assert (visited, unmasked) == expected[program], (kernel, program)
            assert masked == [b for b in visited if b not in unmasked], (kernel, program)
            unmasked_blocks += len(unmasked)
    # The unmasked path is taken wherever a block lies wholly inside the band.
    assert (unmasked_blocks == 0) == (case == "window-smaller-than-a-block"), unmasked_blocks


# -------------------------------------------------------------------------------------------
# Determinism, strides, agreement with PyTorch's SDPA, empty inputs
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "varlen"])
def test_backward_is_deterministic(backend, packed):
    """Two backward passes are bitwise identical, and deterministic=False changes nothing
    (no backend uses float atomics)."""
    gen = torch.Generator().manual_seed(7)
    if packed:
        q, k, v, dout = _inputs(gen, (CU_Q[-1], CU_K[-1], 4, 2, 16), torch.float16)
        cu_q, cu_k = _cu(CU_Q), _cu(CU_K)

        def fn(**kwargs):
            return flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, causal=True,
                                          backend=backend, **kwargs)
    else:
        q, k, v, dout = _inputs(gen, (2, 33, 33, 4, 2, 16), torch.float16)

        def fn(**kwargs):
            return flash_attention(q, k, v, causal=True, backend=backend, **kwargs)

    out = fn()
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    loose = torch.autograd.grad(fn(deterministic=False), (q, k, v), dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), first, second, loose, strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), f"deterministic=False: {name}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["fused-qkv", "bhsd", "strided-head_dim"])
def test_strided_inputs_equal_contiguous(backend, layout):
    """Views (slices of a fused qkv projection, (batch, heads, seq, dim) transposed, every
    other element of head_dim) and a stride-0 output gradient give bitwise the results of
    contiguous copies, gradients included."""
    gen = torch.Generator().manual_seed(8)
    batch, seqlen, heads, kv_heads, head_dim = 2, 19, 4, 2, 16
    if layout == "fused-qkv":
        base = _randn(gen, batch, seqlen, heads + 2 * kv_heads, head_dim, requires_grad=True)
        views = base.split([heads, kv_heads, kv_heads], dim=2)
    elif layout == "bhsd":
        base = _randn(gen, batch, heads + 2 * kv_heads, seqlen, head_dim, requires_grad=True)
        views = [t.transpose(1, 2) for t in base.split([heads, kv_heads, kv_heads], dim=1)]
    else:
        base = _randn(gen, batch, seqlen, heads + 2 * kv_heads, 2 * head_dim,
                      requires_grad=True)
        views = base[..., ::2].split([heads, kv_heads, kv_heads], dim=2)
    dout = _randn(gen, batch, 1, heads, head_dim).expand(batch, seqlen, heads, head_dim)
    out, lse = flash_attention(*views, causal=True, return_lse=True, backend=backend)
    strided = [out, lse, *torch.autograd.grad(out, views, dout)]
    leaves = [t.detach().contiguous().requires_grad_() for t in views]
    contiguous = _run(_kernel(backend), *leaves, dout.contiguous(), causal=True)
    for name, a, b in zip(NAMES, strided, contiguous, strict=True):
        assert torch.equal(a, b), name


def test_launchers_take_strided_lse_and_dv():
    """The kernels derive the lse and δ strides and take one set for dk and dv; the launchers
    write a strided lse, and a dv laid out unlike dk, through copies: bitwise the results of
    contiguous ones."""
    gen = torch.Generator().manual_seed(19)
    q, k, v, dout = (t.detach() for t in _inputs(gen, (2, 19, 23, 4, 2, 16), torch.float16))
    args = (None, None, 19, 0.25, (7, 0), 0.0)

    def run(lse, dv):
        out = torch.empty_like(q)
        fa.flash_attn_fwd(q, k, v, out, lse, *args)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        fa.flash_attn_bwd(dout, q, k, v, out, lse, dq, dk, dv, None, None, 19, 23, 0.25,
                          (7, 0), 0.0)
        return out, lse, dq, dk, dv

    contiguous = run(torch.empty(2, 4, 19, device=DEVICE), torch.empty_like(v))
    lse = torch.empty(2, 19, 4, device=DEVICE).transpose(1, 2)  # (2, 4, 19), not contiguous
    dv = torch.empty(2, 23, 4, 16, dtype=v.dtype, device=DEVICE)[:, :, ::2]
    strided = run(lse, dv)
    assert not strided[1].is_contiguous() and strided[4].stride() != strided[3].stride()
    for name, a, b in zip(NAMES, strided, contiguous, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("case", ["17x33", "causal-33", "gqa4/2-causal-17", "scale-mqa"])
def test_matches_torch_sdpa(backend, case):
    """Where PyTorch's scaled_dot_product_attention means the same (no mask, or causal with
    seqlen_q == seqlen_k: its causal mask is aligned to the top-left), fp32; SDPA on the CPU."""
    shape, causal, scale = {
        "17x33": ((2, 17, 33, 2, 2, 32), False, None),
        "causal-33": ((1, 33, 33, 2, 2, 16), True, None),
        "gqa4/2-causal-17": ((2, 17, 17, 4, 2, 16), True, None),
        "scale-mqa": ((1, 17, 9, 4, 1, 24), False, 0.3),
    }[case]
    gen = torch.Generator().manual_seed(10)
    q, k, v, dout = _inputs(gen, shape, torch.float32)
    actual = _run(_kernel(backend), q, k, v, dout, causal=causal, softmax_scale=scale)
    group = shape[3] // shape[4]

    def sdpa(q, k, v, **_):
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            scale=scale)
        return out.transpose(1, 2), None

    q2, k2, v2 = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    expected = _run(sdpa, q2, k2, v2, dout.cpu())
    for name, a, b in zip(NAMES, actual, expected, strict=True):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 7, 9, 2, 1, 16), (2, 0, 9, 2, 1, 16),
                                   (2, 7, 0, 2, 1, 16), (0, 0, 0, 2, 2, 16)], ids=str)
def test_empty_inputs(backend, shape):
    """No batch or no queries: empty outputs, zero dk and dv. No keys: every query sees none
    (out and dq 0, lse -inf)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, dout = _inputs(gen, shape, torch.float16)
    out, lse, dq, dk, dv = _run(_kernel(backend), q, k, v, dout, causal=True)
    batch, seqlen_q, _, heads = shape[:4]
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == float("-inf")).all()
    for t in (dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("cu_k, max_k", [([0, 3, 5], 3), ([0, 0, 0], 0)],
                         ids=["keys", "no-keys"])
def test_varlen_empty_inputs(backend, cu_k, max_k):
    """Two sequences without queries: empty outputs, zero dk and dv."""
    gen = torch.Generator().manual_seed(12)
    q, k, v, dout = _inputs(gen, (0, cu_k[-1], 2, 1, 16), torch.float16)
    fn = _kernel_varlen(backend, _cu([0, 0, 0]), _cu(cu_k), 0, max_k)
    out, lse, dq, dk, dv = _run(fn, q, k, v, dout)
    assert out.shape == q.shape and lse.shape == (2, 0)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# -------------------------------------------------------------------------------------------
# Bad input, rejected before any launch
# -------------------------------------------------------------------------------------------


def _launch_guard(monkeypatch):
    """Makes any kernel launch fail loudly, to prove validation happens first."""
    from eurocore.kernels import flash_attention as launchers

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    monkeypatch.setattr(launchers, "flash_attn_fwd", launched)
    monkeypatch.setattr(launchers, "flash_attn_bwd", launched)


def _bad_inputs():
    """(function, argument named, error, kwargs), for every backend."""
    gen = torch.Generator().manual_seed(13)
    q = _randn(gen, 2, 7, 4, 16)
    k, v = _randn(gen, 2, 9, 2, 16), _randn(gen, 2, 9, 2, 16)
    ok = dict(q=q, k=k, v=v)
    qt, kt, vt = _randn(gen, 25, 4, 16), _randn(gen, 30, 2, 16), _randn(gen, 30, 2, 16)
    packed = dict(q=qt, k=kt, v=vt, cu_seqlens_q=_cu(CU_Q), cu_seqlens_k=_cu(CU_K),
                  max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K)
    fixed, varlen = flash_attention, flash_attention_varlen
    return [
        # Shapes.
        (fixed, "k", ValueError, {**ok, "k": k[:, :, :1].expand(2, 9, 3, 16),
                                  "v": v[:, :, :1].expand(2, 9, 3, 16)}),
        (fixed, "k", ValueError, {**ok, "k": k[:, :, :0], "v": v[:, :, :0]}),
        (fixed, "v", ValueError, {**ok, "v": v[:, :8]}),
        (fixed, "v", ValueError, {**ok, "v": v[:, :, :1]}),
        (fixed, "k", ValueError, {**ok, "k": k[..., :8], "v": v[..., :8]}),
        (fixed, "k", ValueError, {**ok, "k": k[:1], "v": v[:1]}),
        (fixed, "q", ValueError, {**ok, "q": q[0]}),
        (fixed, "k", ValueError, {**ok, "k": k[0], "v": v[0]}),
        (fixed, "v", ValueError, {**ok, "v": v[None]}),
        (fixed, "q", ValueError, {"q": q[..., :0], "k": k[..., :0], "v": v[..., :0]}),
        (varlen, "q", ValueError, {**packed, "q": q}),
        (varlen, "k", ValueError, {**packed, "k": k, "v": v}),
        # Types, dtypes and devices.
        (fixed, "q", TypeError, {**ok, "q": q.to(torch.int32)}),
        (fixed, "q", TypeError, {**ok, "q": q.tolist()}),
        (fixed, "k", TypeError, {**ok, "k": k.half(), "v": v.half()}),
        (fixed, "v", TypeError, {**ok, "v": v.half()}),
        (fixed, "v", TypeError, {**ok, "v": v.to(torch.int64)}),
        (fixed, "k", ValueError, {**ok, "k": torch.empty(k.shape, device="meta")}),
        (fixed, "v", ValueError, {**ok, "v": torch.empty(v.shape, device="meta")}),
        (varlen, "k", TypeError, {**packed, "k": kt.half()}),
        # Options.
        (fixed, "window_size", ValueError, {**ok, "window_size": (-2, 0)}),
        (fixed, "window_size", ValueError, {**ok, "window_size": (3, -5)}),
        (fixed, "window_size", TypeError, {**ok, "window_size": "x"}),
        (fixed, "window_size", TypeError, {**ok, "window_size": (3,)}),
        (fixed, "window_size", TypeError, {**ok, "window_size": (1.5, 0)}),
        (fixed, "softcap", ValueError, {**ok, "softcap": -1.0}),
        (fixed, "softcap", ValueError, {**ok, "softcap": float("inf")}),
        (fixed, "softcap", TypeError, {**ok, "softcap": "30"}),
        (fixed, "softmax_scale", ValueError, {**ok, "softmax_scale": float("nan")}),
        (fixed, "softmax_scale", ValueError, {**ok, "softmax_scale": float("inf")}),
        (fixed, "softmax_scale", TypeError, {**ok, "softmax_scale": "0.3"}),
        (fixed, "causal", TypeError, {**ok, "causal": "yes"}),
        (fixed, "deterministic", TypeError, {**ok, "deterministic": 1}),
        (fixed, "return_lse", TypeError, {**ok, "return_lse": None}),
        (varlen, "causal", TypeError, {**packed, "causal": 1}),
        (varlen, "window_size", ValueError, {**packed, "window_size": (0, -3)}),
        # cu_seqlens and max_seqlen.
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": _cu([1, 1, 18, 18, 25])}),
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": _cu([0, 1, 18, 18, 24])}),
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": _cu([0, 1, 18, 9, 25])}),
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": _cu([[0, 25]])}),
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": _cu([25])}),
        (varlen, "cu_seqlens_q", TypeError, {**packed, "cu_seqlens_q": _cu(CU_Q).float()}),
        (varlen, "cu_seqlens_q", TypeError, {**packed, "cu_seqlens_q": CU_Q}),
        (varlen, "cu_seqlens_q", ValueError, {**packed, "cu_seqlens_q": torch.empty(
            5, dtype=torch.int32, device="meta")}),
        (varlen, "cu_seqlens_k", ValueError, {**packed, "cu_seqlens_k": _cu([0, 3, 10, 30])}),
        (varlen, "cu_seqlens_k", ValueError, {**packed, "cu_seqlens_k": _cu([0, 3, 10, 12, 31])}),
        (varlen, "cu_seqlens_k", ValueError, {**packed, "cu_seqlens_k": _cu([0, 3, 10, 2, 30])}),
        (varlen, "cu_seqlens_k", TypeError, {**packed, "cu_seqlens_k": _cu(CU_K, torch.int16)}),
        (varlen, "max_seqlen_q", ValueError, {**packed, "max_seqlen_q": MAX_Q - 1}),
        (varlen, "max_seqlen_k", ValueError, {**packed, "max_seqlen_k": MAX_K - 1}),
        (varlen, "max_seqlen_q", ValueError, {**packed, "max_seqlen_q": -1}),
        (varlen, "max_seqlen_q", TypeError, {**packed, "max_seqlen_q": float(MAX_Q)}),
    ]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_rejected_before_launch(backend, case, monkeypatch):
    fn, argument, error, kwargs = _bad_inputs()[case]
    _launch_guard(monkeypatch)
    with pytest.raises(error, match=rf"^{argument}\b"):
        fn(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("head_dim", [4, 20, 36, 264, 512])
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "varlen"])
def test_kernel_backends_reject_unsupported_head_dim(backend, head_dim, packed, monkeypatch):
    """A multiple of 8 up to 256; the torch backend takes any head_dim."""
    _launch_guard(monkeypatch)
    gen = torch.Generator().manual_seed(14)
    if packed:
        q, k, v, _ = _inputs(gen, (CU_Q[-1], CU_K[-1], 2, 1, head_dim), torch.float16)
        args = (q, k, v, _cu(CU_Q), _cu(CU_K), MAX_Q, MAX_K)
        fn = flash_attention_varlen
    else:
        q, k, v, _ = _inputs(gen, (1, 3, 5, 2, 1, head_dim), torch.float16)
        args, fn = (q, k, v), flash_attention
    with pytest.raises(ValueError, match=rf"^q\b.*{head_dim}"):
        fn(*args, backend=backend)
    monkeypatch.undo()
    assert fn(*args, backend="torch").shape == q.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "varlen"])
def test_kernel_backends_reject_float64(backend, packed, monkeypatch):
    _launch_guard(monkeypatch)
    gen = torch.Generator().manual_seed(15)
    if packed:
        q, k, v, _ = _inputs(gen, (CU_Q[-1], CU_K[-1], 2, 1, 16), torch.float64)
        args = (q, k, v, _cu(CU_Q), _cu(CU_K), MAX_Q, MAX_K)
        fn = flash_attention_varlen
    else:
        q, k, v, _ = _inputs(gen, (1, 3, 5, 2, 1, 16), torch.float64)
        args, fn = (q, k, v), flash_attention
    with pytest.raises(TypeError, match=r"^q\b.*float64"):
        fn(*args, backend=backend)


# -------------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------------


def _assert_compiled_matches_eager(block, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    """A function using flash_attention (causal, GQA) compiles with fullgraph=True and
    matches eager, gradients too."""

    def block(q, k, v):
        out, lse = flash_attention(q * 2, k, v + 1, causal=True, return_lse=True,
                                   backend=backend)
        return torch.nn.functional.silu(out).sum() + out.square().mean() + 0 * lse.sum()

    gen = torch.Generator().manual_seed(16)
    q, k, v, _ = _inputs(gen, (2, 17, 17, 4, 2, 16), torch.float32)
    _assert_compiled_matches_eager(block, (q, k, v))


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_compiles_fullgraph(backend):
    cu_q, cu_k = _cu(CU_Q), _cu(CU_K)

    def block(q, k, v):
        out = flash_attention_varlen(q * 2, k, v + 1, cu_q, cu_k, MAX_Q, MAX_K, causal=True,
                                     backend=backend)
        return torch.nn.functional.silu(out).sum() + out.square().mean()

    gen = torch.Generator().manual_seed(17)
    q, k, v, _ = _inputs(gen, (CU_Q[-1], CU_K[-1], 4, 2, 16), torch.float32)
    _assert_compiled_matches_eager(block, (q, k, v))


# -------------------------------------------------------------------------------------------
# GPU
# -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_moderate_size_matches_float64_reference(backend, dtype):
    """The production tiles (128 x 64 forward, 64 x 64 backward, head_dim 128) on a GPU."""
    _compare(backend, dtype, (2, 1000, 1000, 8, 2, 128), causal=True)
