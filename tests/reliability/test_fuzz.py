"""Differential fuzzer: every op on random valid inputs through every backend this machine
runs (torch; Triton on its interpreter and the C++ kernels on their emulator without a GPU),
held to the float64 reference within the kernel oracle (tests/helpers.py), outputs and
gradients alike; and random invalid inputs, which must raise ValueError, TypeError or
NotImplementedError naming the argument, and change nothing.

Inputs vary in shape (0 and 1 included), dtype, memory layout (padded rows, permuted dims,
non-unit last stride, stride-0 expanded dims, and non-contiguous index tensors), flags, GQA
ratios, packed layouts and windows. CI runs a fixed derivation of a bounded number of
examples (the "ci" profile, tests/conftest.py); ``pytest tests/reliability
--hypothesis-profile=long`` draws fresh ones for as long as it runs. What the fuzzer finds
becomes a regression case in tests/reliability/test_bad_inputs.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import eurocore.ops.attention as attention_op
import eurocore.ops.normalization as normalization_op
import eurocore.ops.rotary as rotary_op
from eurocore.model import check_token_ids, preset
from eurocore.nn import FlashAttention, RMSNorm, RotaryEmbedding
from eurocore.ops import (
    apply_rotary,
    apply_rotary_reference,
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
    rms_norm,
    rms_norm_reference,
    rope_cos_sin,
)
from eurocore.ops.backends import backend_status, triton_interpreter_active
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference
from tests.reliability.strategies import (
    FLOAT_DTYPES,
    FLOAT_DTYPES_NO_BF16,
    LAYOUTS,
    bounds,
    index_tensors,
    laid_out,
    randn,
    seeds,
    sequence_lengths,
    tensors,
)

pytestmark = pytest.mark.fuzz

REJECTIONS = (ValueError, TypeError, NotImplementedError)
# bf16 tl.dot is wrong on the interpreter (docs/design.md): attention takes bf16 on GPUs only.
ATTENTION_DTYPES = FLOAT_DTYPES if DEVICE.type == "cuda" else FLOAT_DTYPES_NO_BF16
# The oracle's absolute term: 1e-5 as tests/ops/test_attention.py, but at least one unit of
# the half types: on the fuzzer's tiny tensors (2 queries, say) a single element rounding the
# other way is all the max error is made of, which the 2x rule alone cannot absorb (a find:
# fp16 dv over two rows at 2.3x the reference's error, half a unit).
def attention_atol(dtype: torch.dtype) -> float:
    return max(1e-5, torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)


def examples(ci: int) -> settings:
    """``ci`` examples under the default profile; the loaded profile's count otherwise."""
    if settings.get_current_profile_name() == "ci":
        return settings(max_examples=ci)
    return settings()


