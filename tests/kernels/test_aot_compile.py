"""Ahead-of-time compilation of every kernel configuration for sm_90, sm_80, gfx90a, gfx942.

No GPU is needed: Triton compiles for a named target. On CPU machines tests/conftest.py has
set TRITON_INTERPRET=1, so the kernels imported here are interpreted; eurocore.kernels.aot
then compiles in worker processes started without it (see its docstring).
"""

import dataclasses
import itertools
import math
import os

import pytest
import torch

from eurocore.kernels import aot
from eurocore.kernels import rms_norm as rms_norm_kernels
from eurocore.kernels import rotary as rotary_kernels
from eurocore.ops import apply_rotary
from eurocore.ops import rotary as rotary_ops

JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
FWD, BWD = "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"
DTYPES = ("fp32", "fp16", "bf16")


def _need_backend(target):
    if not aot.has_backend(aot.TARGETS[target]):  # e.g. pytorch-triton-rocm: AMD only
        pytest.skip(f"this Triton build has no backend for {target}")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_every_case_compiles(target):
    _need_backend(target)
    cases = aot.cases()
    results = aot.compile_all(cases, [aot.TARGETS[target]], jobs=JOBS)
    failures = [str(r) for r in results if isinstance(r, aot.AotFailure)]
    assert not failures, f"{len(failures)} of {len(results)} failed:\n" + "\n".join(failures)
    assert len(results) == len(cases)
    assert all(r.shared <= aot.MAX_SHARED[target] for r in results)


@pytest.mark.slow
def test_bf16_forward_loads_16_bytes_at_a_time():
    """The aligned bf16 forward at n=4096 must use 16-byte vector loads: ld.global.v4 on
    sm_90, dwordx4 on gfx942; a narrower load means the alignment hints were lost."""
    (case,) = [c for c in aot.cases("rms_norm") if c.kernel == FWD
               and c.signature["X"] == "*bf16" and c.constexprs["BLOCK_N"] == 4096
               and c.constexprs["HAS_RESIDUAL"] and c.constexprs["HAS_WEIGHT"]
               and not c.constexprs["ZERO_CENTERED"] and "n_cols" in c.divisible
               and "X" in c.divisible and c.signature["W"] == "*bf16"]
    _need_backend("sm_90")
    _need_backend("gfx942")
    sm_90, gfx942 = aot.compile_all([case], [aot.TARGETS["sm_90"], aot.TARGETS["gfx942"]])
    assert isinstance(sm_90, aot.AotReport), str(sm_90)
    assert any(load.startswith("ld.global.v4") for load in sm_90.loads), sm_90.loads
    assert sm_90.widest_load == 16
    assert isinstance(gfx942, aot.AotReport), str(gfx942)
    assert any(load.endswith("_load_dwordx4") for load in gfx942.loads), gfx942.loads


def test_launch_over_1024_threads_is_rejected():
    case = next(c for c in aot.cases("rms_norm") if c.num_warps == 16)
    bad = dataclasses.replace(case, num_warps=32)
    with pytest.raises(aot.LaunchSizeError,
                       match=r"_rms_norm_\w+_kernel.*num_warps=32 launches 32 x 64 = 2048 "
                             r"threads per program on gfx942.*limit of 1024"):
        aot.compile_case(bad, aot.TARGETS["gfx942"])
    aot.check_launch(bad, aot.TARGETS["sm_90"])  # 32 x 32 = 1024: allowed on NVIDIA
    with pytest.raises(aot.LaunchSizeError, match="gfx90a"):
        aot.check_launch(bad, aot.TARGETS["gfx90a"])


def _variant(case):
    if "n_cols" in case.divisible:
        return "aligned"
    return "n=1" if case.constexprs.get("n_cols") == 1 else "unaligned"


