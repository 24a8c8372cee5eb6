"""eurocore.ops.apply_rotary against its float64 reference, on every kernel backend."""

from __future__ import annotations

import itertools

import pytest
import torch

import eurocore.ops.rotary as rotary
from eurocore.ops import apply_rotary, apply_rotary_reference, rope_cos_sin
from eurocore.ops.backends import triton_interpreter_active
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

KERNEL_BACKENDS = [b for b in rotary.IMPLEMENTED if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N_POSITIONS = 48
# Packed sequences of lengths 1, 0, 5 and 7: a single token, an empty one, and two more.
CU = [0, 1, 1, 6, 13]


def _tables(n_positions=N_POSITIONS, rotary_dim=16, theta=10000.0):
    cos, sin = rope_cos_sin(n_positions, rotary_dim, theta=theta)
    return cos.to(DEVICE), sin.to(DEVICE)


def _randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)


def _k_shape(q_shape, k_heads):
    return (*q_shape[:-2], k_heads, q_shape[-1])


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _forward_backward(fn, q, k, cos, sin, grads, **kwargs):
    """Runs fn on (q, k), backpropagates the given output gradients; returns
    (q_rot, k_rot, dq, dk)."""
    out_q, out_k = fn(q, k, cos, sin, **kwargs)
    dq, dk = torch.autograd.grad((out_q, out_k), (q, k), grads)
    return out_q, out_k, dq, dk


def _compare(backend, layout, q_shape, k_heads, dtype, rotary_dim, interleaved, *,
             theta=10000.0, table_dtype=torch.float32, **positions):
    """Outputs and gradients of q and k within the float64 oracle's bound; the pass-through
    dims (from rotary_dim on) equal the input, and their gradient the output gradient."""
    gen = torch.Generator().manual_seed(0)
    q = _randn(gen, *q_shape, dtype=dtype, requires_grad=True)
    k = _randn(gen, *_k_shape(q_shape, k_heads), dtype=dtype, requires_grad=True)
    grads = (_randn(gen, *q.shape, dtype=dtype), _randn(gen, *k.shape, dtype=dtype))
    cos, sin = (t.to(table_dtype) for t in _tables(rotary_dim=rotary_dim, theta=theta))
    kwargs = dict(layout=layout, interleaved=interleaved, **positions)

    actual = _forward_backward(apply_rotary, q, k, cos, sin, grads, backend=backend, **kwargs)
    same_precision = _forward_backward(apply_rotary_reference, q, k, cos, sin, grads, **kwargs)

    def to64(t):
        return t.detach().double().requires_grad_()

    reference64 = _forward_backward(apply_rotary_reference, to64(q), to64(k), cos, sin,
                                    [g.double() for g in grads], **kwargs)
    for name, a, s, ref in zip(["q_rot", "k_rot", "dq", "dk"], actual, same_precision,
                               reference64, strict=True):
        assert_close_to_reference(
            a, ref, s, name=f"{backend} {name} {layout} {tuple(q_shape)} {dtype} "
                            f"interleaved={interleaved}")
    out_q, out_k, dq, dk = actual
    for name, out, x in (("q", out_q, q), ("k", out_k, k), ("dq", dq, grads[0]),
                         ("dk", dk, grads[1])):
        assert torch.equal(out[..., rotary_dim:], x.detach()[..., rotary_dim:]), (
            f"{name}: the pass-through dims changed")


