"""eurocore.nn.RotaryEmbedding as a drop-in for HF's rotary embedding and its application."""

from __future__ import annotations

import types

import pytest
import torch

import eurocore.ops.rotary as rotary
from eurocore.nn import RotaryEmbedding
from eurocore.ops import (
    apply_rotary,
    apply_rotary_reference,
    rope_cos_sin,
)
from eurocore.ops.rotary import _inv_freq
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference
from tests.ops.test_rope_cos_sin import hf_llama_config

BACKENDS = list(rotary.IMPLEMENTED)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
HF_CONFIGS = {
    # name -> (max_position_embeddings, rope_parameters)
    "default": (4096, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": (131072, LLAMA3),
}


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def _qk_hf_layout(gen, head_dim=32, seq=9):
    """q (batch 2, heads 4, seq, head_dim) and k (2 kv heads), float64 on DEVICE."""
    return _randn(2, 4, seq, head_dim, gen=gen, dtype=torch.float64), \
        _randn(2, 2, seq, head_dim, gen=gen, dtype=torch.float64)


def _reference64(q64, k64, position_ids, rotary_dim, max_pos, theta, scaling):
    """apply_rotary_reference in float64 with a float64 table, in HF's (b, h, s, d) layout."""
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64),
                         _inv_freq(rotary_dim, theta, scaling)).to(DEVICE)
    q, k = apply_rotary_reference(q64.transpose(1, 2), k64.transpose(1, 2), angles.cos(),
                                  angles.sin(), position_ids=position_ids)
    return q.transpose(1, 2), k.transpose(1, 2)


