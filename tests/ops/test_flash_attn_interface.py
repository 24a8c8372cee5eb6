"""eurocore.flash_attn_interface: flash-attn 2's signatures over eurocore's attention ops.

Every call goes through eurocore.ops.flash_attention(_varlen), so a positional call must equal
the op's keyword call exactly, on each backend (chosen by EUROCORE_BACKEND, as the interface
has no ``backend=``). Under the CPU interpreter bf16 dots are wrong (docs/design.md), so the
kernel runs use float32 and float16 only, on tiny odd shapes.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import eurocore.flash_attn_interface as fai
from eurocore.flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from eurocore.ops import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
ATOL = 1e-5  # as tests/ops/test_attention.py

# batch 2, seqlen_q 5, seqlen_k 7, heads 4, kv_heads 2 (GQA), head_dim 16.
BATCH, SEQ_Q, SEQ_K, HEADS, KV_HEADS, HEAD_DIM = 2, 5, 7, 4, 2, 16
# Packed: q lengths 5, 0, 2 against k lengths 7, 2, 3.
CU_Q, CU_K = [0, 5, 5, 7], [0, 7, 9, 12]
MAX_Q, MAX_K = 5, 7

# Options that each change the output on these inputs (checked below), given positionally.
OPTIONS = dict(causal=True, softmax_scale=0.3, window_size=(3, 1), softcap=5.0)

# flash-attn 2.8.3 (flash_attn/flash_attn_interface.py at tag v2.8.3.post1, the newest 2.x
# release; the same on main, 2.8.4): (name, default), in order; _REQUIRED: no default.
_REQUIRED = inspect.Parameter.empty
FLASH_ATTN_FUNC_PARAMS = [
    ("q", _REQUIRED), ("k", _REQUIRED), ("v", _REQUIRED), ("dropout_p", 0.0),
    ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
    ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
]
FLASH_ATTN_VARLEN_FUNC_PARAMS = [
    ("q", _REQUIRED), ("k", _REQUIRED), ("v", _REQUIRED), ("cu_seqlens_q", _REQUIRED),
    ("cu_seqlens_k", _REQUIRED), ("max_seqlen_q", _REQUIRED), ("max_seqlen_k", _REQUIRED),
    ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
    ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
    ("return_attn_probs", False), ("block_table", None),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend every call without ``backend=`` takes, through EUROCORE_BACKEND."""
    monkeypatch.setenv("EUROCORE_BACKEND", request.param)
    return request.param


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def _fixed_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, BATCH, SEQ_Q, HEADS, HEAD_DIM, dtype=dtype)
    k = _randn(gen, BATCH, SEQ_K, KV_HEADS, HEAD_DIM, dtype=dtype)
    v = _randn(gen, BATCH, SEQ_K, KV_HEADS, HEAD_DIM, dtype=dtype)
    return q, k, v


def _varlen_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, CU_Q[-1], HEADS, HEAD_DIM, dtype=dtype)
    k = _randn(gen, CU_K[-1], KV_HEADS, HEAD_DIM, dtype=dtype)
    v = _randn(gen, CU_K[-1], KV_HEADS, HEAD_DIM, dtype=dtype)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (CU_Q, CU_K))
    return q, k, v, cu_q, cu_k


def _positional(options):
    """The arguments after q, k, v (and the varlen ones), in flash-attn's order, with
    ``options`` over the defaults; deterministic=True, the non-default, as well."""
    o = {"causal": False, "softmax_scale": None, "window_size": (-1, -1), "softcap": 0.0,
         **options}
    return (0.0, o["softmax_scale"], o["causal"], o["window_size"], o["softcap"], None, True,
            False)


def _out_and_grads(out, inputs):
    return [out, *torch.autograd.grad(out, inputs, torch.ones_like(out))]


def _assert_equal(actual, expected, what):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{what}: {name} differs"


# -------------------------------------------------------------------------------------------
# Signatures
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, expected", [(flash_attn_func, FLASH_ATTN_FUNC_PARAMS),
                                          (flash_attn_varlen_func, FLASH_ATTN_VARLEN_FUNC_PARAMS)],
                         ids=["flash_attn_func", "flash_attn_varlen_func"])
def test_signature_is_flash_attn_2s(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.default) for p in params] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