# (layout, q shape, k heads, rotary_dim, cu_seqlens): full and partial rotary, GQA 3/1 and
# 8/2, more tokens than one program's block (32) in places, packed sequences of length 0 and 1.
CASES = {
    "bshd": ("bshd", (2, 7, 3, 16), 1, 16, None),
    "bshd-partial-gqa8/2": ("bshd", (3, 17, 8, 24), 2, 8, None),
    "sbhd": ("sbhd", (7, 2, 3, 20), 1, 12, None),
    "sbhd-gqa8/2": ("sbhd", (5, 3, 8, 16), 2, 16, None),
    "thd": ("thd", (13, 3, 16), 1, 16, CU),
    "thd-partial-gqa8/2": ("thd", (37, 8, 20), 2, 12, [0, 1, 1, 6, 37]),
    "thd-one-sequence": ("thd", (11, 3, 24), 1, 8, None),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(backend, case, interleaved, dtype):
    layout, q_shape, k_heads, rotary_dim, cu = CASES[case]
    positions = {"cu_seqlens": _cu(cu)} if cu is not None else {}
    _compare(backend, layout, q_shape, k_heads, dtype, rotary_dim, interleaved, **positions)


def _position_cases():
    gen = torch.Generator().manual_seed(5)

    def randint(*shape, dtype=torch.int64):
        return torch.randint(0, N_POSITIONS, shape, generator=gen, dtype=dtype).to(DEVICE)

    return {
        # Random, non-monotonic, with repeats.
        "bshd-position_ids": ("bshd", (2, 7, 3, 16), dict(position_ids=randint(2, 7))),
        "bshd-position_ids-broadcast": ("bshd", (3, 7, 3, 16),
                                        dict(position_ids=randint(1, 7, dtype=torch.int32))),
        "sbhd-position_ids": ("sbhd", (7, 2, 3, 16), dict(position_ids=randint(2, 7))),
        "bshd-offset": ("bshd", (2, 7, 3, 16), dict(seqlen_offsets=29)),
        "bshd-offsets": ("bshd", (2, 7, 3, 16), dict(seqlen_offsets=_cu([3, 40]))),
        "sbhd-offsets": ("sbhd", (7, 3, 3, 16),
                         dict(seqlen_offsets=_cu([11, 0, 23], torch.int64))),
        "thd-cu-offset": ("thd", (13, 3, 16), dict(cu_seqlens=_cu(CU), seqlen_offsets=30)),
        "thd-cu-offsets": ("thd", (13, 3, 16),
                           dict(cu_seqlens=_cu(CU), seqlen_offsets=_cu([5, 40, 0, 17]))),
        "thd-offset": ("thd", (13, 3, 16), dict(seqlen_offsets=7)),
        "thd-position_ids": ("thd", (13, 3, 16), dict(position_ids=randint(13))),
        "thd-position_ids-2d": ("thd", (13, 3, 16), dict(position_ids=randint(1, 13))),
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("case", _position_cases())
def test_positions_match_float64_reference(backend, case, interleaved):
    layout, q_shape, positions = _position_cases()[case]
    _compare(backend, layout, q_shape, 2, torch.float16, 16, interleaved, **positions)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_tables_of_other_dtypes(backend, table_dtype):
    """cos and sin may be any float dtype: read as they are, rotated in fp32."""
    _compare(backend, "bshd", (2, 7, 3, 20), 1, torch.float16, 12, False, theta=500000.0,
             table_dtype=table_dtype, seqlen_offsets=_cu([2, 30]))


def test_token_positions():
    """The rows taken: per packed sequence from 0 plus its offset; sbhd as (seq, batch)."""
    q = torch.empty(13, 2, 16, device=DEVICE)
    got = rotary.token_positions(q, "thd", cu_seqlens=_cu(CU), seqlen_offsets=_cu([5, 9, 0, 2]))
    expected = [5, *range(0, 5), *range(2, 9)]
    assert got.tolist() == expected
    q = torch.empty(3, 2, 1, 16, device=DEVICE)
    got = rotary.token_positions(q, "sbhd", seqlen_offsets=_cu([4, 0]))
    assert got.tolist() == [[4, 0], [5, 1], [6, 2]]


def _position_forms(layout):
    """(q, {form: kwargs}): every way apply_rotary takes positions, all asking the same rows:
    batch row b from 3b + 1 on, and in thd the packed sequences of CU from 2 + 3b."""
    if layout == "thd":
        q = torch.empty(13, 2, 16, device=DEVICE)
        starts = [2 + 3 * b for b in range(len(CU) - 1)]
        ids = [start + t for b, start in enumerate(starts) for t in range(CU[b + 1] - CU[b])]
        return q, {
            "position_ids": dict(position_ids=_cu(ids, torch.int64)),
            "position_ids (1, tokens) int32": dict(position_ids=_cu([ids])),
            "cu_seqlens + offsets": dict(cu_seqlens=_cu(CU), seqlen_offsets=_cu(starts)),
        }
    batch, seq = 2, 7
    q = torch.empty((batch, seq, 2, 16) if layout == "bshd" else (seq, batch, 2, 16),
                    device=DEVICE)
    ids = [[3 * b + 1 + s for s in range(seq)] for b in range(batch)]
    return q, {
        "position_ids": dict(position_ids=_cu(ids, torch.int64)),
        "position_ids int32 strided": dict(
            position_ids=_cu([[i, 0] for row in ids for i in row])[:, 0].view(batch, seq)),
        "seqlen_offsets tensor": dict(seqlen_offsets=_cu([3 * b + 1 for b in range(batch)])),
    }


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "thd"])
def test_every_position_form_normalises_to_the_same_positions(layout):
    """position_ids (any int dtype, shape or strides), per-sequence offsets and cu_seqlens
    asking the same rows become the same tensor: int64 of q's token shape, the rows that
    token_positions gives; only the plain case (each token at its index) becomes None."""
    q, forms = _position_forms(layout)
    normalised = {name: rotary.normalize_positions(q, layout, **kw) for name, kw in forms.items()}
    expected = normalised.pop("position_ids")
    assert expected.dtype == torch.int64 and expected.shape == q.shape[:-2]
    for name, positions in normalised.items():
        assert positions.dtype == torch.int64 and positions.shape == q.shape[:-2], name
        assert torch.equal(positions, expected), name
        assert torch.equal(positions, rotary.token_positions(q, layout, **forms[name])), name
    assert rotary.normalize_positions(q, layout) is None
    assert rotary.normalize_positions(q, layout, seqlen_offsets=0) is None


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "thd"])
def test_scalar_offset_normalises_to_one_shared_row(layout):
    """An int offset becomes offset + the token's index, without copying a row per sequence
    (an expanded view: stride 0 along batch) nor moving the int to the device."""
    q, _ = _position_forms(layout)
    positions = rotary.normalize_positions(q, layout, seqlen_offsets=5)
    assert positions.dtype == torch.int64 and positions.shape == q.shape[:-2]
    assert torch.equal(positions, rotary.token_positions(q, layout) + 5)
    if layout != "thd":
        assert positions.stride(0 if layout == "bshd" else 1) == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "sbhd", "thd"])
def test_every_position_form_rotates_the_same(backend, layout):
    """The kernels read the normalised positions by stride: every form asking the same rows
    gives bitwise the same outputs and gradients (the backward reuses them)."""
    q, forms = _position_forms(layout)
    gen = torch.Generator().manual_seed(30)
    q = _randn(gen, *q.shape)
    k = _randn(gen, *_k_shape(q.shape, 1))
    grads = (_randn(gen, *q.shape), _randn(gen, *k.shape))
    cos, sin = _tables(rotary_dim=12)
    results = {name: _run(backend, q, k, cos, sin, grads, layout=layout, **kw)
               for name, kw in forms.items()}
    expected = results.pop("position_ids")
    for name, result in results.items():
        _assert_equal(result, expected, f"{backend} {layout} {name}")