def _position_ids(gen, max_pos, seq=9):
    """Non-trivial positions: a gap, a repeat, and large ones near the end of the table."""
    row0 = torch.tensor([0, 1, 2, 7, 7, 100, 1000, max_pos // 2, max_pos - 1])[:seq]
    row1 = torch.randint(0, max_pos, (seq,), generator=gen)
    return torch.stack((row0, row1)).to(DEVICE)


# -------------------------------------------------------------------------------------------
# HF parity
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_hf_llama_end_to_end(name, backend, dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    max_pos, rope_parameters = HF_CONFIGS[name]
    config = hf_llama_config(transformers, head_dim=32, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=max_pos,
                             rope_parameters=rope_parameters)
    gen = torch.Generator().manual_seed(0)
    q64, k64 = _qk_hf_layout(gen)
    q, k = q64.to(dtype), k64.to(dtype)
    position_ids = _position_ids(gen, max_pos)

    hf_rope = modeling_llama.LlamaRotaryEmbedding(config=config).to(DEVICE)
    cos, sin = hf_rope(q, position_ids)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)

    # Cast like the model around it: the tables stay fp32.
    rope = RotaryEmbedding.from_hf_config(config, backend=backend, device=DEVICE).to(dtype)
    assert rope.rotary_dim == 32 and rope.max_position_embeddings == max_pos
    out_q, out_k = rope(q.transpose(1, 2), k.transpose(1, 2), position_ids=position_ids)
    out_q, out_k = out_q.transpose(1, 2), out_k.transpose(1, 2)

    theta = rope_parameters["rope_theta"]
    ref_q, ref_k = _reference64(q.double(), k.double(), position_ids, 32, max_pos, theta,
                                rope_parameters)
    # No less accurate than HF (factor 1), up to the dtype's tiny absolute term.
    tag = f"({name}, {backend}, {dtype})"
    assert_close_to_reference(out_q, ref_q, hf_q, name=f"q {tag}", factor=1.0)
    assert_close_to_reference(out_k, ref_k, hf_k, name=f"k {tag}", factor=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_rotary_matches_hf_gpt_neox(backend):
    """HF's Llama does not support partial rotary (its default rope ignores the factor, and
    its apply_rotary_pos_emb rotates the whole head); GPT-NeoX does: rotate-half within the
    first int(head_dim * partial_rotary_factor) dims, the rest passed through."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox

    # GPT-NeoX's own names for partial_rotary_factor and rope_theta, taken by v4 and v5 alike.
    config = transformers.GPTNeoXConfig(
        hidden_size=128, num_attention_heads=4, max_position_embeddings=2048, rotary_pct=0.5,
        rotary_emb_base=10000)
    gen = torch.Generator().manual_seed(1)
    q64, k64 = _qk_hf_layout(gen)
    q, k = q64.float(), k64.float()
    position_ids = _position_ids(gen, 2048)

    hf_rope = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config=config).to(DEVICE)
    cos, sin = hf_rope(q, position_ids)
    assert cos.shape[-1] == 16  # HF rotates half of each 32-dim head
    # As GPTNeoXAttention: rotate the first 16 dims, pass the rest through.
    hf_q, hf_k = modeling_gpt_neox.apply_rotary_pos_emb(q[..., :16], k[..., :16], cos, sin)
    hf_q, hf_k = torch.cat((hf_q, q[..., 16:]), -1), torch.cat((hf_k, k[..., 16:]), -1)

    rope = RotaryEmbedding.from_hf_config(config, backend=backend, device=DEVICE)
    assert rope.rotary_dim == 16 and rope.cos.shape == (2048, 8)
    out_q, out_k = rope(q.transpose(1, 2), k.transpose(1, 2), position_ids=position_ids)
    out_q, out_k = out_q.transpose(1, 2), out_k.transpose(1, 2)
    assert torch.equal(out_q[..., 16:], q[..., 16:])  # passed through untouched

    ref_q, ref_k = _reference64(q.double(), k.double(), position_ids, 16, 2048, 10000.0, None)
    assert_close_to_reference(out_q, ref_q, hf_q, name=f"q ({backend})", factor=1.0)
    assert_close_to_reference(out_k, ref_k, hf_k, name=f"k ({backend})", factor=1.0)


# -------------------------------------------------------------------------------------------
# from_hf_config on plain objects
# -------------------------------------------------------------------------------------------


def _assert_tables(rope, rotary_dim, max_pos, theta, scaling):
    cos, sin = rope_cos_sin(max_pos, rotary_dim, theta=theta, scaling=scaling)
    assert rope.rotary_dim == rotary_dim and rope.max_position_embeddings == max_pos
    assert torch.equal(rope.cos.cpu(), cos) and torch.equal(rope.sin.cpu(), sin)


def test_from_hf_config_v4_style():
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    config = types.SimpleNamespace(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=300,
        rope_theta=500000.0, rope_scaling=scaling)
    _assert_tables(RotaryEmbedding.from_hf_config(config), 64, 300, 500000.0, scaling)
    # Plain RoPE: rope_scaling None; partial_rotary_factor and head_dim as attributes.
    config = types.SimpleNamespace(
        hidden_size=256, num_attention_heads=4, head_dim=48, max_position_embeddings=100,
        rope_theta=1234.0, rope_scaling=None, partial_rotary_factor=0.25)
    _assert_tables(RotaryEmbedding.from_hf_config(config), 12, 100, 1234.0, None)
    # The legacy "type" key.
    config = types.SimpleNamespace(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=50, rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 2.0})
    _assert_tables(RotaryEmbedding.from_hf_config(config), 32, 50, 10000.0,
                   {"rope_type": "linear", "factor": 2.0})


def test_from_hf_config_v5_style():
    config = types.SimpleNamespace(
        hidden_size=256, num_attention_heads=4, head_dim=None, max_position_embeddings=300,
        rope_parameters=dict(LLAMA3))
    _assert_tables(RotaryEmbedding.from_hf_config(config), 64, 300, 500000.0, LLAMA3)
    # partial_rotary_factor and rope_theta inside rope_parameters win over attributes.
    config = types.SimpleNamespace(
        hidden_size=256, num_attention_heads=4, head_dim=32, max_position_embeddings=100,
        rope_theta=10000.0, partial_rotary_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 77.0,
                         "partial_rotary_factor": 0.5})
    _assert_tables(RotaryEmbedding.from_hf_config(config), 16, 100, 77.0, None)


def test_from_hf_config_passes_kwargs_through():
    config = types.SimpleNamespace(hidden_size=64, num_attention_heads=2,
                                   max_position_embeddings=4096, rope_theta=10000.0)
    rope = RotaryEmbedding.from_hf_config(config, layout="sbhd", interleaved=True,
                                          backend="torch", device="meta",
                                          max_position_embeddings=64)
    assert (rope.layout, rope.interleaved, rope.backend) == ("sbhd", True, "torch")
    assert rope.cos.device.type == "meta" and rope.cos.shape == (64, 16)


def test_from_hf_config_with_real_llama_config():
    transformers = pytest.importorskip("transformers")
    config = hf_llama_config(transformers, head_dim=64, num_attention_heads=4,
                             max_position_embeddings=200, rope_parameters=LLAMA3)
    _assert_tables(RotaryEmbedding.from_hf_config(config), 64, 200, 500000.0, LLAMA3)


# -------------------------------------------------------------------------------------------
# Tables stay fp32 and exact through conversions
# -------------------------------------------------------------------------------------------


def _fresh(rope):
    return rope_cos_sin(rope.max_position_embeddings, rope.rotary_dim, theta=rope.theta,
                        scaling=rope.scaling, device=rope.cos.device)


def _assert_exact(rope):
    cos, sin = _fresh(rope)
    assert rope.cos.dtype == rope.sin.dtype == torch.float32
    assert torch.equal(rope.cos, cos) and torch.equal(rope.sin, sin)


@pytest.mark.parametrize("cast", [
    lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
    lambda m: m.to(DEVICE, torch.float16), lambda m: m.bfloat16().float(),
], ids=["to-bf16", "half", "double", "to-device-fp16", "bf16-then-float"])
def test_casting_keeps_fp32_exact_tables(cast):
    # Inside a parent, as in a model: the parent's cast reaches the module through _apply.
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4),
                                 "rope": RotaryEmbedding(64, 1000, theta=5e5, scaling=LLAMA3)})
    cast(model)
    _assert_exact(model["rope"])


def test_device_move():
    rope = RotaryEmbedding(32, 100).to("meta")
    assert rope.cos.device.type == "meta" and rope.cos.dtype == torch.float32
    rope = RotaryEmbedding(32, 100).to(DEVICE)
    assert rope.cos.device.type == rope.sin.device.type == DEVICE.type
    _assert_exact(rope)


@pytest.mark.parametrize("how", ["argument", "context"])
def test_meta_then_to_empty(how):
    if how == "argument":
        rope = RotaryEmbedding(64, 500, theta=5e5, scaling=LLAMA3, device="meta")
    else:
        with torch.device("meta"):
            rope = RotaryEmbedding(64, 500, theta=5e5, scaling=LLAMA3)
    assert rope.cos.is_meta and rope.cos.shape == (500, 32)
    rope.to_empty(device=DEVICE)
    assert rope.cos.device.type == DEVICE.type
    _assert_exact(rope)


# -------------------------------------------------------------------------------------------
# forward passes its options through
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_thd_with_cu_seqlens_equals_the_op(backend):
    gen = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(24, 64, layout="thd", backend=backend, device=DEVICE)
    q, k = _randn(13, 3, 32, gen=gen), _randn(13, 1, 32, gen=gen)
    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32, device=DEVICE)
    out = rope(q, k, cu_seqlens=cu)
    expected = apply_rotary(q, k, rope.cos, rope.sin, cu_seqlens=cu, layout="thd",
                            backend=backend)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    # cu_seqlens mattered: positions restart in each sequence.
    assert not torch.equal(out[0], rope(q, k)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_and_offsets_equal_the_op(backend):
    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(16, 64, interleaved=True, backend=backend, device=DEVICE)
    q = _randn(2, 5, 3, 16, gen=gen)
    out_q, out_k = rope(q, seqlen_offsets=7)
    expected, _ = apply_rotary(q, None, rope.cos, rope.sin, seqlen_offsets=7, interleaved=True,
                               backend=backend)
    assert out_k is None
    assert torch.equal(out_q, expected)
    rotate_half, _ = apply_rotary(q, None, rope.cos, rope.sin, seqlen_offsets=7,
                                  backend=backend)
    assert not torch.allclose(out_q, rotate_half)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend):
    gen = torch.Generator().manual_seed(4)
    rope = RotaryEmbedding(32, 64, backend=backend, device=DEVICE)
    q, k = _randn(2, 7, 4, 32, gen=gen), _randn(2, 7, 2, 32, gen=gen)
    expected_q, expected_k = rope(q, k)
    q_ptr = q.data_ptr()
    out_q, out_k = rope(q, k, inplace=True)
    assert out_q is q and out_k is k and q.data_ptr() == q_ptr
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_is_fixed_per_module(backend, monkeypatch):
    """The module's backend wins over EUROCORE_BACKEND; its kernel runs iff it is chosen."""
    from eurocore.kernels import rotary as triton_launchers
    from eurocore.ops import cuda_launchers

    calls = []
    for name, launchers in (("triton", triton_launchers), ("cuda", cuda_launchers)):
        def counted(*args, _launch=launchers.rotary, _name=name, **kwargs):
            calls.append(_name)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(launchers, "rotary", counted)
    other = "torch" if backend != "torch" else "triton"
    monkeypatch.setenv("EUROCORE_BACKEND", other)
    rope = RotaryEmbedding(8, 10, backend=backend, device=DEVICE)
    rope(torch.randn(1, 3, 2, 8, device=DEVICE))
    assert calls == ([] if backend == "torch" else [backend])


def test_sbhd_layout_and_bad_positions():
    rope = RotaryEmbedding(8, 10, layout="sbhd")
    q = torch.randn(4, 2, 1, 8)
    expected, _ = apply_rotary(q, None, rope.cos, rope.sin, layout="sbhd")
    assert torch.equal(rope(q)[0], expected)
    with pytest.raises(ValueError, match=r"^cos\b"):  # beyond max_position_embeddings
        rope(q, seqlen_offsets=7)


# -------------------------------------------------------------------------------------------
# State dict, constructor checks, repr
# -------------------------------------------------------------------------------------------


def test_state_dict_is_empty_and_loads_strictly():
    rope = RotaryEmbedding(32, 128)
    assert dict(rope.state_dict()) == {}
    assert {name for name, _ in rope.named_buffers()} == {"cos", "sin"}
    result = rope.load_state_dict({}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_exact(rope)
    parent = torch.nn.Sequential(torch.nn.Linear(4, 4), rope)
    assert set(parent.state_dict()) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("arg, exc, kwargs", [
    ("rotary_dim", ValueError, dict(rotary_dim=7)),
    ("max_position_embeddings", ValueError, dict(max_position_embeddings=0)),
    ("max_position_embeddings", TypeError, dict(max_position_embeddings=10.0)),
    ("theta", ValueError, dict(theta=1.0)),
    ("scaling", ValueError, dict(scaling={"rope_type": "yarn", "factor": 2.0})),
    ("layout", ValueError, dict(layout="bhsd")),
    ("interleaved", TypeError, dict(interleaved=1)),
    ("backend", ValueError, dict(backend="cudnn")),
])
def test_bad_constructor_arguments_name_themselves(arg, exc, kwargs):
    kwargs = {"rotary_dim": 8, **kwargs}
    with pytest.raises(exc, match=rf"^{arg}\b"):
        RotaryEmbedding(kwargs.pop("rotary_dim"), **kwargs)


def test_scaling_is_copied():
    scaling = {"rope_type": "linear", "factor": 2.0}
    rope = RotaryEmbedding(8, 10, scaling=scaling)
    scaling["factor"] = 4.0  # a later change to the caller's dict must not reach the module
    rope.half()
    _assert_exact(rope)
    assert torch.equal(rope.cos, rope_cos_sin(10, 8, scaling={"rope_type": "linear",
                                                              "factor": 2.0})[0])


def test_extra_repr():
    text = repr(RotaryEmbedding(64, 128, theta=5e5, scaling={"rope_type": "linear",
                                                             "factor": 2.0},
                                layout="thd", interleaved=True, backend="torch"))
    for part in ("rotary_dim=64", "max_position_embeddings=128", "theta=500000.0",
                 "'factor': 2.0", "interleaved=True", "layout='thd'", "backend='torch'"):
        assert part in text, text


# -------------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    rope = RotaryEmbedding(32, 64, backend=backend, device=DEVICE)

    def attention_prologue(q, k, position_ids):
        q, k = rope(q * 2, k, position_ids=position_ids)
        return (q.square().sum() + k.sum()) / 7

    gen = torch.Generator().manual_seed(5)
    q = _randn(2, 5, 4, 32, gen=gen).requires_grad_()
    k = _randn(2, 5, 2, 32, gen=gen).requires_grad_()
    position_ids = torch.randint(0, 64, (2, 5), generator=gen).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(attention_prologue, fullgraph=True)
    eager_loss = attention_prologue(q, k, position_ids)
    eager_grads = torch.autograd.grad(eager_loss, (q, k))
    compiled_loss = compiled(q, k, position_ids)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_share_memory_keeps_the_shared_tables():
    """Only a change of dtype or device rebuilds the tables; share_memory() keeps its copy."""
    rope = RotaryEmbedding(16, 32)
    rope.share_memory()
    assert rope.cos.is_shared() and rope.sin.is_shared()
    assert torch.equal(rope.cos, rope_cos_sin(32, 16)[0])
