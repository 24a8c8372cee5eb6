"""Ahead-of-time compilation of every kernel configuration for sm_90, sm_80, gfx90a, gfx942.

No GPU is needed: Triton compiles for a named target. On CPU machines tests/conftest.py has
set TRITON_INTERPRET=1, so the kernels imported here are interpreted; the compile engine then
compiles in worker processes started without it (see its docstring). The cases are the
launchers' own plans over TensorSpecs (eurocore.kernels.aot); here: they all compile, they
hold every launch configuration, flag and dtype, and the ops' real launches at production
shapes are among them.
"""

import functools
import itertools
import os

import pytest
import torch

from eurocore.kernels import aot
from eurocore.kernels import compile_engine as engine
from eurocore.kernels import flash_attention as attention_kernels
from eurocore.kernels import rms_norm as rms_norm_kernels
from eurocore.kernels import rotary as rotary_kernels
from eurocore.kernels import swiglu as swiglu_kernels
from eurocore.kernels.launch import Launch
from eurocore.kernels.limits import ATTENTION_MAX_HEAD_DIM
from eurocore.ops import apply_rotary, flash_attention, flash_attention_varlen, rms_norm, swiglu

JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
DTYPES = ("fp32", "fp16", "bf16")
RMS_FWD, RMS_BWD = "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel")
# The launch_config entry of each attention kernel (δ runs under dq's).
ATTENTION_CONFIG_OF = dict(zip(ATTENTION_KERNELS, ("forward", "dq", "dkdv", "dq"), strict=True))
SWIGLU_KERNELS = ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(engine.TARGETS))
def test_every_case_compiles(target, need_backend):
    need_backend(target)
    cases = aot.cases()
    results = engine.compile_all(cases, [engine.TARGETS[target]], jobs=JOBS)
    failures = [str(r) for r in results if isinstance(r, engine.AotFailure)]
    assert not failures, f"{len(failures)} of {len(results)} failed:\n" + "\n".join(failures)
    # cases of a vendor-specific configuration (attention) compile for that vendor only
    assert len(results) == sum(c.applies_to(engine.TARGETS[target]) for c in cases)
    assert {r.target for r in results} == {target}
    assert all(r.shared <= engine.MAX_SHARED[target] for r in results)


# ---------------------------------------------------------------------------------------------
# The ops' launches at production shapes are compiled
# ---------------------------------------------------------------------------------------------


def _key(case):
    """What makes a binary: all but the label."""
    return (case.kernel, engine.config_key(case.signature), engine.config_key(case.constexprs),
            case.divisible, case.num_warps, case.num_stages, engine.config_key(case.options))


@functools.cache
def _compiled(vendor):
    """The binaries compiled for ``vendor``'s targets (None: those for every target)."""
    return {_key(c) for c in aot.cases() if not c.vendors or vendor in c.vendors}


def _leaf(*shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype, requires_grad=True)


def _rms_norm(dtype=torch.bfloat16, residual=torch.bfloat16, weight=torch.bfloat16,
              zero_centered_weight=False):
    """rms_norm on 8192 tokens of Llama-3-8B's hidden size; residual and weight: their dtypes,
    or None for none."""
    x = _leaf(8192, 4096, dtype=dtype)
    r = _leaf(8192, 4096, dtype=residual) if residual else None
    out = rms_norm(x, _leaf(4096, dtype=weight) if weight else None, residual=r,
                   zero_centered_weight=zero_centered_weight, backend="triton")
    return (out if residual else (out,)), (x, r) if residual else (x,)


def _swiglu(fused=True, dtype=torch.bfloat16):
    if fused:  # the two halves of one gate/up projection
        gate_up = _leaf(4096, 2 * 14336, dtype=dtype)
        return (swiglu(*gate_up.chunk(2, -1), backend="triton"),), (gate_up,)
    gate, up = _leaf(4096, 14336, dtype=dtype), _leaf(4096, 14336, dtype=dtype)
    return (swiglu(gate, up, backend="triton"),), (gate, up)