def test_positions_of_unchecked_bad_cu_seqlens_stay_inside_the_offsets():
    """Inside a graph cu_seqlens is not checked: tokens past its last bound count in the last
    sequence, so the per-sequence offsets are never indexed past their end."""
    q = torch.empty(13, 2, 16, device=DEVICE)
    positions = rotary.normalize_positions(q, "thd", cu_seqlens=_cu([0, 5, 9]),
                                           seqlen_offsets=_cu([0, 100]))
    assert positions.tolist() == [*range(5), *range(100, 108)]


def _run(backend, q, k, cos, sin, grads, **kwargs):
    """apply_rotary on fresh leaves holding q's and k's values: outputs, then dq, dk."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_() if k is not None else None
    out_q, out_k = apply_rotary(q, k, cos, sin, backend=backend, **kwargs)
    if k is None:
        return [out_q, *torch.autograd.grad(out_q, q, grads[0])]
    return [out_q, out_k, *torch.autograd.grad((out_q, out_k), (q, k), grads)]


def _assert_equal(actual, expected, what):
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == b.shape, f"{what}: tensor {i} shape {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{what}: tensor {i} differs"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("with_offsets", [False, True], ids=["", "offsets"])
def test_thd_equals_each_sequence_alone(backend, interleaved, with_offsets):
    """Packed: every sequence rotates as if alone in bshd, from position 0 (or its offset)."""
    gen = torch.Generator().manual_seed(2)
    q, k = _randn(gen, 13, 3, 20, dtype=torch.bfloat16), _randn(gen, 13, 1, 20,
                                                               dtype=torch.bfloat16)
    grads = (_randn(gen, *q.shape, dtype=q.dtype), _randn(gen, *k.shape, dtype=k.dtype))
    cos, sin = _tables(rotary_dim=12)
    offsets = [7, 0, 30, 3] if with_offsets else [0, 0, 0, 0]
    kwargs = dict(cu_seqlens=_cu(CU), interleaved=interleaved)
    if with_offsets:
        kwargs["seqlen_offsets"] = _cu(offsets)
    packed = _run(backend, q, k, cos, sin, grads, layout="thd", **kwargs)
    for i, (start, end) in enumerate(itertools.pairwise(CU)):
        alone = _run(backend, q[start:end].unsqueeze(0), k[start:end].unsqueeze(0), cos, sin,
                     [g[start:end].unsqueeze(0) for g in grads], layout="bshd",
                     seqlen_offsets=offsets[i], interleaved=interleaved)
        _assert_equal([t[start:end] for t in packed], [t.squeeze(0) for t in alone],
                      f"sequence {i} ({start}:{end})")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("positions", ["", "offsets", "position_ids"])
def test_sbhd_equals_bshd_transposed(backend, interleaved, positions):
    gen = torch.Generator().manual_seed(3)
    q, k = _randn(gen, 3, 7, 3, 16, dtype=torch.float16), _randn(gen, 3, 7, 1, 16,
                                                                 dtype=torch.float16)
    grads = (_randn(gen, *q.shape, dtype=q.dtype), _randn(gen, *k.shape, dtype=k.dtype))
    cos, sin = _tables(rotary_dim=16)
    kwargs = {"interleaved": interleaved}
    if positions == "offsets":
        kwargs["seqlen_offsets"] = _cu([9, 0, 31])
    elif positions == "position_ids":
        kwargs["position_ids"] = torch.randint(0, N_POSITIONS, (3, 7), generator=gen).to(DEVICE)
    bshd = _run(backend, q, k, cos, sin, grads, layout="bshd", **kwargs)

    def t(x):
        return x.transpose(0, 1).contiguous()

    sbhd = _run(backend, t(q), t(k), cos, sin, [t(g) for g in grads], layout="sbhd", **kwargs)
    _assert_equal([x.transpose(0, 1) for x in sbhd], bshd, "sbhd vs bshd")


# (layout, q shape, k heads, rotary_dim, cu_seqlens)
INPLACE_CASES = {
    "bshd": ("bshd", (2, 7, 3, 16), 1, 16, None),
    "bshd-partial": ("bshd", (2, 7, 3, 24), 1, 8, None),
    "thd": ("thd", (13, 3, 16), 1, 16, CU),
    "thd-partial-gqa8/2": ("thd", (13, 8, 20), 2, 12, CU),
}


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("case", INPLACE_CASES)
def test_inplace_equals_out_of_place(backend, case, interleaved):
    """In place returns q and k themselves, with the out-of-place values and gradients, on
    non-leaf q and k; the pass-through dims are left as they were."""
    layout, q_shape, k_heads, rotary_dim, cu = INPLACE_CASES[case]
    gen = torch.Generator().manual_seed(4)
    q_leaf = _randn(gen, *q_shape, dtype=torch.float16, requires_grad=True)
    k_leaf = _randn(gen, *_k_shape(q_shape, k_heads), dtype=torch.float16, requires_grad=True)
    grads = (_randn(gen, *q_leaf.shape, dtype=q_leaf.dtype),
             _randn(gen, *k_leaf.shape, dtype=k_leaf.dtype))
    cos, sin = _tables(rotary_dim=rotary_dim)
    kwargs = dict(layout=layout, interleaved=interleaved, backend=backend)
    if cu is not None:
        kwargs["cu_seqlens"] = _cu(cu)

    def run(inplace):
        q, k = q_leaf * 1.0, k_leaf * 1.0
        out_q, out_k = apply_rotary(q, k, cos, sin, inplace=inplace, **kwargs)
        if inplace:
            assert out_q is q and out_k is k
        return [out_q, out_k, *torch.autograd.grad((out_q, out_k), (q_leaf, k_leaf), grads)]

    in_place = run(True)
    _assert_equal(in_place, run(False), "in place vs out of place")
    for out, x in zip(in_place[:2], (q_leaf, k_leaf), strict=True):
        assert torch.equal(out[..., rotary_dim:], x.detach()[..., rotary_dim:])


def _qk_views(case, tensors):
    """q (3 heads) and k (2 heads), head_dim 20, as views of the given tensors."""
    if case == "transposed":  # stride along head_dim != 1
        return tuple(t.transpose(-1, -2) for t in tensors)
    (qkv,) = tensors  # fused q, k, v: unit stride along head_dim, not along heads' tokens
    return qkv[:, :, :3], qkv[:, :, 3:5]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("case", ["transposed", "fused-qkv"])
def test_inplace_on_views(backend, case, grad):
    """In place on q and k that are views (transposed, so not unit stride along head_dim; or
    slices of a fused qkv), of non-leaf tensors under autograd: the views and their bases take
    the out-of-place values, the rest of the bases (v) is untouched, gradients reach the
    leaves."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(2, 7, 20, 3), (2, 7, 20, 2)] if case == "transposed" else [(2, 7, 7, 20)]
    leaves = [_randn(gen, *shape, requires_grad=grad) for shape in shapes]
    grads = (_randn(gen, 2, 7, 3, 20), _randn(gen, 2, 7, 2, 20))
    cos, sin = _tables(rotary_dim=12)
    kwargs = dict(interleaved=True, seqlen_offsets=_cu([4, 19]), backend=backend)

    def with_grads(out_q, out_k):
        if not grad:
            return [out_q, out_k]
        return [out_q, out_k, *torch.autograd.grad((out_q, out_k), leaves, grads)]

    bases = [leaf * 1.0 for leaf in leaves]
    q, k = _qk_views(case, bases)
    if case == "transposed":
        assert q.stride(-1) != 1 and k.stride(-1) != 1
    out_q, out_k = apply_rotary(q, k, cos, sin, inplace=True, **kwargs)
    assert out_q is q and out_k is k
    in_place = with_grads(out_q, out_k)

    out_of_place = with_grads(*apply_rotary(*_qk_views(case, leaves), cos, sin, **kwargs))
    _assert_equal(in_place, out_of_place, "in place on views vs out of place")
    _assert_equal(_qk_views(case, bases), out_of_place[:2], "the views of the bases")
    if case == "fused-qkv":
        assert torch.equal(bases[0][:, :, 5:], leaves[0][:, :, 5:]), "v was written"