def test_rms_norm_cases_cover_every_launch_config():
    """A configuration added to launch_config without an AOT case fails here."""
    sweep = {aot.config_key(rms_norm_kernels.launch_config(n)) for n in range(1, 131073)}
    assert set(aot.distinct_launch_configs(rms_norm_kernels.launch_config, 131072)) == sweep
    covered = {(c.kernel, aot.config_key({"BLOCK_N": c.constexprs["BLOCK_N"],
                                          "ONE_BLOCK": c.constexprs["ONE_BLOCK"],
                                          "num_warps": c.num_warps}), _variant(c))
               for c in aot.cases("rms_norm")}
    missing = [(kernel, dict(cfg), variant)
               for kernel, cfg, variant in itertools.product((FWD, BWD), sweep,
                                                             ("aligned", "unaligned"))
               if (kernel, cfg, variant) not in covered]
    assert not missing, f"launch configurations without an AOT case: {missing}"


def test_rms_norm_divisibility_variants_are_the_jits():
    """Aligned cases: every pointer, row stride and n_cols divisible by 16; unaligned ones:
    n_cols and the strides that equal it not, pointers of fresh tensors still aligned."""
    for case in aot.cases("rms_norm"):
        pointers = [a for a, t in case.signature.items() if t.startswith("*")]
        strides = [a for a in case.signature if a.startswith("stride_")
                   and case.signature[a] == "i32"]
        if _variant(case) == "aligned":
            assert set(strides) <= set(case.divisible), case
            if "misaligned" not in case.label:
                assert set(pointers) <= set(case.divisible), case
        elif _variant(case) == "unaligned":
            assert case.signature["n_cols"] == "i32"
            assert any(s not in case.divisible for s in strides), case


def test_rms_norm_cases_cover_every_flag_combination():
    cases = aot.cases("rms_norm")

    def has(kernel, x, **flags):
        return any(c.kernel == kernel and c.signature["X" if kernel == FWD else "DX"] == f"*{x}"
                   and all(c.constexprs[k] == v for k, v in flags.items()) for c in cases)

    for x, one_block in itertools.product(DTYPES, (True,)):
        for residual, (weight, zc) in itertools.product(
                (False, True), ((False, False), (True, False), (True, True))):
            assert has(FWD, x, HAS_RESIDUAL=residual, HAS_WEIGHT=weight, ZERO_CENTERED=zc,
                       BLOCK_N=4096, ONE_BLOCK=one_block)
            assert has(BWD, x, HAS_DH_IN=residual, HAS_DR=False, HAS_WEIGHT=weight,
                       ZERO_CENTERED=zc, BLOCK_N=4096, ONE_BLOCK=one_block)
    for case in cases:  # only combinations the launchers can make
        flags = case.constexprs
        assert flags["HAS_WEIGHT"] or not flags["ZERO_CENTERED"], case
        if case.kernel == BWD:
            assert flags["HAS_DH_IN"] or not flags["HAS_DR"], case
            # dr exists exactly when the residual's dtype differs from x's (dx's)
            assert flags["HAS_DR"] == (flags["HAS_DH_IN"]
                                       and case.signature["DR"] != case.signature["DX"]), case
    assert has(BWD, "bf16", HAS_DR=True, ONE_BLOCK=True)
    assert has(BWD, "bf16", HAS_DR=True, ONE_BLOCK=False)
    # mixed dtypes: a weight of another dtype, a residual of another dtype (h promoted)
    assert any(c.kernel == FWD and c.signature["W"] != c.signature["X"]
               and c.constexprs["HAS_WEIGHT"] for c in cases)
    assert any(c.kernel == FWD and c.constexprs["HAS_RESIDUAL"]
               and c.signature["R"] != c.signature["X"] and c.signature["H"] == "*fp32"
               for c in cases)