def runnable(implemented: tuple[str, ...]) -> list[str]:
    """The op's backends this machine can run."""
    return [name for name in implemented if backend_status(name).available]


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (any layout) as a leaf that requires grad, keeping its layout."""
    return None if t is None else t.detach().requires_grad_()


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_()


def outputs_and_grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                      output_grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """outputs, then the gradients of Σ output · grad with respect to ``inputs``."""
    grads = torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for o, g in
                                                  zip(outputs, output_grads, strict=True)],
                                allow_unused=True)
    return [*outputs, *(g if g is not None else torch.zeros_like(i)
                        for g, i in zip(grads, inputs, strict=True))]


def assert_all_close(names, actual, same_precision, reference64, what, atol=None,
                     scales: dict[str, float] | None = None) -> None:
    """Each result within the oracle; ``scales`` overrides the helper's default magnitude
    for the named results."""
    for name, a, s, ref in zip(names, actual, same_precision, reference64, strict=True):
        assert_close_to_reference(a, ref, s, name=f"{what}: {name}", atol=atol,
                                  scale=(scales or {}).get(name))


def interpreter_atol(backend: str, *tensors: torch.Tensor | None) -> float | None:
    """The oracle's absolute term where Triton's interpreter rounds bf16 toward zero inside
    an fp32 result (a normalised value just below 1 drops a whole unit, where GPUs round it
    to 1): one bf16 unit. None (the helper's default) elsewhere."""
    bf16 = any(t is not None and t.dtype == torch.bfloat16 for t in tensors)
    if backend == "triton" and bf16 and triton_interpreter_active():
        return torch.finfo(torch.bfloat16).eps
    return None


def assert_unchanged(snapshot: dict[str, tuple[torch.Tensor, int]], args: dict) -> None:
    """Every tensor argument holds the values and version it had before the call."""
    for name, (values, version) in snapshot.items():
        tensor = args[name]
        assert tensor._version == version, f"{name} was written"
        assert torch.equal(tensor.detach().cpu(), values) or (
            values.isnan().any() and torch.equal(tensor.detach().cpu().nan_to_num(7.0),
                                                 values.nan_to_num(7.0))), f"{name} changed"


def snapshot_of(args: dict) -> dict[str, tuple[torch.Tensor, int]]:
    return {name: (t.detach().cpu().clone(), t._version) for name, t in args.items()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def assert_rejected(call, args: dict, names: set[str], what: str) -> None:
    """``call(**args)`` raises one of REJECTIONS whose message starts with one of ``names``
    and leaves every tensor argument as it was."""
    before = snapshot_of(args)
    try:
        call(**args)
    except REJECTIONS as err:
        named = re.match(r"^([\w.]+)(\[\d+\])?:", str(err))
        assert named and named.group(1) in names, (
            f"{what}: expected an error naming one of {sorted(names)}, got "
            f"{type(err).__name__}: {err}")
    else:
        raise AssertionError(f"{what}: accepted")
    assert_unchanged(before, args)


def assert_each_rejected(call, base: dict, mutations: dict, backends: list[str]) -> None:
    """Every mutation of the valid arguments ``base``, on every backend it applies to, is
    rejected (:func:`assert_rejected`). A mutation is (change, names, its backends or None);
    ``change`` edits a copy of the arguments and may return False to skip itself (when the
    example gives it nothing to break)."""
    for mutation, (change, names, only) in mutations.items():
        for backend in backends:
            if only is not None and backend not in only:
                continue
            args = {**base, "backend": backend}
            if change(args) is False:
                continue
            assert_rejected(call, args, names, f"{mutation} on {backend}")


# -------------------------------------------------------------------------------------------
# RMSNorm
# -------------------------------------------------------------------------------------------

RMS_BACKENDS = runnable(normalization_op.IMPLEMENTED)


@st.composite
def rms_norm_cases(draw) -> dict:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    lead = draw(st.lists(st.integers(0, 4), max_size=2))
    n = draw(st.one_of(st.integers(1, 40), st.sampled_from([255, 256, 257, 1025])))
    shape = (*lead, n)
    weight_dtype = draw(st.sampled_from([None, dtype, torch.float32]))
    zero_centered = weight_dtype is not None and draw(st.booleans())
    weight = None
    if weight_dtype is not None:
        seed = draw(seeds())
        values = 0.1 * randn(seed, (n,), torch.float32) + (0.0 if zero_centered else 1.0)
        weight = laid_out(values.to(weight_dtype),
                          draw(st.sampled_from(["contiguous", "strided"])), seed)
    residual_dtype = draw(st.sampled_from([None, dtype, torch.float32]))
    return {
        "x": draw(tensors(shape, dtype)),
        "weight": weight,
        "eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "residual": (draw(tensors(shape, residual_dtype)) if residual_dtype is not None
                     else None),
        "zero_centered_weight": zero_centered,
        "grad_seed": draw(seeds()),
    }


def _rms_norm_run(fn, case: dict, x, weight, residual) -> list[torch.Tensor]:
    out = fn(x, weight, case["eps"], residual=residual,
             zero_centered_weight=case["zero_centered_weight"])
    outputs = list(out) if residual is not None else [out]
    grads = [randn(case["grad_seed"] + i, o.shape, o.dtype) for i, o in enumerate(outputs)]
    inputs = [t for t in (x, weight, residual) if t is not None]
    return outputs_and_grads(outputs, inputs, grads)


@examples(200)
@given(case=rms_norm_cases())
# A find: one element whose square is near eps; its gradient is a difference of much larger
# terms (see _rms_norm_gradient_scale).
@example(case={"x": torch.tensor([0.0775], device=DEVICE), "weight": None, "eps": 1e-6,
               "residual": None, "zero_centered_weight": False, "grad_seed": 20})
def test_rms_norm_backends_agree_with_the_reference(case):
    x, weight, residual = (leaf(case[k]) for k in ("x", "weight", "residual"))
    names = ["y", *(["h"] if residual is not None else []), "dx",
             *(["dweight"] if weight is not None else []),
             *(["dresidual"] if residual is not None else [])]
    same = _rms_norm_run(rms_norm_reference, case, x, weight, residual)
    ref64 = _rms_norm_run(rms_norm_reference, case, leaf64(x), leaf64(weight), leaf64(residual))
    scales = {name: _rms_norm_gradient_scale(case, x, weight, residual)
              for name in ("dx", "dresidual")}
    for backend in RMS_BACKENDS:
        def fn(*args, backend=backend, **kwargs):
            return rms_norm(*args, backend=backend, **kwargs)

        actual = _rms_norm_run(fn, case, x, weight, residual)
        assert_all_close(names, actual, same, ref64,
                         f"rms_norm {backend} x {tuple(x.shape)} {x.dtype} strides "
                         f"{x.stride()}", atol=interpreter_atol(backend, x, weight, residual),
                         scales=scales)


def _rms_norm_gradient_scale(case: dict, x, weight, residual) -> float:
    """The magnitude of the terms RMSNorm's input gradient is the difference of, rstd · |g|
    with g = dy · w (a fuzzer find: a one-element row whose square is near eps has a tiny
    gradient that carries the rounding error of those terms, on every backend alike)."""
    h = x.detach().double() + (residual.detach().double() if residual is not None else 0.0)
    if h.numel() == 0:
        return 1.0
    rstd = torch.rsqrt(h.pow(2).mean(-1) + case["eps"]).max().item()
    dy = randn(case["grad_seed"], h.shape, torch.float64).abs().max().item()
    w = 1.0 if weight is None else (weight.detach().double().abs().max().item()
                                    + case["zero_centered_weight"])
    return max(1.0, rstd * dy * w)


RMS_MUTATIONS = {
    # name: (change the arguments, the names the error may start with, backends it applies to)
    "x a list": (lambda a: a.update(x=a["x"].tolist()), {"x"}, None),
    "x integer": (lambda a: a.update(x=a["x"].long()), {"x"}, None),
    "x 0-dim": (lambda a: a.update(x=a["x"].sum()), {"x"}, None),
    "x empty rows": (lambda a: a.update(x=a["x"][..., :0]), {"x"}, None),
    "x float64 on a kernel": (lambda a: a.update(x=a["x"].double(), residual=None),
                              {"x", "weight"}, ("triton", "cuda")),
    "weight too long": (lambda a: a.update(weight=torch.ones(a["x"].shape[-1] + 1,
                                                             device=DEVICE)), {"weight"}, None),
    "weight integer": (lambda a: a.update(weight=torch.ones(a["x"].shape[-1], device=DEVICE,
                                                            dtype=torch.int32)), {"weight"},
                       None),
    "weight on meta": (lambda a: a.update(weight=torch.ones(a["x"].shape[-1], device="meta")),
                       {"weight"}, None),
    "residual of another shape": (lambda a: a.update(residual=torch.cat([a["x"]] * 2, -1)),
                                  {"residual"}, None),
    "eps nan": (lambda a: a.update(eps=math.nan), {"eps"}, None),
    "eps negative": (lambda a: a.update(eps=-1e-5), {"eps"}, None),
    "eps a string": (lambda a: a.update(eps="1e-5"), {"eps"}, None),
    "eps a bool": (lambda a: a.update(eps=True), {"eps"}, None),
    "zero_centered without weight": (lambda a: a.update(weight=None, zero_centered_weight=True),
                                     {"zero_centered_weight"}, None),
    "zero_centered not a bool": (lambda a: a.update(zero_centered_weight=1),
                                 {"zero_centered_weight"}, None),
    "backend unknown": (lambda a: a.update(backend="cudnn"), {"backend"}, None),
}


@examples(80)
@given(case=rms_norm_cases())
def test_rms_norm_rejects_invalid_inputs(case):
    base = {k: case[k] for k in ("x", "weight", "eps", "residual", "zero_centered_weight")}
    assert_each_rejected(rms_norm, base, RMS_MUTATIONS, RMS_BACKENDS)


# -------------------------------------------------------------------------------------------
# Rotary embeddings
# -------------------------------------------------------------------------------------------

ROTARY_BACKENDS = runnable(rotary_op.IMPLEMENTED)


@st.composite
def rotary_cases(draw) -> dict:
    layout = draw(st.sampled_from(rotary_op.LAYOUTS))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    head_dim = 2 * draw(st.integers(1, 16))
    rotary_dim = 2 * draw(st.integers(1, head_dim // 2))
    q_heads = draw(st.integers(0, 4))
    k_heads = draw(st.one_of(st.none(), st.integers(0, 3)))
    kwargs: dict = {"interleaved": draw(st.booleans()), "layout": layout}
    if layout == "thd":
        mode = draw(st.sampled_from(["none", "offset", "offsets", "position_ids", "cu_seqlens",
                                     "cu_seqlens+offsets"]))
        if mode.startswith("cu_seqlens"):
            lengths = draw(sequence_lengths())
            kwargs["cu_seqlens"] = draw(index_tensors(bounds(lengths)))
            sequences, longest = len(lengths), max(lengths)
        else:
            total = draw(st.integers(0, 12))
            lengths, sequences, longest = [total], 1, total
        tokens = (sum(lengths),)
    else:
        mode = draw(st.sampled_from(["none", "offset", "offsets", "position_ids"]))
        batch, seq = draw(st.integers(0, 3)), draw(st.integers(0, 9))
        tokens = (batch, seq) if layout == "bshd" else (seq, batch)
        sequences, longest = batch, seq
    n_positions = longest + 6 + draw(st.integers(0, 3))
    if mode in ("offset",):
        kwargs["seqlen_offsets"] = draw(st.integers(0, 6))
    elif mode.endswith("offsets"):
        kwargs["seqlen_offsets"] = draw(index_tensors(
            draw(st.lists(st.integers(0, 6), min_size=sequences, max_size=sequences))))
    elif mode == "position_ids":
        if layout == "thd":
            shape = draw(st.sampled_from([tokens, (1, *tokens)]))
        else:
            batch, seq = (tokens if layout == "bshd" else tokens[::-1])
            shape = (draw(st.sampled_from([batch, 1])), seq)
        seed = draw(seeds())
        ids = torch.randint(0, n_positions, shape, generator=torch.Generator().manual_seed(seed))
        kwargs["position_ids"] = laid_out(ids.to(DEVICE, draw(st.sampled_from(
            [torch.int32, torch.int64]))), draw(st.sampled_from(["contiguous", "permuted",
                                                                 "strided"])), seed)
    inplace = draw(st.booleans())
    layouts = [lay for lay in LAYOUTS if not (inplace and lay == "expanded")]
    q = draw(tensors((*tokens, q_heads, head_dim), dtype, layouts=layouts))
    k = (draw(tensors((*tokens, k_heads, head_dim), dtype, layouts=layouts))
         if k_heads is not None else None)
    # In place, q and k may be views of one fused buffer (a qkv projection's output)
    fused = inplace and k is not None and draw(st.booleans())
    table_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    cos, sin = (t.to(DEVICE, table_dtype) for t in rope_cos_sin(n_positions, rotary_dim))
    return {"q": q, "k": k, "cos": cos, "sin": sin, "inplace": inplace, "fused": fused,
            "kwargs": kwargs,
            "grad_seed": draw(seeds())}


def _rotary_run(fn, case: dict, q, k, *, inplace: bool) -> list[torch.Tensor]:
    """Rotates (in place: copies of q and k laid out as they are, or as the two head ranges
    of one fused buffer, written under autograd), then backpropagates random output
    gradients to q and k."""
    q_in, k_in = q, k
    if inplace and case["fused"]:
        heads = q.shape[-2]
        fused = torch.empty((*q.shape[:-2], heads + k.shape[-2], q.shape[-1]), dtype=q.dtype,
                            device=q.device)
        fused[..., :heads, :] = q
        fused[..., heads:, :] = k
        q_in, k_in = fused[..., :heads, :], fused[..., heads:, :]
    elif inplace:
        q_in, k_in = (None if t is None else laid_out_copy(t) for t in (q, k))
    out_q, out_k = fn(q_in, k_in, case["cos"], case["sin"], **case["kwargs"])
    if inplace:
        assert out_q is q_in and out_k is k_in, "inplace returns its inputs"
    outputs = [out_q] + ([out_k] if k is not None else [])
    grads = [randn(case["grad_seed"] + i, o.shape, o.dtype) for i, o in enumerate(outputs)]
    return outputs_and_grads(outputs, [t for t in (q, k) if t is not None], grads)


def laid_out_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with t's strides, made under autograd (so in-place writes to it are
    legal and backpropagate to t)."""
    buffer = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return buffer.copy_(t)


@examples(300)
@given(case=rotary_cases())
def test_rotary_backends_agree_with_the_reference(case):
    q, k = leaf(case["q"]), leaf(case["k"])
    names = ["q_rot", *(["k_rot"] if k is not None else []), "dq",
             *(["dk"] if k is not None else [])]
    same = _rotary_run(apply_rotary_reference, case, q, k, inplace=False)
    ref64 = _rotary_run(apply_rotary_reference, case, leaf64(q), leaf64(k), inplace=False)
    for backend in ROTARY_BACKENDS:
        def fn(*args, backend=backend, **kwargs):
            return apply_rotary(*args, inplace=case["inplace"], backend=backend, **kwargs)

        actual = _rotary_run(fn, case, q, k, inplace=case["inplace"])
        assert_all_close(names, actual, same, ref64,
                         f"apply_rotary {backend} {case['kwargs']} q {tuple(q.shape)} "
                         f"{q.dtype} strides {q.stride()} inplace={case['inplace']}",
                         atol=interpreter_atol(backend, q, case["cos"]))


def _tokens(a: dict) -> int:
    """Tokens of the rotary arguments ``a`` (positions are only checked when there are)."""
    return math.prod(a["q"].shape[:-2])


def _k_aliasing_q(a: dict) -> bool:
    if a["q"].numel() == 0:
        return False  # nothing to share
    q = a["q"].clone()  # q's own layout may be an expanded one: that is another mutation
    a.update(q=q, k=q, inplace=True)
    return True


def _k_overlapping_q(a: dict) -> bool:
    """k two heads wide, its first the last of q's, both views of one buffer."""
    q = a["q"]
    if _tokens(a) == 0 or q.shape[-2] == 0:
        return False
    heads = q.shape[-2]
    buffer = torch.zeros(*q.shape[:-2], heads + 1, q.shape[-1], dtype=q.dtype, device=DEVICE)
    a.update(q=buffer[..., :heads, :], k=buffer[..., heads - 1:, :], inplace=True)
    return True


def _expanded_q_in_place(a: dict) -> bool:
    q = a["q"]
    expanded = torch.zeros(1, *q.shape[1:], dtype=q.dtype, device=DEVICE).expand(
        2, *q.shape[1:])
    if expanded.numel() == 0:
        return False
    a.update(q=expanded, k=None, inplace=True, position_ids=None, cu_seqlens=None,
             seqlen_offsets=0)
    return True


def _positions_of(a: dict, value: int, dtype=torch.int64) -> torch.Tensor:
    """Position ids of the right shape for the rotary arguments ``a``, all ``value``."""
    q = a["q"]
    shape = {"bshd": q.shape[:2], "sbhd": (q.shape[1], q.shape[0]),
             "thd": q.shape[:1]}[a.get("layout", "bshd")]
    return torch.full(tuple(shape), value, dtype=dtype, device=DEVICE)


def _position_ids(value: int, dtype=torch.int64):
    def change(a: dict) -> bool:
        if _tokens(a) == 0 and dtype != torch.float32:
            return False  # no position is read
        a.update(position_ids=_positions_of(a, value, dtype), seqlen_offsets=0,
                 cu_seqlens=None)
        return True
    return change


def _table_too_short(a: dict) -> bool:
    if _tokens(a) == 0:
        return False
    a.update(cos=a["cos"][:1], sin=a["sin"][:1], position_ids=None, seqlen_offsets=7)
    return True


def _cu_seqlens_outside_thd(a: dict) -> bool:
    if a.get("layout") == "thd":
        return False
    a["cu_seqlens"] = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    return True


ROTARY_MUTATIONS = {
    "q integer": (lambda a: a.update(q=a["q"].long()), {"q"}, None),
    "q of the wrong rank": (lambda a: a.update(q=a["q"].sum(-2)), {"q"}, None),
    "k of another dtype": (lambda a: a.update(
        k=a["q"].to(torch.float64 if a["q"].dtype != torch.float64 else torch.float32)),
        {"k"}, None),
    "k of another head_dim": (lambda a: a.update(k=a["q"][..., :-1].clone()), {"k"}, None),
    "cos integer": (lambda a: a.update(cos=a["cos"].long()), {"cos"}, None),
    "cos one-dimensional": (lambda a: a.update(cos=a["cos"][0]), {"cos"}, None),
    "sin of another shape": (lambda a: a.update(sin=a["sin"][:-1]), {"sin"}, None),
    "cos requires grad": (lambda a: a.update(cos=a["cos"].clone().requires_grad_()), {"cos"},
                          None),
    "cos too wide": (lambda a: a.update(cos=torch.cat([a["cos"]] * (a["q"].shape[-1] + 1), 1),
                                        sin=torch.cat([a["sin"]] * (a["q"].shape[-1] + 1), 1)),
                     {"cos"}, None),
    "table too short": (_table_too_short, {"cos"}, None),
    "layout unknown": (lambda a: a.update(layout="bhsd"), {"layout"}, None),
    "interleaved not a bool": (lambda a: a.update(interleaved=1), {"interleaved"}, None),
    "inplace not a bool": (lambda a: a.update(inplace="yes"), {"inplace"}, None),
    "inplace with k aliasing q": (_k_aliasing_q, {"k"}, None),
    "inplace with k overlapping q": (_k_overlapping_q, {"k"}, None),
    "inplace on an expanded q": (_expanded_q_in_place, {"q"}, None),
    "seqlen_offsets negative": (lambda a: a.update(seqlen_offsets=-1, position_ids=None),
                                {"seqlen_offsets"}, None),
    "seqlen_offsets a float": (lambda a: a.update(seqlen_offsets=1.0, position_ids=None),
                               {"seqlen_offsets"}, None),
    "seqlen_offsets of floats": (lambda a: a.update(
        seqlen_offsets=torch.zeros(3, device=DEVICE), position_ids=None), {"seqlen_offsets"},
        None),
    "position_ids of floats": (_position_ids(0, torch.float32), {"position_ids"}, None),
    "position_ids negative": (_position_ids(-1), {"position_ids"}, None),
    "position_ids past the table": (_position_ids(10_000), {"cos"}, None),
    "cu_seqlens outside thd": (_cu_seqlens_outside_thd, {"cu_seqlens"}, None),
    "float64 on a kernel": (lambda a: a.update(q=a["q"].double(),
                                               k=a["k"].double() if a["k"] is not None
                                               else None), {"q"}, ("triton", "cuda")),
    "backend unknown": (lambda a: a.update(backend="rocm"), {"backend"}, None),
}


@examples(80)
@given(case=rotary_cases())
def test_rotary_rejects_invalid_inputs(case):
    base = {"q": case["q"], "k": case["k"], "cos": case["cos"], "sin": case["sin"],
            "inplace": case["inplace"], **case["kwargs"]}
    if base["inplace"]:  # in place on copies that do not require grad
        base["q"] = base["q"].clone()
        base["k"] = base["k"].clone() if base["k"] is not None else None
    assert_each_rejected(apply_rotary, base, ROTARY_MUTATIONS, ROTARY_BACKENDS)


# -------------------------------------------------------------------------------------------
# Flash attention
# -------------------------------------------------------------------------------------------

ATTENTION_BACKENDS = runnable(attention_op.IMPLEMENTED)


@st.composite
def attention_cases(draw) -> dict:
    dtype = draw(st.sampled_from(ATTENTION_DTYPES))
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    heads, head_dim = kv_heads * group, 8 * draw(st.integers(1, 4))
    options = {
        "causal": draw(st.booleans()),
        "window_size": draw(st.one_of(st.just((-1, -1)),
                                      st.tuples(st.integers(-1, 6), st.integers(-1, 6)))),
        "softcap": draw(st.sampled_from([0.0, 0.0, 4.0])),
        "softmax_scale": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        "deterministic": draw(st.booleans()),
    }
    varlen = draw(st.booleans())
    return_lse = draw(st.booleans())
    case: dict = {"options": options, "varlen": varlen, "grad_seed": draw(seeds()),
                  "return_lse": return_lse, "lse_loss": return_lse and draw(st.booleans())}
    if varlen:
        lengths_q = draw(sequence_lengths(max_sequences=3, max_length=13))
        lengths_k = draw(st.lists(st.integers(0, 13), min_size=len(lengths_q),
                                  max_size=len(lengths_q)))
        case["cu_q"] = draw(index_tensors(bounds(lengths_q)))
        case["cu_k"] = draw(index_tensors(bounds(lengths_k)))
        case["max_q"] = max(lengths_q) + draw(st.integers(0, 3))
        case["max_k"] = max(lengths_k) + draw(st.integers(0, 3))
        q_shape, k_shape = (sum(lengths_q), heads, head_dim), (sum(lengths_k), kv_heads,
                                                               head_dim)
    else:
        batch, seqlen_q, seqlen_k = (draw(st.integers(0, 2)), draw(st.integers(0, 13)),
                                     draw(st.integers(0, 13)))
        q_shape, k_shape = (batch, seqlen_q, heads, head_dim), (batch, seqlen_k, kv_heads,
                                                                head_dim)
    case["q"] = draw(tensors(q_shape, dtype))
    case["k"] = draw(tensors(k_shape, dtype))
    case["v"] = draw(tensors(k_shape, dtype))
    return case


def _attention_run(fn, case: dict, q, k, v) -> list[torch.Tensor | None]:
    """out, lse (None when the op was asked for out alone), then dq, dk, dv of Σ out · dout
    (+ Σ lse · dlse over the rows that see a key, when the case puts lse in the loss)."""
    out, lse = fn(q, k, v)
    dout = randn(case["grad_seed"], out.shape, out.dtype)
    loss = (out * dout.to(out.dtype)).sum()
    if case["lse_loss"]:
        dlse = randn(case["grad_seed"] + 1, lse.shape, torch.float32)
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0) * dlse.to(lse.dtype)).sum()
    return [out, lse, *torch.autograd.grad(loss, (q, k, v))]