def _strided_qk(case, gen):
    """q and k that are not contiguous, from leaves requiring grad; with their layout."""
    hq, hk, d = 3, 2, 16
    if case == "fused-qkv-bshd":
        qkv = _randn(gen, 2, 7, hq + 2 * hk, d, requires_grad=True)
        return "bshd", qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    if case == "fused-qkv-thd":
        qkv = _randn(gen, 13, hq + 2 * hk, d, requires_grad=True)
        return "thd", qkv[:, :hq], qkv[:, hq:hq + hk]
    if case == "fused-qkv-sbhd":
        qkv = _randn(gen, 7, 2, (hq + 2 * hk) * d, requires_grad=True)
        q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
        return "sbhd", q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d))
    # HF's (batch, heads, seq, head_dim), passed as its transpose in bshd.
    q = _randn(gen, 2, hq, 7, d, requires_grad=True)
    k = _randn(gen, 2, hk, 7, d, requires_grad=True)
    return "bshd", q.transpose(1, 2), k.transpose(1, 2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["fused-qkv-bshd", "fused-qkv-thd", "fused-qkv-sbhd",
                                  "hf-transposed"])
def test_strided_inputs_equal_contiguous(backend, case):
    """Strided q and k, column-major tables and a stride-0 (expanded) output gradient read
    correctly: bitwise equal to contiguous copies, outputs and gradients."""
    gen = torch.Generator().manual_seed(7)
    layout, q, k = _strided_qk(case, gen)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(rotary_dim=12)
    cos_t, sin_t = (t.t().contiguous().t() for t in (cos, sin))
    assert cos_t.stride() == (1, N_POSITIONS)
    dq_out = _randn(gen, *q.shape[-2:]).expand(q.shape)
    dk_out = _randn(gen, *k.shape)
    kwargs = dict(layout=layout)
    if layout == "thd":
        kwargs["cu_seqlens"] = _cu(CU)

    out_q, out_k = apply_rotary(q, k, cos_t, sin_t, backend=backend, **kwargs)
    strided = [out_q, out_k, *torch.autograd.grad((out_q, out_k), (q, k), (dq_out, dk_out))]
    contiguous = _run(backend, q.contiguous(), k.contiguous(), cos, sin,
                      (dq_out.contiguous(), dk_out), **kwargs)
    _assert_equal(strided, contiguous, f"{case} vs contiguous")


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_without_k(backend, layout, inplace):
    """k=None rotates q alone, returns (q_rot, None): the q half of the call with k."""
    gen = torch.Generator().manual_seed(8)
    shape = (2, 7, 3, 20) if layout == "bshd" else (13, 3, 20)
    q_leaf = _randn(gen, *shape, dtype=torch.bfloat16, requires_grad=True)
    k_leaf = _randn(gen, *shape[:-2], 1, 20, dtype=torch.bfloat16, requires_grad=True)
    dq_out = _randn(gen, *shape, dtype=torch.bfloat16)
    dk_out = _randn(gen, *k_leaf.shape, dtype=torch.bfloat16)
    cos, sin = _tables(rotary_dim=12)
    kwargs = dict(layout=layout, backend=backend, inplace=inplace)
    if layout == "thd":
        kwargs["cu_seqlens"] = _cu(CU)

    q = q_leaf * 1.0
    out_q, out_k = apply_rotary(q, None, cos, sin, **kwargs)
    assert out_k is None
    assert (out_q is q) == inplace
    alone = [out_q, *torch.autograd.grad(out_q, q_leaf, dq_out)]
    q, k = q_leaf * 1.0, k_leaf * 1.0
    out_q, out_k = apply_rotary(q, k, cos, sin, **kwargs)
    with_k = [out_q, *torch.autograd.grad((out_q, out_k), q_leaf, (dq_out, dk_out))]
    _assert_equal(alone, with_k, "k=None vs with k")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_is_deterministic(backend, layout):
    """Two runs give bitwise identical outputs and gradients."""
    gen = torch.Generator().manual_seed(9)
    shape = (3, 17, 8, 24) if layout == "bshd" else (37, 8, 24)
    q = _randn(gen, *shape, dtype=torch.bfloat16)
    k = _randn(gen, *shape[:-2], 2, 24, dtype=torch.bfloat16)
    grads = (_randn(gen, *q.shape, dtype=q.dtype), _randn(gen, *k.shape, dtype=k.dtype))
    cos, sin = _tables(rotary_dim=16)
    kwargs = dict(layout=layout, interleaved=True)
    if layout == "thd":
        kwargs["cu_seqlens"] = _cu([0, 1, 1, 6, 37])
    else:
        kwargs["seqlen_offsets"] = _cu([0, 5, 31])
    first = _run(backend, q, k, cos, sin, grads, **kwargs)
    second = _run(backend, q, k, cos, sin, grads, **kwargs)
    _assert_equal(first, second, "second run")


