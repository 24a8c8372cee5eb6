"""eurocore.nn.FlashAttention: the module passes its options to the ops, fixed and packed."""

from __future__ import annotations

import pytest
import torch

import eurocore.ops.attention as attention
from eurocore.nn import FlashAttention
from eurocore.ops import flash_attention, flash_attention_varlen
from tests.conftest import DEVICE

BACKENDS = list(attention.IMPLEMENTED)
OPTIONS = dict(causal=True, softmax_scale=0.3, window_size=(5, -1), softcap=4.0)


def _qkv(gen, *lead, heads=4, kv_heads=2, head_dim=16):
    def randn(h):
        return torch.randn(*lead, h, head_dim, generator=gen).to(DEVICE)

    return randn(heads), randn(kv_heads), randn(kv_heads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_length_equals_the_op(backend):
    q, k, v = _qkv(torch.Generator().manual_seed(0), 2, 19)
    module = FlashAttention(**OPTIONS, backend=backend)
    expected = flash_attention(q, k, v, **OPTIONS, backend=backend)
    assert torch.equal(module(q, k, v), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_the_varlen_op(backend):
    q, k, v = _qkv(torch.Generator().manual_seed(1), 23)
    cu = torch.tensor([0, 4, 5, 23], dtype=torch.int32, device=DEVICE)
    module = FlashAttention(**OPTIONS, backend=backend)
    expected = flash_attention_varlen(q, k, v, cu, cu, 18, 18, **OPTIONS, backend=backend)
    assert torch.equal(module(q, k, v, cu_seqlens=cu), expected)
    assert torch.equal(module(q, k, v, cu_seqlens=cu, max_seqlen=18), expected)


def test_default_is_causal_and_differs_from_full_attention():
    q, k, v = _qkv(torch.Generator().manual_seed(2), 1, 9)
    out = FlashAttention(backend="torch")(q, k, v)
    assert torch.equal(out, flash_attention(q, k, v, causal=True, backend="torch"))
    assert not torch.allclose(out, flash_attention(q, k, v, backend="torch"))


def test_max_seqlen_without_cu_seqlens_is_rejected():
    q, k, v = _qkv(torch.Generator().manual_seed(3), 1, 9)
    with pytest.raises(ValueError, match=r"^max_seqlen\b"):
        FlashAttention()(q, k, v, max_seqlen=9)


def test_repr_names_the_options():
    text = repr(FlashAttention(**OPTIONS, backend="torch"))
    for piece in ("causal=True", "softmax_scale=0.3", "window_size=(5, -1)", "softcap=4.0",
                  "backend='torch'"):
        assert piece in text