def _attention_fn(case: dict, backend: str | None, upcast: bool = True):
    """(q, k, v) -> (out, lse): the op on ``backend`` (lse None when the case does not ask
    for it), or the reference when None."""
    options = dict(case["options"])
    if backend is None:
        options.pop("deterministic")
        if case["varlen"]:
            return lambda q, k, v: attention_varlen_reference(
                q, k, v, case["cu_q"], case["cu_k"], upcast=upcast, **options)
        return lambda q, k, v: attention_reference(q, k, v, upcast=upcast, **options)

    def op(q, k, v):
        if case["varlen"]:
            result = flash_attention_varlen(q, k, v, case["cu_q"], case["cu_k"], case["max_q"],
                                            case["max_k"], return_lse=case["return_lse"],
                                            backend=backend, **options)
        else:
            result = flash_attention(q, k, v, return_lse=case["return_lse"], backend=backend,
                                     **options)
        return result if case["return_lse"] else (result, None)
    return op


@examples(150)
@given(case=attention_cases())
def test_attention_backends_agree_with_the_reference(case):
    q, k, v = (leaf(case[name]) for name in "qkv")
    same = _attention_run(_attention_fn(case, None, upcast=False), case, q, k, v)
    ref64 = _attention_run(_attention_fn(case, None), case, leaf64(q), leaf64(k), leaf64(v))
    for backend in ATTENTION_BACKENDS:
        actual = _attention_run(_attention_fn(case, backend), case, q, k, v)
        what = (f"attention {backend} varlen={case['varlen']} {case['options']} q "
                f"{tuple(q.shape)} {q.dtype} strides {q.stride()} lse_loss={case['lse_loss']}")
        if actual[1] is None:  # out alone
            assert_all_close(["out", "dq", "dk", "dv"], [actual[0], *actual[2:]],
                             [same[0], *same[2:]], [ref64[0], *ref64[2:]], what,
                             atol=attention_atol(q.dtype))
            continue
        # lse: -inf exactly where no key is seen, the rest within the oracle
        lse, lse64 = actual[1], ref64[1].detach()
        assert not lse.isnan().any(), f"{what}: lse NaN"
        dead = lse64 == float("-inf")
        assert torch.equal(lse.detach().cpu() == float("-inf"), dead.cpu()), (
            f"{what}: lse is -inf where the reference's is not, or the reverse")
        live = [actual[0], lse[~dead], *actual[2:]], [same[0], same[1][~dead], *same[2:]], \
            [ref64[0], lse64[~dead], *ref64[2:]]
        assert_all_close(["out", "lse", "dq", "dk", "dv"], *live, what,
                         atol=attention_atol(q.dtype))