@pytest.mark.parametrize("backend", ["triton"])  # the Triton launcher's head grouping
@pytest.mark.parametrize("heads", [8, 3, 2])
def test_head_groups_equal_one_head_per_program(backend, heads, monkeypatch):
    """A program walking several heads (large inputs choose 2, 4 or 8; forced here, with head
    counts that leave the last group part empty) gives what one head per program gives."""
    from eurocore.kernels import rotary as launchers

    gen = torch.Generator().manual_seed(10)
    q, k = _randn(gen, 2, 7, 11, 20), _randn(gen, 2, 7, 3, 20)
    grads = (_randn(gen, *q.shape), _randn(gen, *k.shape))
    cos, sin = _tables(rotary_dim=12)
    kwargs = dict(seqlen_offsets=_cu([1, 30]))
    one_head = _run(backend, q, k, cos, sin, grads, **kwargs)
    monkeypatch.setattr(launchers, "heads_per_program", lambda *args: heads)
    grouped = _run(backend, q, k, cos, sin, grads, **kwargs)
    _assert_equal(grouped, one_head, f"{heads} heads per program")


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
def test_gradient_is_rotation_by_negated_angle(backend, interleaved):
    """dq, dk are the output gradients rotated by -angle (sin negated), in float64 on the
    torch backend, within the oracle's bound in fp32 on the kernels."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(11)
    q = _randn(gen, 13, 3, 20, dtype=dtype, requires_grad=True)
    k = _randn(gen, 13, 1, 20, dtype=dtype, requires_grad=True)
    grads = (_randn(gen, *q.shape, dtype=dtype), _randn(gen, *k.shape, dtype=dtype))
    cos, sin = _tables(rotary_dim=12)
    kwargs = dict(layout="thd", cu_seqlens=_cu(CU), seqlen_offsets=_cu([3, 0, 11, 29]),
                  interleaved=interleaved)
    out_q, out_k = apply_rotary(q, k, cos, sin, backend=backend, **kwargs)
    dq, dk = torch.autograd.grad((out_q, out_k), (q, k), grads)
    reference64 = apply_rotary_reference(grads[0].double(), grads[1].double(), cos, -sin,
                                         **kwargs)
    same_precision = apply_rotary_reference(*grads, cos, -sin, **kwargs)
    for name, a, ref, s in zip(["dq", "dk"], (dq, dk), reference64, same_precision,
                               strict=True):
        assert_close_to_reference(a, ref, s, name=f"{backend} {name}")


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_reference_gradcheck(layout):
    """The specification's gradients (autograd through the torch backend), by finite
    differences in float64; partial, interleaved, GQA, offsets."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 2, 10) if layout == "bshd" else (6, 2, 10)
    q = _randn(gen, *shape, dtype=torch.float64, requires_grad=True)
    k = _randn(gen, *shape[:-2], 1, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in _tables(rotary_dim=6))
    kwargs = dict(layout=layout, interleaved=True, backend="torch")
    if layout == "thd":
        kwargs.update(cu_seqlens=_cu([0, 2, 2, 6]), seqlen_offsets=_cu([1, 0, 7]))
    else:
        kwargs["seqlen_offsets"] = _cu([5, 2])
    assert torch.autograd.gradcheck(
        lambda q, k: apply_rotary(q, k, cos, sin, **kwargs), (q, k))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_torch_backend_in_fp32(backend, case, interleaved):
    """Both round once from the same fp32 products: bitwise equal under the interpreter
    (numpy, no FMA). A GPU may contract x1·c − x2·s into an FMA, so there both need only
    meet the float64 oracle's bound, with the torch backend as the same-precision run."""
    layout, q_shape, k_heads, rotary_dim, cu = CASES[case]
    gen = torch.Generator().manual_seed(13)
    q = _randn(gen, *q_shape)
    k = _randn(gen, *_k_shape(q_shape, k_heads))
    grads = (_randn(gen, *q.shape), _randn(gen, *k.shape))
    cos, sin = _tables(rotary_dim=rotary_dim)
    kwargs = dict(layout=layout, interleaved=interleaved)
    if cu is not None:
        kwargs["cu_seqlens"] = _cu(cu)
    kernel = _run(backend, q, k, cos, sin, grads, **kwargs)
    torch_backend = _run("torch", q, k, cos, sin, grads, **kwargs)
    if triton_interpreter_active():
        _assert_equal(kernel, torch_backend, f"{backend} vs torch")
        return
    reference64 = _run("torch", q.double(), k.double(), cos, sin, [g.double() for g in grads],
                       **kwargs)
    for a, ref, s in zip(kernel, reference64, torch_backend, strict=True):
        assert_close_to_reference(a, ref, s, name=f"{backend} {case}")


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("case", ["bshd-no-seq", "bshd-no-batch", "sbhd-no-seq", "thd-empty",
                                  "thd-empty-sequences", "thd-no-cu"])
