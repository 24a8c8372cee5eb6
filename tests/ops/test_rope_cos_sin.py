"""eurocore.ops.rope_cos_sin against an independent float64 formula and HF transformers."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from eurocore.ops import rope_cos_sin
from eurocore.ops.rotary import _inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# name -> (theta, scaling)
CONFIGS = {
    "default-10k": (10000.0, None),
    "default-500k": (500000.0, {"rope_type": "default"}),
    "linear-4": (10000.0, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (500000.0, LLAMA3),
}


def inv_freq64(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """HF's inverse frequencies, written out here one frequency at a time in Python floats."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    theta = scaling.get("rope_theta", theta)
    out = []
    for i in range(rotary_dim // 2):
        f = 1.0 / theta ** (2 * i / rotary_dim)
        if rope_type == "linear":
            f = f / scaling["factor"]
        elif rope_type == "llama3":
            # Llama 3.1: keep short wavelengths, slow long ones by `factor`, ramp in between.
            factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor",
                                                      "high_freq_factor"))
            orig = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / f
            if wavelen > orig / low:
                f = f / factor
            elif wavelen >= orig / high:
                smooth = (orig / wavelen - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def angles64(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    return positions.double()[:, None] * inv_freq[None, :]


def fp32_ulp(x: torch.Tensor) -> torch.Tensor:
    """One fp32 unit in the last place at |x| (upward spacing), as float64."""
    a = x.abs().float()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def assert_within_ulp(actual: torch.Tensor, ref64: torch.Tensor, name: str) -> None:
    assert actual.dtype == torch.float32, name
    err = (actual.double() - ref64).abs()
    ratio = (err / fp32_ulp(ref64)).max().item()
    assert ratio <= 1.0, f"{name}: off by {ratio:.3g} fp32 ulps from the float64 formula"


# -------------------------------------------------------------------------------------------
# Against an independent float64 evaluation
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rotary_dim", [128, 96, 6])
def test_matches_float64_formula_to_one_fp32_ulp(name, rotary_dim):
    theta, scaling = CONFIGS[name]
    seqlen = 2 ** 17 + 3 if rotary_dim == 6 else 4099  # long tables only where they are cheap
    cos, sin = rope_cos_sin(seqlen, rotary_dim, theta=theta, scaling=scaling)
    assert cos.shape == sin.shape == (seqlen, rotary_dim // 2)
    angles = angles64(torch.arange(seqlen), inv_freq64(rotary_dim, theta, scaling))
    assert_within_ulp(cos, angles.cos(), f"{name} cos")
    assert_within_ulp(sin, angles.sin(), f"{name} sin")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inv_freq_matches_float64_formula(name):
    theta, scaling = CONFIGS[name]
    torch.testing.assert_close(_inv_freq(128, theta, scaling), inv_freq64(128, theta, scaling),
                               rtol=1e-14, atol=0)


def test_llama3_config_exercises_all_three_regions():
    """The llama3 cases above mean something only if some frequencies are kept, some slowed
    and some ramped; then the table differs from both plain and linearly scaled ones."""
    base = inv_freq64(128, 500000.0, None)
    ours = _inv_freq(128, 500000.0, LLAMA3)
    kept = torch.isclose(ours, base, rtol=1e-15, atol=0)
    slowed = torch.isclose(ours, base / 8, rtol=1e-15, atol=0)
    ramped = ~kept & ~slowed
    assert kept.any() and slowed.any() and ramped.any()
    assert ((ours[ramped] < base[ramped]) & (ours[ramped] > base[ramped] / 8)).all()


# -------------------------------------------------------------------------------------------
# Against HF transformers
# -------------------------------------------------------------------------------------------


def hf_llama_config(transformers, *, head_dim: int, num_attention_heads: int,
                    max_position_embeddings: int, rope_parameters: dict, **kwargs):
    """An HF ``LlamaConfig``: transformers v5 takes ``rope_parameters`` (type, fields and
    ``rope_theta`` in one dict), v4 ``rope_theta`` and ``rope_scaling`` (None for plain RoPE)."""
    common = dict(hidden_size=head_dim * num_attention_heads,
                  num_attention_heads=num_attention_heads,
                  max_position_embeddings=max_position_embeddings, **kwargs)
    params = dict(rope_parameters)
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return transformers.LlamaConfig(**common, rope_parameters=params)
    theta = params.pop("rope_theta")
    scaling = params if params.get("rope_type", "default") != "default" else None
    return transformers.LlamaConfig(**common, rope_theta=theta, rope_scaling=scaling)


HF_CASES = {
    # name -> (max_position_embeddings, rope_parameters)
    "default-10k": (4096, {"rope_type": "default", "rope_theta": 10000.0}),
    "default-500k": (131072, {"rope_type": "default", "rope_theta": 500000.0}),
    "linear-4": (16384, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    # max_position_embeddings > original_max_position_embeddings, or HF complains.
    "llama3": (131072, {**LLAMA3, "rope_theta": 500000.0}),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_matches_hf_llama_rotary_embedding_and_is_more_accurate(name):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    max_pos, rope_parameters = HF_CASES[name]
    head_dim = 128
    config = hf_llama_config(transformers, head_dim=head_dim, num_attention_heads=2,
                             max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    hf = LlamaRotaryEmbedding(config=config)
    positions = torch.cat([torch.arange(300), torch.tensor(
        [4095, 8191, 8192, 16383, 65535, 65536, 100000, 131071])])
    positions = positions[positions < max_pos]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions[None])  # (1, seq, hd)
    assert hf_cos.shape == (1, len(positions), head_dim) and hf_cos.dtype == torch.float32

    # A rope_theta in the dict overrides the theta argument (v5 keeps it in rope_parameters).
    cos, sin = rope_cos_sin(max_pos, head_dim, theta=2.0, scaling=rope_parameters)
    ours_cos = torch.cat((cos[positions], cos[positions]), -1)[None]
    ours_sin = torch.cat((sin[positions], sin[positions]), -1)[None]

    theta = rope_parameters["rope_theta"]
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    angles = angles64(positions, inv_freq64(head_dim, theta, scaling))
    for what, ours, theirs, ref in (("cos", ours_cos, hf_cos, angles.cos()),
                                    ("sin", ours_sin, hf_sin, angles.sin())):
        ref = torch.cat((ref, ref), -1)[None]
        err_ours = (ours.double() - ref).abs().max().item()
        err_hf = (theirs.double() - ref).abs().max().item()
        assert err_ours <= err_hf, f"{what}: ours {err_ours:.3g} worse than HF's {err_hf:.3g}"
        assert_within_ulp(ours, ref, what)
        # Agreement with HF up to HF's own fp32 evaluation error.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=err_hf + 1e-7)

    # HF's float32 inv_freq is ours rounded, up to the few roundings of its fp32 evaluation
    # (exponents 2i/128 are exact in binary; the llama3 ramp adds a few more steps).
    ours32 = _inv_freq(head_dim, theta, scaling).float()
    ulps = ((hf.inv_freq - ours32).abs().double() / fp32_ulp(ours32)).max().item()
    assert ulps <= 4, f"inv_freq: HF's differs by {ulps} fp32 ulps"


# -------------------------------------------------------------------------------------------
# Scaling dict conventions
# -------------------------------------------------------------------------------------------


def test_legacy_type_key_is_rope_type():
    legacy = rope_cos_sin(64, 16, scaling={"type": "linear", "factor": 4.0})
    modern = rope_cos_sin(64, 16, scaling={"rope_type": "linear", "factor": 4.0})
    plain = rope_cos_sin(64, 16)
    assert torch.equal(legacy[0], modern[0]) and torch.equal(legacy[1], modern[1])
    assert not torch.equal(legacy[0], plain[0])


def test_legacy_llama3_type_key():
    legacy = {"type" if k == "rope_type" else k: v for k, v in LLAMA3.items()}
    assert torch.equal(rope_cos_sin(64, 128, theta=5e5, scaling=legacy)[1],
                       rope_cos_sin(64, 128, theta=5e5, scaling=LLAMA3)[1])


def test_rope_theta_in_scaling_overrides_theta():
    inside = rope_cos_sin(64, 16, theta=10000.0,
                          scaling={"rope_type": "default", "rope_theta": 500000.0})
    outside = rope_cos_sin(64, 16, theta=500000.0)
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])
    assert not torch.equal(inside[0], rope_cos_sin(64, 16, theta=10000.0)[0])


def test_partial_rotary_factor_is_ignored():
    """rotary_dim already says how many dims rotate: the factor must not shrink it again."""
    cos, sin = rope_cos_sin(32, 16, scaling={"rope_type": "default",
                                             "partial_rotary_factor": 0.5})
    assert cos.shape == sin.shape == (32, 8)
    assert torch.equal(cos, rope_cos_sin(32, 16)[0])


# -------------------------------------------------------------------------------------------
# Shapes, dtype, device
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen, rotary_dim", [(0, 2), (1, 2), (7, 6), (17, 128)])
def test_shapes_and_dtype(seqlen, rotary_dim):
    cos, sin = rope_cos_sin(seqlen, rotary_dim)
    for table in (cos, sin):
        assert table.shape == (seqlen, rotary_dim // 2)
        assert table.dtype == torch.float32
    if seqlen:
        assert torch.equal(cos[0], torch.ones(rotary_dim // 2))
        assert torch.equal(sin[0], torch.zeros(rotary_dim // 2))


def test_fp32_even_with_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cos, sin = rope_cos_sin(5, 8)
    finally:
        torch.set_default_dtype(previous)
    assert cos.dtype == sin.dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_device_is_honoured(device):
    cos, sin = rope_cos_sin(9, 8, scaling=LLAMA3, theta=5e5, device=device)
    assert cos.device == sin.device == torch.device(device)
    assert cos.shape == (9, 4) and cos.dtype == torch.float32


@pytest.mark.gpu
def test_gpu_table_equals_cpu_table():
    cos, sin = rope_cos_sin(4099, 128, theta=5e5, scaling=LLAMA3, device="cuda")
    assert cos.is_cuda
    ref_cos, ref_sin = rope_cos_sin(4099, 128, theta=5e5, scaling=LLAMA3)
    # Both in float64 rounded once; libm and CUDA may differ by a float64 ulp, which the
    # rounding to fp32 turns into at most one fp32 ulp.
    assert_within_ulp(cos.cpu(), ref_cos.double(), "cos")
    assert_within_ulp(sin.cpu(), ref_sin.double(), "sin")


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------


def _bad_inputs():
    missing = {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}
    return [
        ("scaling", ValueError, dict(scaling={"rope_type": "yarn", "factor": 2.0})),
        ("scaling", ValueError, dict(scaling={"type": "dynamic", "factor": 2.0})),
        ("scaling", ValueError, dict(scaling=missing)),
        ("scaling", ValueError, dict(scaling={"rope_type": "linear"})),
        ("scaling", ValueError, dict(scaling={"rope_type": "linear", "factor": 2.0, "foo": 1})),
        ("scaling", ValueError, dict(scaling={"rope_type": "default", "factor": 2.0})),
        ("scaling", ValueError, dict(scaling={"rope_type": "linear", "factor": 0.0})),
        ("scaling", ValueError, dict(scaling={"rope_type": "linear", "factor": math.nan})),
        ("scaling", ValueError, dict(scaling={"rope_type": "linear", "factor": "2"})),
        ("scaling", ValueError, dict(scaling={**LLAMA3, "low_freq_factor": 4.0})),
        ("scaling", TypeError, dict(scaling=[("rope_type", "linear"), ("factor", 2.0)])),
        ("scaling", TypeError, dict(scaling="linear")),
        ("theta", ValueError, dict(theta=1.0)),
        ("theta", ValueError, dict(theta=0.5)),
        ("theta", ValueError, dict(theta=-10000.0)),
        ("theta", ValueError, dict(theta=math.nan)),
        ("theta", ValueError, dict(theta=math.inf)),
        ("theta", ValueError, dict(scaling={"rope_type": "default", "rope_theta": math.nan})),
        ("theta", TypeError, dict(theta="10000")),
        ("rotary_dim", ValueError, dict(rotary_dim=7)),
        ("rotary_dim", ValueError, dict(rotary_dim=0)),
        ("rotary_dim", ValueError, dict(rotary_dim=-2)),
        ("rotary_dim", TypeError, dict(rotary_dim=8.0)),
        ("rotary_dim", TypeError, dict(rotary_dim=True)),
        ("seqlen", ValueError, dict(seqlen=-1)),
    ]


@pytest.mark.parametrize("arg, exc, kwargs", _bad_inputs(),
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_bad_inputs())])
def test_bad_input_names_the_argument(arg, exc, kwargs):
    kwargs = {"seqlen": 8, "rotary_dim": 8, **kwargs}
    with pytest.raises(exc, match=rf"^{arg}\b"):
        rope_cos_sin(kwargs.pop("seqlen"), kwargs.pop("rotary_dim"), **kwargs)


@pytest.mark.parametrize("seqlen", [8.0, "8", None, True])
def test_non_int_seqlen_names_seqlen(seqlen):
    with pytest.raises(TypeError, match=r"^seqlen\b"):
        rope_cos_sin(seqlen, 8)


def test_device_argument_wins_over_the_default_device():
    with torch.device("meta"):
        cos, sin = rope_cos_sin(4, 8, device="cpu")
    assert cos.device.type == sin.device.type == "cpu"
    assert torch.equal(cos, rope_cos_sin(4, 8)[0])