def _varlen_only(change):
    """A mutation of packed arguments (skipped for fixed-length ones)."""
    def apply(a: dict) -> bool:
        if "cu_seqlens_q" not in a:
            return False
        change(a)
        return True
    return apply


def _decreasing_cu_seqlens_q(a: dict) -> bool:
    cu = a.get("cu_seqlens_q")
    if cu is None or cu.shape[0] < 3:
        return False
    a["cu_seqlens_q"] = torch.cat([cu[:1], cu[-1:] + 1, cu[2:]])
    return True


ATTENTION_MUTATIONS = {
    "q integer": (lambda a: a.update(q=a["q"].long()), {"q"}, None),
    "q of the wrong rank": (lambda a: a.update(q=a["q"][..., 0]), {"q"}, None),
    "k of another dtype": (lambda a: a.update(k=a["k"].double()), {"k"}, None),
    "v of another shape": (lambda a: a.update(v=torch.cat([a["v"], a["v"]], -2)), {"v"}, None),
    "k of another head_dim": (lambda a: a.update(k=a["k"][..., :-1], v=a["v"][..., :-1]),
                              {"k"}, None),
    "heads not a multiple of kv heads": (lambda a: a.update(
        k=torch.cat([a["k"]] * (a["q"].shape[-2] + 1), -2),
        v=torch.cat([a["v"]] * (a["q"].shape[-2] + 1), -2)), {"k"}, None),
    "k on meta": (lambda a: a.update(k=a["k"].to("meta")), {"k"}, None),
    "causal not a bool": (lambda a: a.update(causal=1), {"causal"}, None),
    "window_size an int": (lambda a: a.update(window_size=5), {"window_size"}, None),
    "window_size below -1": (lambda a: a.update(window_size=(-2, 0)), {"window_size"}, None),
    "window_size floats": (lambda a: a.update(window_size=(1.5, 0)), {"window_size"}, None),
    "softcap negative": (lambda a: a.update(softcap=-1.0), {"softcap"}, None),
    "softcap nan": (lambda a: a.update(softcap=math.nan), {"softcap"}, None),
    "softmax_scale inf": (lambda a: a.update(softmax_scale=math.inf), {"softmax_scale"}, None),
    "softmax_scale a string": (lambda a: a.update(softmax_scale="0.1"), {"softmax_scale"},
                               None),
    "return_lse not a bool": (lambda a: a.update(return_lse=None), {"return_lse"}, None),
    "deterministic not a bool": (lambda a: a.update(deterministic="yes"), {"deterministic"},
                                 None),
    "float64 on a kernel": (lambda a: a.update(q=a["q"].double(), k=a["k"].double(),
                                               v=a["v"].double()), {"q"}, ("triton",)),
    "head_dim a kernel cannot take": (lambda a: a.update(
        q=a["q"][..., :-4], k=a["k"][..., :-4], v=a["v"][..., :-4]), {"q"}, ("triton",)),
    "cu_seqlens_q float": (_varlen_only(lambda a: a.update(
        cu_seqlens_q=a["cu_seqlens_q"].float())), {"cu_seqlens_q"}, None),
    "cu_seqlens_k two-dimensional": (_varlen_only(lambda a: a.update(
        cu_seqlens_k=a["cu_seqlens_k"][None])), {"cu_seqlens_k"}, None),
    "cu_seqlens_k past the end": (_varlen_only(lambda a: a.update(
        cu_seqlens_k=torch.cat([a["cu_seqlens_k"][:-1], a["cu_seqlens_k"][-1:] + 1]))),
        {"cu_seqlens_k"}, None),
    "cu_seqlens_q decreasing": (_decreasing_cu_seqlens_q, {"cu_seqlens_q"}, None),
    "max_seqlen_q negative": (_varlen_only(lambda a: a.update(max_seqlen_q=-1)),
                              {"max_seqlen_q"}, None),
    "max_seqlen_k a float": (_varlen_only(lambda a: a.update(max_seqlen_k=3.0)),
                             {"max_seqlen_k"}, None),
    "max_seqlen_k below the longest": (_varlen_only(lambda a: a.update(
        max_seqlen_k=int((a["cu_seqlens_k"][1:] - a["cu_seqlens_k"][:-1]).max()) - 1)),
        {"max_seqlen_k"}, None),
    "backend unknown": (lambda a: a.update(backend="flash"), {"backend"}, None),
}