def test_no_tokens(backend, case, inplace):
    """No tokens: empty outputs and empty gradients, whatever the (even empty) table."""
    q_shape, layout, cu = {
        "bshd-no-seq": ((2, 0, 3, 16), "bshd", None),
        "bshd-no-batch": ((0, 7, 3, 16), "bshd", None),
        "sbhd-no-seq": ((0, 2, 3, 16), "sbhd", None),
        "thd-empty": ((0, 3, 16), "thd", [0, 0]),
        "thd-empty-sequences": ((0, 3, 16), "thd", [0, 0, 0, 0]),
        "thd-no-cu": ((0, 3, 16), "thd", None),
    }[case]
    q_leaf = torch.randn(q_shape, device=DEVICE, requires_grad=True)
    k_leaf = torch.randn(_k_shape(q_shape, 1), device=DEVICE, requires_grad=True)
    cos, sin = _tables(n_positions=0 if case == "thd-no-cu" else 4, rotary_dim=8)
    kwargs = dict(layout=layout, backend=backend, inplace=inplace)
    if cu is not None:
        kwargs["cu_seqlens"] = _cu(cu)
    q, k = q_leaf * 1.0, k_leaf * 1.0
    out_q, out_k = apply_rotary(q, k, cos, sin, **kwargs)
    assert out_q.shape == q_shape and out_k.shape == k_leaf.shape
    dq, dk = torch.autograd.grad((out_q.sum() + out_k.sum()), (q_leaf, k_leaf))
    assert dq.shape == q_shape and dk.shape == k_leaf.shape


def test_rope_cos_sin_rejects_odd_rotary_dim():
    with pytest.raises(ValueError, match=r"^rotary_dim\b"):
        rope_cos_sin(16, 7)


def _launch_guard(monkeypatch):
    """Makes any kernel launch fail loudly, to prove validation happens first."""
    from eurocore.kernels import rotary as triton_launchers
    from eurocore.ops import cuda_launchers

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    for launchers in (triton_launchers, cuda_launchers):
        monkeypatch.setattr(launchers, "rotary", launched)