def _rotary(layout="bshd", batch=1, seq=4096, heads=(32, 8), dtype=torch.bfloat16,
            rotary_dim=128, inplace=False, interleaved=False, **positions):
    """apply_rotary on Llama-3-8B's q and k; ``positions`` gives position_ids, cu_seqlens or
    seqlen_offsets: an int, or (dtype, values) to build a tensor of."""
    tokens = {"bshd": (batch, seq), "sbhd": (seq, batch), "thd": (batch * seq,)}[layout]
    leaves = [_leaf(*tokens, n, 128, dtype=dtype) for n in heads if n]
    q, k = [t.clone() if inplace else t for t in leaves] + [None] * (2 - len(leaves))
    kwargs = {name: value if isinstance(value, int) else torch.tensor(value[1], dtype=value[0])
              for name, value in positions.items()}
    table = torch.zeros(8192, rotary_dim // 2)
    out = apply_rotary(q, k, table, table, layout=layout, inplace=inplace,
                       interleaved=interleaved, backend="triton", **kwargs)
    return [t for t in out if t is not None], leaves


def _attention(heads=(32, 32), head_dim=128, dtype=torch.bfloat16, packed=None, **options):
    """flash_attention on two sequences of 4096, or with ``packed`` (cu_seqlens' dtype)
    flash_attention_varlen on 8 packed sequences of 2048."""
    shape = (16384,) if packed else (2, 4096)
    q, k, v = (_leaf(*shape, n, head_dim, dtype=dtype) for n in (heads[0], heads[1], heads[1]))
    if packed:
        cu = torch.arange(0, 16385, 2048, dtype=packed)
        out = flash_attention_varlen(q, k, v, cu, cu, 2048, 2048, backend="triton", **options)
    else:
        out = flash_attention(q, k, v, backend="triton", **options)
    return (out,), (q, k, v)


_I32, _I64 = torch.int32, torch.int64
_FP16, _FP32 = torch.float16, torch.float32
_CU = list(range(0, 16385, 2048))  # 8 packed sequences of 2048
_PRODUCTION = {  # name: (the vendor whose launches, or None for any; the call)
    **{f"rms_norm {name}": (None, functools.partial(_rms_norm, **options))
       for name, options in (
        ("pre-norm", {}),
        ("no residual", dict(residual=None)),
        ("fp32 residual", dict(residual=_FP32, weight=_FP32)),
        ("no weight", dict(residual=None, weight=None)),
        ("zero-centred", dict(zero_centered_weight=True)),
        ("fp32", dict(dtype=_FP32, residual=_FP32, weight=_FP32)))},
    "swiglu fused gate/up": (None, _swiglu),
    "swiglu fp16": (None, functools.partial(_swiglu, fused=False, dtype=_FP16)),
    **{f"rotary {name}": (None, functools.partial(_rotary, **options)) for name, options in (
        ("llama", {}), ("in place", dict(inplace=True)), ("sbhd", dict(layout="sbhd")),
        ("sbhd position ids", dict(layout="sbhd", batch=2,
                                   position_ids=(_I64, [list(range(4096))] * 2))),
        ("packed", dict(layout="thd", seq=16384, cu_seqlens=(_I32, _CU))),
        ("packed int64 offsets", dict(layout="thd", seq=16384, cu_seqlens=(_I64, _CU),
                                      seqlen_offsets=(_I32, [3] * 8))),
        ("position ids", dict(batch=2, position_ids=(_I64, [list(range(4096))] * 2))),
        ("shared position ids", dict(batch=2, position_ids=(_I32, [list(range(4096))]))),
        ("kv cache offset", dict(seqlen_offsets=17)),
        ("partial in place", dict(rotary_dim=64, inplace=True)),
        ("q only", dict(heads=(32, 0))), ("fp32", dict(dtype=_FP32)),
        ("interleaved fp16", dict(dtype=_FP16, interleaved=True)),
        ("decode", dict(batch=8, seq=1, seqlen_offsets=(_I32, list(range(8))))))},
    **{f"attention {vendor} {name}": (vendor, functools.partial(_attention, **options))
       for vendor in aot.ATTENTION_VENDORS for name, options in (
        ("mha", {}), ("gqa", dict(heads=(32, 8))), ("causal", dict(causal=True)),
        ("causal gqa", dict(causal=True, heads=(32, 8))), ("softcap", dict(softcap=50.0)),
        ("fp16", dict(dtype=_FP16)), ("hd 64", dict(head_dim=64)),
        ("hd 80", dict(head_dim=80)), ("hd 96", dict(head_dim=96)),
        ("hd 256", dict(head_dim=256)), ("packed", dict(packed=_I32)),
        ("packed causal gqa", dict(packed=_I32, causal=True, heads=(32, 8))),
        ("packed int64", dict(packed=_I64)),
        ("sliding window 4096", dict(causal=True, window_size=(4096, 0))),
        ("sliding window 4095", dict(causal=True, window_size=(4095, 0))),
        ("fp32", dict(dtype=_FP32, head_dim=64)))},
}


@pytest.mark.parametrize("name", list(_PRODUCTION))
def test_production_launches_are_aot_cases(monkeypatch, name):
    """The ops at Llama-3-8B's sizes, forward and backward, launch on each vendor only
    binaries the AOT set compiles for it (Launch.run records instead of launching: nothing
    runs). The cases use the launchers' own plans; this checks that the op-level shapes,
    layouts and positions they list are the ones the ops hand the launchers."""
    vendor, call = _PRODUCTION[name]
    compiled = _compiled(vendor)
    launches = []
    monkeypatch.setattr(Launch, "run", lambda launch: launches.append(launch))
    if vendor:
        monkeypatch.setattr(attention_kernels, "vendor", lambda _device: vendor)
    outputs, inputs = call()
    torch.autograd.grad(outputs, inputs, [torch.zeros_like(t) for t in outputs])
    assert len(launches) >= 2
    for launch in launches:
        case = engine.aot_case(launch)
        if _key(case) not in compiled:
            pytest.fail(f"{name}: {case} is not compiled: {case.signature} {case.constexprs} "
                        f"divisible {case.divisible}")


# ---------------------------------------------------------------------------------------------
# Every launch configuration, flag and dtype
# ---------------------------------------------------------------------------------------------


def _divisibility(case, n="n_cols"):
    if case.constexprs.get(n) == 1:
        return "n=1"
    return "aligned" if n in case.divisible else "unaligned"


def _covers_every_config(family, kernels, launch_config, max_n, tiles):
    """Every (launch configuration, divisibility of n) of launch_config(n), n = 1..max_n, is
    a case of each kernel: a configuration added without an AOT case fails here."""
    wanted = {(config_key, "n=1" if n == 1 else "aligned" if n % 16 == 0 else "unaligned")
              for n in range(1, max_n + 1)
              for config_key in [engine.config_key(launch_config(n))]}
    assert {cfg for cfg, _ in wanted} == set(engine.distinct_launch_configs(launch_config,
                                                                            max_n))
    covered = {(c.kernel, engine.config_key({**{t: c.constexprs[t] for t in tiles},
                                             "num_warps": c.num_warps}), _divisibility(c))
               for c in aot.cases(family)}
    missing = sorted({(k, *w) for k in kernels for w in wanted} - covered, key=str)
    assert not missing, f"launch configurations without an AOT case: {missing}"


def test_rms_norm_cases_cover_every_launch_config():
    _covers_every_config("rms_norm", (RMS_FWD, RMS_BWD), rms_norm_kernels.launch_config,
                         aot.RMS_NORM_SWEEP_N, ("BLOCK_N", "ONE_BLOCK"))


def test_rms_norm_cases_cover_every_flag_combination():
    cases = aot.cases("rms_norm")

    def has(kernel, x, **flags):
        return any(c.kernel == kernel and c.signature["X" if kernel == RMS_FWD else "DX"]
                   == f"*{x}" and all(c.constexprs[k] == v for k, v in flags.items())
                   for c in cases)

    for x, residual, (weight, zc) in itertools.product(
            DTYPES, (False, True), ((False, False), (True, False), (True, True))):
        assert has(RMS_FWD, x, HAS_RESIDUAL=residual, HAS_WEIGHT=weight, ZERO_CENTERED=zc,
                   BLOCK_N=4096, ONE_BLOCK=True)
        assert has(RMS_BWD, x, HAS_DH_IN=residual, HAS_DR=False, HAS_WEIGHT=weight,
                   ZERO_CENTERED=zc, BLOCK_N=4096, ONE_BLOCK=True)
    # (which combinations the op hands the launchers: test_production_launches_are_aot_cases)
    assert has(RMS_BWD, "bf16", HAS_DR=True, ONE_BLOCK=True)
    assert has(RMS_BWD, "bf16", HAS_DR=True, ONE_BLOCK=False)
    # mixed dtypes: a weight of another dtype, a residual of another dtype (h promoted)
    assert any(c.kernel == RMS_FWD and c.signature["W"] != c.signature["X"]
               and c.constexprs["HAS_WEIGHT"] for c in cases)
    assert any(c.kernel == RMS_FWD and c.constexprs["HAS_RESIDUAL"]
               and c.signature["R"] != c.signature["X"] and c.signature["H"] == "*fp32"
               for c in cases)


def test_rotary_cases_cover_every_launch_config():
    """Every block configuration of the real models' head dims (full rotary, and partial out
    of place and in place), every BLOCK_HALF the op accepts and every BLOCK_TAIL."""
    def key(half, tail):
        cfg = rotary_kernels.launch_config(half, tail)
        return cfg["BLOCK_T"], cfg["BLOCK_HALF"], cfg["BLOCK_TAIL"], cfg["num_warps"]

    covered = {(*(c.constexprs[t] for t in ("BLOCK_T", "BLOCK_HALF", "BLOCK_TAIL")),
                c.num_warps) for c in aot.cases("rotary")}
    wanted = {key(hd // 2, 0) for hd in aot.ROTARY_HEAD_DIMS}
    for head_dim, rotary_dim in aot.ROTARY_PARTIAL:
        wanted |= {key(rotary_dim // 2, head_dim - rotary_dim), key(rotary_dim // 2, 0)}
    wanted |= {key(half, 0) for half in range(1, aot.ROTARY_MAX_HALF + 1)}
    wanted |= {key(1, tail) for tail in range(1, 2 * aot.ROTARY_MAX_HALF - 1)}
    missing = wanted - covered
    assert not missing, f"launch configurations without an AOT case: {sorted(missing)}"


def test_rotary_cases_vary_every_flag_and_specialisation():
    cases = aot.cases("rotary")
    assert 40 <= len(cases) < 200

    def has(dtype="bf16", **flags):
        return any(c.signature["Q"] == f"*{dtype}"
                   and all(c.constexprs.get(k) == v for k, v in flags.items()) for c in cases)

    for flag in ("HAS_POSITIONS", "INTERLEAVED", "CONJUGATE", "COPY_TAIL"):
        assert has(**{flag: False}) and has(**{flag: True}), flag
    # dtype x style x head dim with the common flags, and the backward of each style
    for dtype, interleaved, head_dim in itertools.product(DTYPES, (False, True),
                                                          aot.ROTARY_HEAD_DIMS):
        block = rotary_kernels.launch_config(head_dim // 2, 0)["BLOCK_HALF"]
        common = dict(HAS_POSITIONS=False, stride_pos_inner=1, COPY_TAIL=False,
                      INTERLEAVED=interleaved, BLOCK_HALF=block)
        assert has(dtype, CONJUGATE=False, **common)
        assert has("bf16", CONJUGATE=True, **common)
    # positions: none (the sequence index: inner, or outer in sbhd), rows read along inner
    # (bshd, thd), or transposed (sbhd: along outer)
    assert has(HAS_POSITIONS=True, stride_pos_inner=1)
    assert has(HAS_POSITIONS=True, stride_pos_outer=1)
    assert has(HAS_POSITIONS=False, stride_pos_outer=1, n_inner=1)  # sbhd, batch 1
    assert has(HAS_POSITIONS=False, stride_pos_outer=1, n_inner=1, CONJUGATE=True)
    assert {c.signature["COS"] for c in cases} >= {"*fp32", "*bf16", "*fp16"}
    # a head_dim not divisible by 16, q not 16-byte aligned, strides past 2^31
    assert any(c.signature["stride_q_head"] == "i32" and "stride_q_head" not in c.divisible
               for c in cases)
    assert any("Q" not in c.divisible for c in cases)
    assert any(c.signature["stride_q_outer"] == "i64" for c in cases)
    for c in cases:  # only what the launcher can make: positions are int64 when read
        assert c.constexprs["HAS_POSITIONS"] == (c.signature["POSITIONS"] == "*i64"), c


def test_attention_cases_cover_every_launch_config():
    """Every configuration launch_config gives any head_dim the op accepts (multiples of 8 up
    to 256), for each kernel on each vendor, is a case in bf16 for that vendor only, and
    head_dim 128's in fp16 too."""
    cases = aot.cases("attention")
    for vendor, kernel in itertools.product(aot.ATTENTION_VENDORS, ATTENTION_KERNELS):
        for head_dim in range(8, ATTENTION_MAX_HEAD_DIM + 1, 8):
            cfg = attention_kernels.launch_config(head_dim, vendor, ATTENTION_CONFIG_OF[kernel])
            tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")
                     if kernel != "_attn_bwd_delta_kernel" or k != "BLOCK_N"}
            launch = {k: v for k, v in cfg.items() if k not in tiles and k != "BLOCK_N"}
            pointer = "OUT" if kernel == "_attn_bwd_delta_kernel" else "Q"
            for dtype in ("bf16", "fp16")[:1 + (head_dim in aot.ATTENTION_FP16_HEAD_DIMS)]:
                assert any(c.kernel == kernel and c.vendors == (vendor,)
                           and {k: c.constexprs[k] for k in tiles} == tiles
                           and {"num_warps": c.num_warps, "num_stages": c.num_stages,
                                **c.options} == launch
                           and c.signature[pointer] == f"*{dtype}" for c in cases), \
                    (vendor, kernel, dtype, head_dim, cfg)


def test_attention_cases_vary_every_flag_and_specialisation():
    cases = aot.cases("attention")
    assert 60 <= len(cases) <= 140, len(cases)  # CI compiles each for two targets
    assert {c.kernel for c in cases} == set(ATTENTION_KERNELS)
    for vendor in aot.ATTENTION_VENDORS:
        mine = [c for c in cases if c.vendors == (vendor,)]
        if vendor == "amd":  # AMD's tuning: waves_per_eu and one stage, on AMD only
            waves = attention_kernels.AMD_WAVES_PER_EU
            assert all(c.options == {"waves_per_eu": waves[ATTENTION_CONFIG_OF[c.kernel]]}
                       and c.num_stages == 1 for c in mine)
        else:
            assert all(c.options == {} for c in mine) and any(c.num_stages > 1 for c in mine)
        for kernel in ATTENTION_KERNELS[0], *ATTENTION_KERNELS[2:]:
            of_kernel = [c for c in mine if c.kernel == kernel]

            def has(of_kernel=of_kernel, dtype="bf16", **flags):
                return any(c.signature["Q"] == f"*{dtype}"
                           and all(c.constexprs.get(k) == v for k, v in flags.items())
                           for c in of_kernel)

            for flag in ("VARLEN", "HAS_WINDOW", "SOFTCAP"):
                assert has(**{flag: True}) and has(**{flag: False}), (vendor, kernel, flag)
            assert has(group=1)  # MHA: the constexpr 1
            assert any(c.signature["group"] == "i32" for c in of_kernel)  # GQA
            assert has(dtype="bf16") and has(dtype="fp16")
            assert has(dtype="fp32", PRECISION="ieee")
            assert any("head_dim" not in c.divisible for c in of_kernel)  # head_dim 72
            # lengths (and so the lse strides the kernels derive) not multiples of 16
            assert any(not c.constexprs["VARLEN"] and "fixed_seqlen_q" not in c.divisible
                       for c in of_kernel)
            assert any("fixed_seqlen_k" not in c.divisible for c in of_kernel)
        fwd = [c for c in mine if c.kernel == "_attn_fwd_kernel" and c.constexprs["VARLEN"]]
        assert {c.signature["CU_Q"] for c in fwd} == {"*i32", "*i64"}
    for c in cases:  # fresh (aligned) tensors; packed: index cu_seqlens and batch strides 0,
        # else q (or out) in their place
        assert all(a in c.divisible for a, t in c.signature.items() if t.startswith("*")), c
        if c.constexprs["VARLEN"]:
            batch_stride = "stride_ob" if c.kernel == "_attn_bwd_delta_kernel" else "stride_qb"
            assert c.signature["CU_Q"] in ("*i32", "*i64") and batch_stride in c.divisible, c
        else:
            assert c.signature["CU_Q"] == c.signature["Q" if "Q" in c.signature else "OUT"], c


def test_swiglu_cases_cover_every_launch_config():
    _covers_every_config("swiglu", SWIGLU_KERNELS, swiglu_kernels.launch_config,
                         aot.SWIGLU_SWEEP_N, ("BLOCK_N",))
    # past the largest block, a longer row only adds programs
    assert swiglu_kernels.launch_config(aot.SWIGLU_SWEEP_N) == swiglu_kernels.launch_config(
        10 * aot.SWIGLU_SWEEP_N)


def test_swiglu_cases_vary_every_dtype_and_specialisation():
    cases = aot.cases("swiglu")
    assert 20 <= len(cases) <= 80, len(cases)  # CI compiles each for four targets
    assert {c.kernel for c in cases} == set(SWIGLU_KERNELS)
    assert all(c.vendors == () and c.options == {} for c in cases)
    for kernel in SWIGLU_KERNELS:
        mine = [c for c in cases if c.kernel == kernel]
        assert {c.signature["G"] for c in mine} == {"*bf16", "*fp16", "*fp32"}
        assert any("U" not in c.divisible for c in mine)  # the upper half of an odd fused row
        assert any("G" not in c.divisible for c in mine)  # a misaligned gate
    assert any(c.kernel == "_swiglu_bwd_kernel" and "expanded" in c.label
               and c.signature["stride_dy"] == "i32" and "stride_dy" in c.divisible
               and "n_cols" not in c.divisible for c in cases)


# ---------------------------------------------------------------------------------------------
# Loads stay 16 bytes wide
# ---------------------------------------------------------------------------------------------


def _aligned_bf16(case, pointer):
    return (case.signature[pointer] == "*bf16" and "n_cols" in case.divisible
            and all(a in case.divisible for a, t in case.signature.items() if t[0] == "*"))


_WIDE_LOADS = {  # name: (the cases, the targets whose every load must be 16 bytes wide)
    "rms_norm forward n=4096": (lambda: [
        c for c in aot.cases("rms_norm") if c.kernel == RMS_FWD and _aligned_bf16(c, "X")
        and c.constexprs["BLOCK_N"] == 4096 and c.constexprs["HAS_RESIDUAL"]
        and c.constexprs["HAS_WEIGHT"] and not c.constexprs["ZERO_CENTERED"]
        and c.signature["W"] == "*bf16"], ()),
    # two warps: 8 bf16 per lane of a 64-wide wavefront; the fp32 tables load as dwordx4 too
    "rotary llama": (lambda: [c for c in aot.cases("rotary")
                              if c.label == "hd=128 bf16 bshd b=1 s=4096 h=32/8"],
                     tuple(engine.TARGETS)),
    **{f"swiglu {kernel}": (lambda kernel=kernel: [
        c for c in aot.cases("swiglu") if c.kernel == kernel and _aligned_bf16(c, "G")
        and c.constexprs["BLOCK_N"] == swiglu_kernels.MAX_BLOCK_N and "fused" not in c.label],
        ()) for kernel in SWIGLU_KERNELS},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_WIDE_LOADS))
def test_bf16_loads_16_bytes_at_a_time(name, need_backend):
    """Aligned bf16 cases load with 16-byte vectors, without spills: ld.global.v4 on NVIDIA,
    dwordx4 on AMD (on sm_90 and gfx942, or every target where the case says so, each of
    its loads); a narrower load means the alignment hints were lost."""
    select, every_load_on = _WIDE_LOADS[name]
    (case,) = select()
    targets = every_load_on or ("sm_90", "gfx942")
    need_backend(*targets)
    reports = engine.compile_all([case], [engine.TARGETS[t] for t in targets])
    for target, report in zip(targets, reports, strict=True):
        assert isinstance(report, engine.AotReport), str(report)
        assert report.widest_load == 16 and report.spills == 0, (target, report)
        wide = [load.startswith("ld.global.v4") or load.endswith("_load_dwordx4")
                for load in report.loads]
        assert (all(wide) if target in every_load_on else any(wide)), (target, report.loads)