def test_specialise_mirrors_the_jit():
    sig, const, div = aot.specialise(
        ["X", "Y", "a", "b", "c", "d", "eps", "F"],
        {"X": aot.Ptr("bf16"), "Y": aot.Ptr("fp32", aligned=False), "a": 4096, "b": 4097,
         "c": 0, "d": 1, "eps": 1e-6}, {"F": True})
    assert sig == {"X": "*bf16", "Y": "*fp32", "a": "i32", "b": "i32", "c": "i32",
                   "d": "constexpr", "eps": "fp32", "F": "constexpr"}
    assert const == {"d": 1, "F": True}
    assert div == ("X", "a", "c")
    with pytest.raises(ValueError, match="missing"):
        aot.specialise(["X", "n"], {"X": aot.Ptr("bf16")}, {})


def test_compiler_output_parsers():
    ptx = ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "ld.global.b16 %rs1, [ %rd2 + 0 ];\n"
           "ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];\n")
    loads, widest = aot.ptx_global_loads(ptx)
    assert widest == 16
    assert "ld.global.L1::evict_last.v2.b32" in loads
    amdgcn = ("  buffer_load_dwordx2 v[0:1], v2, s[0:3], 0 offen\n"
              "  global_load_ushort v3, v[4:5], off\n"
              "    .sgpr_count:     38\n    .vgpr_count:     23\n"
              "    .vgpr_spill_count: 2\n    .sgpr_spill_count: 0\n    .agpr_count:     0\n")
    assert aot.amdgcn_global_loads(amdgcn) == (("buffer_load_dwordx2", "global_load_ushort"), 8)
    assert aot.amdgcn_metadata(amdgcn) == {"sgpr_count": 38, "vgpr_count": 23,
                                           "vgpr_spill_count": 2, "sgpr_spill_count": 0,
                                           "agpr_count": 0}
    log = ("ptxas info    : Function properties for k\n"
           "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers\n")
    assert aot.parse_ptxas_log(log) == (128, 40)
    assert aot.parse_ptxas_log("") == (None, None)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------------------------

ROTARY = "_rotary_kernel"
ROTARY_PARAMS = aot.kernel_params(rotary_kernels._rotary_kernel)  # read before any patching
_INDEX_OR_FLOAT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                   torch.int64: "i64", torch.int32: "i32"}