@examples(80)
@given(case=attention_cases())
def test_attention_rejects_invalid_inputs(case):
    base = {"q": case["q"], "k": case["k"], "v": case["v"], **case["options"]}
    if case["varlen"]:
        base.update(cu_seqlens_q=case["cu_q"], cu_seqlens_k=case["cu_k"],
                    max_seqlen_q=case["max_q"], max_seqlen_k=case["max_k"])
    op = flash_attention_varlen if case["varlen"] else flash_attention
    assert_each_rejected(op, base, ATTENTION_MUTATIONS, ATTENTION_BACKENDS)


# -------------------------------------------------------------------------------------------
# Modules: constructor arguments, each drawn valid or not
# -------------------------------------------------------------------------------------------

def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value, minimum: float, above: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and (value > minimum if above else value >= minimum))


BACKEND_VALUES = (None, "auto", "torch", "triton", "cuda", "cudnn", 3)
# argument -> (values to draw from, which of them are valid)
FLASH_ATTENTION_ARGS = {
    "causal": ((True, False, 1, None, "yes"), lambda v: isinstance(v, bool)),
    "softmax_scale": ((None, 0.125, 1, 0.0, math.nan, math.inf, "0.1", True),
                      lambda v: v is None or _is_number(v, -math.inf)),
    "window_size": (((-1, -1), (3, 0), [2, 2], 5, (1,), (1.5, 0), (-2, 0), (True, 0)),
                    lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                    and all(_is_int(w, -1) for w in v)),
    "softcap": ((0.0, 5, 30.0, -1.0, math.nan, "1"), lambda v: _is_number(v, 0.0)),
    "backend": (BACKEND_VALUES, lambda v: v in (None, "auto", "torch", "triton", "cuda")),
}
RMS_NORM_ARGS = {
    "normalized_shape": ((8, (4, 3), [5], 0, -2, (4, 0), "8", 2.0, ()),
                         lambda v: _is_int(v, 1) or (isinstance(v, (tuple, list)) and
                                                     len(v) > 0 and all(_is_int(n, 1)
                                                                        for n in v))),
    "eps": ((None, 1e-6, 0, 1e-5, -1e-6, math.nan, math.inf, "1e-6"),
            lambda v: v is None or _is_number(v, 0.0)),
    "elementwise_affine": ((True, False, 1, None), lambda v: isinstance(v, bool)),
    "zero_centered_weight": ((False, True, 0, "no"), lambda v: isinstance(v, bool)),
    "backend": (BACKEND_VALUES, lambda v: v in (None, "auto", "torch", "triton", "cuda")),
}
ROTARY_EMBEDDING_ARGS = {
    "rotary_dim": ((8, 16, 2, 7, 0, -4, 8.0, True), lambda v: _is_int(v, 2) and v % 2 == 0),
    "max_position_embeddings": ((32, 1, 0, -5, 32.0), lambda v: _is_int(v, 1)),
    "theta": ((10000.0, 500000, 1.0, 0.5, math.nan, "1e4"), lambda v: _is_number(v, 1.0,
                                                                                  above=True)),
    "interleaved": ((False, True, 1, None), lambda v: isinstance(v, bool)),
    "layout": (("bshd", "sbhd", "thd", "bhsd", None), lambda v: v in rotary_op.LAYOUTS),
    "backend": (BACKEND_VALUES, lambda v: v in (None, "auto", "torch", "triton", "cuda")),
}