def _bad_inputs():
    gen = torch.Generator().manual_seed(14)
    q, k = _randn(gen, 2, 7, 3, 16), _randn(gen, 2, 7, 1, 16)
    qt, kt = _randn(gen, 13, 3, 16), _randn(gen, 13, 1, 16)
    cos, sin = _tables(n_positions=16, rotary_dim=16)
    wide_cos, wide_sin = _tables(n_positions=16, rotary_dim=18)
    ok = dict(q=q, k=k, cos=cos, sin=sin)
    packed = dict(q=qt, k=kt, cos=cos, sin=sin, layout="thd")
    cu = _cu(CU)
    ids = torch.zeros(2, 7, dtype=torch.int64, device=DEVICE)
    ids_at = ids.clone()
    ids_at[1, 3] = 16
    ids_negative = ids.clone()
    ids_negative[0, 6] = -1
    leaf_qkv = _randn(gen, 2, 7, 4, 16, requires_grad=True)
    return [
        # The tables.
        ("cos", ValueError, {**ok, "cos": wide_cos, "sin": wide_sin}),
        ("sin", ValueError, {**ok, "sin": sin[:, :4]}),
        ("sin", ValueError, {**ok, "sin": sin[:10]}),
        ("cos", ValueError, {**ok, "cos": cos[0], "sin": sin[0]}),
        ("sin", ValueError, {**ok, "sin": sin[0]}),
        ("cos", ValueError, {**ok, "cos": cos[:, :0], "sin": sin[:, :0]}),
        ("cos", TypeError, {**ok, "cos": cos.to(torch.int32)}),
        ("cos", TypeError, {**ok, "cos": cos.tolist()}),
        ("cos", ValueError, {**ok, "cos": cos.detach().requires_grad_()}),
        ("sin", ValueError, {**ok, "sin": sin.detach().requires_grad_()}),
        # Tables too short for the positions asked (the op names cos), or negative positions.
        ("cos", ValueError, {**ok, "cos": cos[:6], "sin": sin[:6]}),
        ("cos", ValueError, {**ok, "seqlen_offsets": 10}),
        ("cos", ValueError, {**ok, "position_ids": ids_at}),
        ("cos", ValueError, {**ok, "seqlen_offsets": _cu([0, 10])}),
        ("cos", ValueError, {**packed, "cu_seqlens": cu, "seqlen_offsets": _cu([0, 0, 0, 10])}),
        ("cos", ValueError, {**packed, "position_ids": torch.arange(4, 17, device=DEVICE)}),
        ("position_ids", ValueError, {**ok, "position_ids": ids_negative}),
        ("seqlen_offsets", ValueError, {**ok, "seqlen_offsets": _cu([0, -1])}),
        ("seqlen_offsets", ValueError, {**packed, "cu_seqlens": cu,
                                        "seqlen_offsets": _cu([0, 0, -2, 0])}),
        # cu_seqlens.
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([0, 6, 1, 13])}),
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([1, 6, 13])}),
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([0, 6, 12])}),
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([0, 6, 14])}),
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([13])}),
        ("cu_seqlens", ValueError, {**packed, "cu_seqlens": _cu([[0, 13]])}),
        ("cu_seqlens", TypeError, {**packed, "cu_seqlens": cu.float()}),
        ("cu_seqlens", TypeError, {**packed, "cu_seqlens": CU}),
        ("cu_seqlens", ValueError, {**ok, "cu_seqlens": _cu([0, 7, 14])}),
        # The layout, and q and k against it and each other.
        ("layout", ValueError, {**ok, "layout": "bhsd"}),
        ("layout", ValueError, {**ok, "layout": None}),
        ("q", ValueError, {**ok, "q": qt}),
        ("q", ValueError, {**packed, "q": q, "k": None}),
        ("q", TypeError, {**ok, "q": q.to(torch.int32)}),
        ("q", TypeError, {**ok, "q": q.tolist()}),
        ("k", ValueError, {**ok, "k": k[:1]}),
        ("k", ValueError, {**ok, "k": k[:, :6]}),
        ("k", ValueError, {**ok, "k": _randn(gen, 2, 7, 1, 18)}),
        ("k", ValueError, {**ok, "k": kt}),
        ("k", ValueError, {**packed, "k": kt[:12]}),
        ("k", TypeError, {**ok, "k": k.half()}),
        # position_ids.
        ("position_ids", ValueError, {**ok, "position_ids": ids[:, :6]}),
        ("position_ids", ValueError, {**ok, "position_ids": torch.zeros(3, 7, dtype=torch.int64,
                                                                        device=DEVICE)}),
        ("position_ids", ValueError, {**ok, "position_ids": ids[0]}),
        ("position_ids", ValueError, {**packed, "position_ids": ids[0]}),
        ("position_ids", ValueError, {**packed, "cu_seqlens": cu,
                                      "position_ids": ids.new_zeros(13)}),
        ("position_ids", ValueError, {**ok, "position_ids": ids, "seqlen_offsets": 2}),
        ("position_ids", TypeError, {**ok, "position_ids": ids.float()}),
        # seqlen_offsets.
        ("seqlen_offsets", ValueError, {**ok, "seqlen_offsets": -1}),
        ("seqlen_offsets", ValueError, {**ok, "seqlen_offsets": _cu([0, 1, 2])}),
        ("seqlen_offsets", ValueError, {**packed, "cu_seqlens": cu, "seqlen_offsets": _cu([0, 1])}),
        ("seqlen_offsets", TypeError, {**ok, "seqlen_offsets": 1.5}),
        ("seqlen_offsets", TypeError, {**ok, "seqlen_offsets": True}),
        ("seqlen_offsets", TypeError, {**ok, "seqlen_offsets": torch.zeros(2, device=DEVICE)}),
        # Flags.
        ("interleaved", TypeError, {**ok, "interleaved": "yes"}),
        ("inplace", TypeError, {**ok, "inplace": 1}),
        # In place over a leaf that requires grad, or over a view of one (a fused qkv leaf).
        ("q", ValueError, {**ok, "q": q.clone().requires_grad_(), "inplace": True}),
        ("k", ValueError, {**ok, "k": leaf_qkv[:, :, 3:], "q": leaf_qkv[:, :, :3].detach(),
                           "inplace": True}),
    ]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_rejected_before_launch(backend, case, monkeypatch):
    """Rejected with the argument named, before any launch; in place, nothing is written."""
    argument, error, kwargs = _bad_inputs()[case]
    _launch_guard(monkeypatch)
    with pytest.raises(error, match=rf"^{argument}\b"):
        apply_rotary(**kwargs, backend=backend)
    if "inplace" in kwargs:
        return
    before = {key: kwargs[key].clone() for key in ("q", "k")
              if isinstance(kwargs.get(key), torch.Tensor)}
    with pytest.raises(error, match=rf"^{argument}\b"):
        apply_rotary(**kwargs, inplace=True, backend=backend)
    for key, value in before.items():
        assert torch.equal(kwargs[key], value), f"{key} was written by a rejected call"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_reject_float64(backend, monkeypatch):
    _launch_guard(monkeypatch)
    q = torch.randn(2, 7, 3, 16, device=DEVICE, dtype=torch.float64)
    cos, sin = _tables(rotary_dim=16)
    with pytest.raises(TypeError, match=r"^q\b.*float64"):
        apply_rotary(q, q[:, :, :1], cos, sin, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_out_of_table_positions_give_nan_when_unchecked(backend):
    """The custom op, called without the op's checks, writes NaN in the rotary dims of a token
    whose position lies outside the table (past the end, or negative), and nothing else."""
    gen = torch.Generator().manual_seed(15)
    q, k = _randn(gen, 2, 7, 3, 20), _randn(gen, 2, 7, 1, 20)
    cos, sin = _tables(n_positions=16, rotary_dim=12)
    position_ids = torch.randint(0, 16, (2, 7), generator=gen).to(DEVICE)
    position_ids[1, 3] = 16
    position_ids[0, 5] = -1
    # position_ids of q's token shape are already the op's normalised positions
    out_q, out_k = torch.ops.eurocore.rotary(q, k, cos, sin, position_ids, "bshd", False, False,
                                             backend)
    bad = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    bad[1, 3] = bad[0, 5] = True
    for out, x in ((out_q, q), (out_k, k)):
        assert out[bad][..., :12].isnan().all()
        assert out[~bad].isfinite().all()
        assert torch.equal(out[..., 12:], x[..., 12:])
        good = position_ids.clamp(0, 15)
        expected, _ = apply_rotary_reference(x, None, cos, sin, position_ids=good)
        expected64, _ = apply_rotary_reference(x.double(), None, cos, sin, position_ids=good)
        # Not bitwise: compiled kernels contract x*cos - y*sin into one FMA.
        assert_close_to_reference(out[~bad], expected64[~bad], expected[~bad],
                                  name=f"{backend} in-table tokens")


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_compiles_fullgraph(backend, inplace):
    """A function using the op (in place on non-leaf q and k, or not) compiles with
    fullgraph=True and matches eager, gradients too."""
    cos, sin = _tables(rotary_dim=12)

    def block(q, k, offsets):
        q, k = q * 2, k + 1
        q, k = apply_rotary(q, k, cos, sin, seqlen_offsets=offsets, interleaved=inplace,
                            inplace=inplace, backend=backend)
        return torch.nn.functional.silu(q).sum() + (k * q[:, :, :1]).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    gen = torch.Generator().manual_seed(16)
    q = _randn(gen, 2, 7, 3, 20, requires_grad=True)
    k = _randn(gen, 2, 7, 1, 20, requires_grad=True)
    offsets = _cu([3, 21])
    eager_loss = block(q, k, offsets)
    eager_grads = torch.autograd.grad(eager_loss, (q, k))
    compiled_loss = compiled(q, k, offsets)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton"])  # the C++ grid is tokens / block by construction
def test_packed_grid_is_linear_in_tokens(backend, monkeypatch):
    """Many short packed sequences launch the same grid as one sequence of the same total:
    no work per (max_seqlen x sequences)."""
    from eurocore.kernels import rotary as launchers

    grids = []
    kernel = launchers._rotary_kernel

    class RecordingKernel:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return kernel[grid]

    monkeypatch.setattr(launchers, "_rotary_kernel", RecordingKernel())
    gen = torch.Generator().manual_seed(16)
    total = 97
    q, k = _randn(gen, total, 3, 16), _randn(gen, total, 1, 16)
    cos, sin = _tables(n_positions=total, rotary_dim=16)
    lengths = [1 + i % 3 for i in range(48)] + [1]
    lengths[-1] += total - sum(lengths)
    many = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    one = _cu([0, total])
    apply_rotary(q, k, cos, sin, layout="thd", cu_seqlens=many, backend=backend)
    apply_rotary(q, k, cos, sin, layout="thd", cu_seqlens=one, backend=backend)
    assert len(grids) == 2 and grids[0] == grids[1], grids
    block_t = launchers.launch_config(8, 0)["BLOCK_T"]
    assert grids[0][0] == -(-total // block_t)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_offsets_and_cu_seqlens(backend):
    """Offsets and cu_seqlens given as strided views are read by value, not by storage."""
    gen = torch.Generator().manual_seed(21)
    q, k = _randn(gen, 2, 7, 3, 16), _randn(gen, 2, 7, 1, 16)
    cos, sin = _tables(rotary_dim=16)
    offsets = _cu([[0, 5], [3, 9]])[:, 0]  # (0, 3) with stride 2
    assert offsets.stride(0) == 2
    strided = apply_rotary(q, k, cos, sin, seqlen_offsets=offsets, backend=backend)
    dense = apply_rotary(q, k, cos, sin, seqlen_offsets=offsets.contiguous(), backend=backend)
    _assert_equal(strided, dense, "strided seqlen_offsets")

    qt, kt = q.reshape(14, 3, 16), k.reshape(14, 1, 16)
    cu = _cu([[0, 1], [4, 1], [9, 1], [14, 1]])[:, 0]  # (0, 4, 9, 14) with stride 2
    strided = apply_rotary(qt, kt, cos, sin, layout="thd", cu_seqlens=cu, backend=backend)
    dense = apply_rotary(qt, kt, cos, sin, layout="thd", cu_seqlens=cu.contiguous(),
                         backend=backend)
    _assert_equal(strided, dense, "strided cu_seqlens")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tokens_past_2_to_the_31_elements(backend):
    """In place on tokens 2**31 elements into their storage: reads and writes with offsets
    beyond int32. Needs about 4.3 GB of GPU memory."""
    storage = torch.empty(2**31 + 256, dtype=torch.bfloat16, device="cuda")
    q = storage.as_strided((1, 3, 2, 128), (0, 2**30, 128, 1))
    q.copy_(torch.randn(1, 3, 2, 128, device="cuda"))
    expected = q.clone()
    cos, sin = _tables(rotary_dim=128)
    apply_rotary(expected, None, cos, sin, inplace=True, backend=backend)
    apply_rotary(q, None, cos, sin, inplace=True, backend=backend)
    assert torch.equal(q, expected)
