"""Ahead-of-time compilation of every kernel configuration for sm_90, sm_80, gfx90a, gfx942.

No GPU is needed: Triton compiles for a named target. On CPU machines tests/conftest.py has
set TRITON_INTERPRET=1, so the kernels imported here are interpreted; eurocore.kernels.aot
then compiles in worker processes started without it (see its docstring).
"""

import dataclasses
import itertools
import os

import pytest

from eurocore.kernels import aot
from eurocore.kernels import rms_norm as rms_norm_kernels

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