def _module_case(arguments: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({name: st.sampled_from(values)
                                  for name, (values, _) in arguments.items()})


def _assert_built_or_named(build, kwargs: dict, invalid: set[str]) -> None:
    """Every argument valid: the module is built. Else TypeError or ValueError naming one
    of the invalid arguments, at construction."""
    if not invalid:
        build(**kwargs)
        return
    try:
        build(**kwargs)
    except (TypeError, ValueError) as err:
        named = re.match(r"^(\w+):", str(err))
        assert named and named.group(1) in invalid, (
            f"{kwargs}: expected an error naming one of {sorted(invalid)}, got "
            f"{type(err).__name__}: {err}")
    else:
        raise AssertionError(f"{kwargs}: built with {sorted(invalid)} invalid")


@examples(150)
@given(kwargs=_module_case(FLASH_ATTENTION_ARGS))
def test_flash_attention_module_checks_its_arguments(kwargs):
    invalid = {n for n, (_, valid) in FLASH_ATTENTION_ARGS.items() if not valid(kwargs[n])}
    _assert_built_or_named(FlashAttention, kwargs, invalid)


@examples(150)
@given(kwargs=_module_case(RMS_NORM_ARGS))
def test_rms_norm_module_checks_its_arguments(kwargs):
    invalid = {n for n, (_, valid) in RMS_NORM_ARGS.items() if not valid(kwargs[n])}
    if not invalid and kwargs["zero_centered_weight"] and not kwargs["elementwise_affine"]:
        invalid = {"zero_centered_weight"}  # scales by 1 + a weight it would not have
    _assert_built_or_named(RMSNorm, kwargs, invalid)


@examples(150)
@given(kwargs=_module_case(ROTARY_EMBEDDING_ARGS))
def test_rotary_embedding_module_checks_its_arguments(kwargs):
    invalid = {n for n, (_, valid) in ROTARY_EMBEDDING_ARGS.items() if not valid(kwargs[n])}
    _assert_built_or_named(RotaryEmbedding, kwargs, invalid)


# -------------------------------------------------------------------------------------------
# Token ids, labels and positions of the model
# -------------------------------------------------------------------------------------------

TINY = preset("tiny")


@st.composite
def id_batches(draw) -> dict:
    """Token ids, labels and positions, each in range or with a few strays."""
    batch, seq = draw(st.integers(0, 3)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(seeds()))

    def ids(bound: int, strays: tuple[int, ...], extra: tuple[int, ...] = ()) -> torch.Tensor:
        values = torch.randint(0, bound, (batch, seq), generator=gen)
        for _ in range(draw(st.integers(0, 2))):
            if values.numel():
                where = draw(st.integers(0, values.numel() - 1))
                values.view(-1)[where] = draw(st.sampled_from(strays + extra))
        return values.to(draw(st.sampled_from([torch.int32, torch.int64])))

    vocab, positions = TINY.vocab_size, TINY.max_seq_len
    return {"tokens": ids(vocab, (-1, vocab, vocab + 7, 2**40)),
            "labels": ids(vocab, (-1, -101, vocab), (-100, -100, 0)),
            "position_ids": ids(positions, (-1, positions, 10**6), (0,))}


def _first_stray(batch: dict) -> str | None:
    bounds = {"tokens": TINY.vocab_size, "labels": TINY.vocab_size,
              "position_ids": TINY.max_seq_len}
    for name, bound in bounds.items():
        ids = batch[name]
        outside = (ids < 0) | (ids >= bound)
        if name == "labels":
            outside &= ids != -100
        if outside.any():
            return name
    return None


@examples(200)
@given(batch=id_batches())
def test_token_ids_are_checked(batch):
    """check_token_ids raises exactly when an id is out of its range, naming the first
    tensor that holds one, and changes nothing."""
    stray = _first_stray(batch)
    before = snapshot_of(batch)
    if stray is None:
        check_token_ids(TINY, **batch)
    else:
        with pytest.raises(ValueError, match=rf"^{stray}: -?\d+ at index \[\d+, \d+\]"):
            check_token_ids(TINY, **batch)
    assert_unchanged(before, batch)