class _LaunchRecorder:
    """Stands in for the kernel: records ``kernel[grid](*args, **kwargs)``, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _jit_specialisation(args, kwargs):
    """What the JIT specialises for a recorded launch, by aot.specialise: tensors become
    Ptr(dtype, 16-byte aligned), ints and floats stay, the constexpr keywords are flags."""
    params = ROTARY_PARAMS
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps")
    values = {name: aot.Ptr(_INDEX_OR_FLOAT[v.dtype], v.data_ptr() % 16 == 0)
              if isinstance(v, torch.Tensor) else v
              for name, v in zip(params, args, strict=False)}
    assert len(args) + len(kwargs) == len(params)
    return aot.specialise(params, values, kwargs), num_warps


def _launch_rotary(monkeypatch, device, *, layout="bshd", batch=2, seq=5, q_heads=3, k_heads=2,
                   head_dim=16, rotary_dim=None, dtype=torch.bfloat16, table=torch.float32,
                   n_positions=17, inplace=False, interleaved=False, position_ids=None,
                   shared_positions=False, offsets=None, cu_seqlens=None, offset=0,
                   q_aligned=True, backward=False):
    """Calls apply_rotary(backend="triton") with the kernel replaced by a recorder; returns
    the recorded launches (the forward's, then the backward's when ``backward``)."""
    recorder = _LaunchRecorder()
    monkeypatch.setattr(rotary_kernels, "_rotary_kernel", recorder)
    rotary_dim = rotary_dim or head_dim
    tokens = {"bshd": (batch, seq), "sbhd": (seq, batch), "thd": (batch * seq,)}[layout]

    def tensor(heads, aligned=True):
        shape = (*tokens, heads, head_dim)
        if aligned:
            return torch.randn(shape, dtype=dtype, device=device)
        return torch.randn(math.prod(shape) + 1, dtype=dtype, device=device)[1:].view(shape)

    q = tensor(q_heads, q_aligned).requires_grad_(backward)
    k = tensor(k_heads).requires_grad_(backward) if k_heads else None
    q_in, k_in = q, k
    if inplace and backward:  # in place needs non-leaves to have a graph
        q_in, k_in = q.clone(), k.clone() if k is not None else None
    cos = torch.rand(n_positions, rotary_dim // 2, dtype=table, device=device)
    sin = torch.rand(n_positions, rotary_dim // 2, dtype=table, device=device)
    kw = {}
    index = {"i64": torch.int64, "i32": torch.int32}
    if position_ids:
        rows = 1 if shared_positions or layout == "thd" else batch
        ids = torch.randint(0, n_positions, (rows, tokens[-1] if layout == "thd" else seq))
        kw["position_ids"] = (ids[0] if layout == "thd" else ids).to(device, index[position_ids])
    if cu_seqlens:
        dt, n_seqs = cu_seqlens
        cuts = torch.linspace(0, batch * seq, n_seqs + 1).round().long()
        kw["cu_seqlens"] = cuts.to(device, index[dt])
    if offsets:
        n = cu_seqlens[1] if cu_seqlens else batch
        kw["seqlen_offsets"] = torch.zeros(n, dtype=index[offsets], device=device)
    elif offset:
        kw["seqlen_offsets"] = offset
    out = apply_rotary(q_in, k_in, cos, sin, layout=layout, interleaved=interleaved,
                       inplace=inplace, backend="triton", **kw)
    if backward:
        torch.autograd.grad([t for t in out if t is not None],
                            [t for t in (q, k) if t is not None],
                            [torch.randn_like(t) for t in out if t is not None])
    return recorder.launches


_LAUNCHES = [
    {},
    {"k_heads": 0},
    {"k_heads": 1, "q_heads": 32, "head_dim": 128, "seq": 4096, "n_positions": 4096},
    {"head_dim": 24, "rotary_dim": 8},
    {"head_dim": 24, "rotary_dim": 8, "inplace": True},
    {"inplace": True},
    {"interleaved": True, "dtype": torch.float16, "table": torch.float16},
    {"dtype": torch.float32, "table": torch.bfloat16},
    {"layout": "sbhd"},
    {"layout": "sbhd", "batch": 1},
    {"layout": "thd"},
    {"layout": "thd", "cu_seqlens": ("i32", 3)},
    {"layout": "thd", "cu_seqlens": ("i64", 1)},
    {"layout": "thd", "cu_seqlens": ("i32", 3), "offsets": "i64"},
    {"layout": "thd", "position_ids": "i64"},
    {"position_ids": "i64"},
    {"position_ids": "i32", "shared_positions": True},
    {"layout": "sbhd", "position_ids": "i64"},
    {"offsets": "i32"},
    {"offset": 3},
    {"batch": 1, "seq": 1, "offset": 4},
    {"q_aligned": False},
    {"q_aligned": False, "inplace": True},
    {"q_aligned": False, "k_heads": 0},
    {"head_dim": 20, "seq": 700, "batch": 3, "n_positions": 700},
]


@pytest.mark.parametrize("config", _LAUNCHES, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "base")
def test_rotary_aot_case_is_the_launchers(monkeypatch, device, config):
    """aot._rotary_case specialises exactly as a real launch through apply_rotary does:
    same signature, constexprs, divisibility and warps, for the forward and the backward
    (CONJUGATE). The AOT cases are built by the same function at production sizes."""
    torch_only = {"dtype", "table"}
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    spec = {k: v for k, v in config.items() if k not in torch_only}
    spec.update(dtype=names[config.get("dtype", torch.bfloat16)],
                table=names[config.get("table", torch.float32)])
    defaults = dict(batch=2, seq=5, q_heads=3, k_heads=2, head_dim=16, n_positions=17)
    spec = {**defaults, **spec}
    # The backward too, except for q misaligned in place (a graph needs a copy: aligned).
    backward = spec.get("q_aligned", True) or not spec.get("inplace")
    expected = [aot._rotary_case(**spec)]
    if backward and spec.get("inplace"):  # one launch per tensor, without k
        for heads in (spec["q_heads"], spec["k_heads"])[:2 if spec["k_heads"] else 1]:
            expected.append(aot._rotary_case(**{**spec, "inplace": False, "q_heads": heads,
                                                 "k_heads": 0}, conjugate=True))
    elif backward:  # fresh output gradients: aligned, whatever q was
        expected.append(aot._rotary_case(**{**spec, "q_aligned": True}, conjugate=True))
    # after building the expected cases: this patches the kernel
    launches = _launch_rotary(monkeypatch, device, **config, backward=backward)
    found = [_jit_specialisation(args, kwargs) for _, args, kwargs in launches]
    assert len(found) == len(expected)
    for case in expected:  # the order of the backward's launches is autograd's
        spec_of_case = ((case.signature, case.constexprs, case.divisible), case.num_warps)
        assert spec_of_case in found, (case.label, found)
        found.remove(spec_of_case)


_LLAMA = dict(batch=1, seq=4096, q_heads=32, k_heads=8, head_dim=128, n_positions=8192)


@pytest.mark.parametrize("config", [
    {},
    {"inplace": True},
    {"layout": "sbhd"},
    {"layout": "thd", "cu_seqlens": ("i32", 8)},
    {"batch": 2, "position_ids": "i64"},
    {"k_heads": 0},
    {"interleaved": True},
    {"dtype": torch.float16},
    {"batch": 8, "seq": 1, "offsets": "i32"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "llama")
def test_rotary_production_launches_are_aot_cases(monkeypatch, device, config):
    """apply_rotary at the Llama attention's size (forward and backward; the kernel replaced
    by a recorder, so nothing runs) launches only binaries the AOT set compiles."""
    compiled = {(aot.config_key(c.signature), aot.config_key(c.constexprs), c.divisible,
                 c.num_warps) for c in _rotary_cases()}  # built before the kernel is patched
    backward = config.get("seq", 4096) > 1  # decoding: inference, no graph
    launches = _launch_rotary(monkeypatch, device, **{**_LLAMA, **config}, backward=backward)
    assert len(launches) >= (2 if backward else 1)
    for _, args, kwargs in launches:
        (sig, const, div), num_warps = _jit_specialisation(args, kwargs)
        key = (aot.config_key(sig), aot.config_key(const), div, num_warps)
        assert key in compiled, (config, dict(const))


def _rotary_cases():
    return [c for c in aot.cases("rotary") if c.kernel == ROTARY]


def _block_key(case):
    return (case.constexprs["BLOCK_T"], case.constexprs["BLOCK_HALF"],
            case.constexprs["BLOCK_TAIL"], case.num_warps)


def _launch_key(half, tail):
    cfg = rotary_kernels.launch_config(half, tail)
    return cfg["BLOCK_T"], cfg["BLOCK_HALF"], cfg["BLOCK_TAIL"], cfg["num_warps"]


def test_rotary_cases_cover_every_launch_config():
    """Every block configuration of the real models' head dims (full rotary, and partial out
    of place and in place), every BLOCK_HALF the op accepts (head_dim <= 1024) and every
    BLOCK_TAIL: a configuration added to launch_config without an AOT case fails here."""
    covered = {_block_key(c) for c in _rotary_cases()}
    wanted = {_launch_key(hd // 2, 0) for hd in aot.ROTARY_HEAD_DIMS}
    for head_dim, rotary_dim in aot.ROTARY_PARTIAL:
        wanted |= {_launch_key(rotary_dim // 2, head_dim - rotary_dim),
                   _launch_key(rotary_dim // 2, 0)}
    max_half = rotary_ops.MAX_KERNEL_HEAD_DIM // 2
    wanted |= {_launch_key(half, 0) for half in range(1, max_half + 1)}
    wanted |= {_launch_key(1, tail) for tail in range(1, 2 * max_half - 1)}
    missing = wanted - covered
    assert not missing, f"launch configurations without an AOT case: {sorted(missing)}"


def test_rotary_cases_vary_every_flag_and_specialisation():
    cases = _rotary_cases()
    assert 40 <= len(cases) < 200

    def has(dtype="bf16", **flags):
        return any(c.signature["Q"] == f"*{dtype}"
                   and all(c.constexprs.get(k) == v for k, v in flags.items()) for c in cases)

    for flag, values in (("POSITIONS", (0, 1, 2)), ("VARLEN", (False, True)),
                         ("BATCH_FIRST", (False, True)), ("INTERLEAVED", (False, True)),
                         ("CONJUGATE", (False, True)), ("COPY_TAIL", (False, True))):
        for value in values:
            assert has(**{flag: value}), (flag, value)
    # dtype x style x head dim with the common flags, and the backward of each style
    for dtype, interleaved, head_dim in itertools.product(DTYPES, (False, True),
                                                          aot.ROTARY_HEAD_DIMS):
        block = rotary_kernels.launch_config(head_dim // 2, 0)["BLOCK_HALF"]
        common = dict(POSITIONS=0, VARLEN=False, BATCH_FIRST=True, CONJUGATE=False,
                      COPY_TAIL=False)
        assert has(dtype, INTERLEAVED=interleaved, BLOCK_HALF=block, **common)
        assert has("bf16", **{**common, "INTERLEAVED": interleaved, "CONJUGATE": True},
                   BLOCK_HALF=block)
    assert has(POSITIONS=1, VARLEN=True)
    assert has(POSITIONS=0, VARLEN=False, BATCH_FIRST=False, n_inner=1)  # sbhd, batch 1
    for arg in ("POSITION_IDS", "OFFSETS", "CU_SEQLENS"):
        assert {c.signature[arg] for c in cases} >= {"*i32", "*i64"}, arg
    assert {c.signature["COS"] for c in cases} >= {"*fp32", "*bf16", "*fp16"}
    # a head_dim not divisible by 16, q not 16-byte aligned, strides past 2^31
    assert any(c.signature["stride_q_head"] == "i32" and "stride_q_head" not in c.divisible
               for c in cases)
    assert any("Q" not in c.divisible for c in cases)
    assert any(c.signature["stride_q_outer"] == "i64" for c in cases)
    for c in cases:  # only what the launcher can make
        assert c.constexprs["POSITIONS"] != 2 or not c.constexprs["VARLEN"], c
        assert c.constexprs["VARLEN"] <= c.constexprs["BATCH_FIRST"], c


@pytest.mark.slow
def test_rotary_bf16_rotate_half_loads_16_bytes_at_a_time():
    """The Llama case (bf16, rotate-half, head_dim 128, fp32 tables) loads q and k with
    16-byte vectors on every target: ld.global.v4 on sm_90 and sm_80 (every global load),
    dwordx4 on gfx90a and gfx942 (two warps: 8 bf16 per lane of a 64-wide wavefront)."""
    (case,) = [c for c in _rotary_cases() if c.label == "hd=128 bf16 bshd b=1 s=4096 h=32/8"]
    assert case.signature["Q"] == case.signature["K"] == "*bf16"
    assert case.signature["COS"] == "*fp32"
    assert case.constexprs["BLOCK_HALF"] == 64 and not case.constexprs["INTERLEAVED"]
    assert {"Q", "K", "OUT_Q", "OUT_K", "head_dim"} <= set(case.divisible)
    for target in aot.TARGETS:
        _need_backend(target)
    reports = aot.compile_all([case], list(aot.TARGETS.values()))
    for target, report in zip(aot.TARGETS, reports, strict=True):
        assert isinstance(report, aot.AotReport), str(report)
        assert report.spills == 0
        if target.startswith("sm_"):
            assert report.loads and all(load.startswith("ld.global.v4") for load in report.loads), \
                (target, report.loads)
        else:
            # The fp32 tables load as dwordx4 too: q and k must not be left narrower.
            assert set(report.loads) == {"global_load_dwordx4"}, (target, report.loads)
        assert report.widest_load == 16