# -------------------------------------------------------------------------------------------
# Positional calls: the op's keyword call exactly, and within the float64 oracle
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positional_call_is_the_op(backend, dtype):
    q, k, v = _fixed_inputs(dtype)
    out = flash_attn_func(q, k, v, *_positional(OPTIONS))
    expected = flash_attention(q, k, v, **OPTIONS, deterministic=True, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    _assert_equal(_out_and_grads(out, (q, k, v)), _out_and_grads(expected, (q, k, v)),
                  f"{backend} {dtype}")

    reference64, _ = attention_reference(*(t.detach().double() for t in (q, k, v)), **OPTIONS)
    same_precision, _ = attention_reference(q, k, v, upcast=False, **OPTIONS)
    assert_close_to_reference(out, reference64, same_precision,
                              name=f"{backend} {dtype} out", atol=ATOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_positional_call_is_the_op(backend, dtype):
    q, k, v, cu_q, cu_k = _varlen_inputs(dtype)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, *_positional(OPTIONS),
                                 None)
    expected = flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, **OPTIONS,
                                      deterministic=True, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    _assert_equal(_out_and_grads(out, (q, k, v)), _out_and_grads(expected, (q, k, v)),
                  f"{backend} varlen {dtype}")

    reference = functools.partial(attention_varlen_reference, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k, **OPTIONS)
    reference64, _ = reference(*(t.detach().double() for t in (q, k, v)))
    same_precision, _ = reference(q, k, v, upcast=False)
    assert_close_to_reference(out, reference64, same_precision,
                              name=f"{backend} varlen {dtype} out", atol=ATOL)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "varlen"])
def test_each_positional_option_reaches_the_op(backend, option, packed):
    """Each option alone, given positionally, gives the op's output with that keyword, which
    differs from the default output on these inputs: dropping or misplacing it fails."""
    value = {option: OPTIONS[option]}
    if packed:
        q, k, v, cu_q, cu_k = _varlen_inputs(torch.float32)
        lead = (q, k, v, cu_q, cu_k, MAX_Q, MAX_K)
        out = flash_attn_varlen_func(*lead, *_positional(value), None)
        expected = flash_attention_varlen(*lead, **value, backend=backend)
        default = flash_attention_varlen(*lead, backend=backend)
    else:
        q, k, v = _fixed_inputs(torch.float32)
        out = flash_attn_func(q, k, v, *_positional(value))
        expected = flash_attention(q, k, v, **value, backend=backend)
        default = flash_attention(q, k, v, backend=backend)
    assert torch.equal(out, expected), f"{option} did not reach the op"
    assert not torch.equal(expected, default), f"{option}: no effect on these inputs"


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_is_accepted(deterministic):
    q, k, v = _fixed_inputs(torch.float32)
    out = flash_attn_func(q, k, v, deterministic=deterministic)
    assert torch.equal(out, flash_attention(q, k, v))


# -------------------------------------------------------------------------------------------
# Unsupported arguments: NotImplementedError naming them, before any work
# -------------------------------------------------------------------------------------------


UNSUPPORTED = {
    "dropout_p": 0.1,
    "alibi_slopes": torch.zeros(HEADS),
    "return_attn_probs": True,
    "block_table": torch.zeros(3, 1, dtype=torch.int32),
}


# (argument, packed): flash_attn_func has no block_table.
UNSUPPORTED_CASES = [(arg, packed) for arg in UNSUPPORTED for packed in (False, True)
                     if packed or arg != "block_table"]


@pytest.mark.parametrize("arg, packed", UNSUPPORTED_CASES,
                         ids=[f"{a}-{'varlen' if p else 'fixed'}" for a, p in UNSUPPORTED_CASES])
def test_unsupported_argument_is_refused_by_name(arg, packed, monkeypatch):
    def dispatched(*args, **kwargs):
        raise AssertionError("the op was called before the argument was refused")

    monkeypatch.setattr(fai, "flash_attention", dispatched)
    monkeypatch.setattr(fai, "flash_attention_varlen", dispatched)
    if packed:
        q, k, v, cu_q, cu_k = _varlen_inputs(torch.float32)
        call = functools.partial(flash_attn_varlen_func, q, k, v, cu_q, cu_k, MAX_Q, MAX_K)
    else:
        call = functools.partial(flash_attn_func, *_fixed_inputs(torch.float32))
    with pytest.raises(NotImplementedError, match=rf"^{arg}: "):
        call(**{arg: UNSUPPORTED[arg]})


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), ("0", TypeError)])
def test_malformed_dropout_p_is_refused_by_name(value, error):
    with pytest.raises(error, match=r"^dropout_p: "):
        flash_attn_func(*_fixed_inputs(torch.float32), dropout_p=value)


def test_options_are_checked_by_the_op():
    """The op's own checks apply, naming the option (not restated here)."""
    with pytest.raises(ValueError, match=r"^window_size: "):
        flash_attn_func(*_fixed_inputs(torch.float32), 0.0, None, False, (-2, 0))
