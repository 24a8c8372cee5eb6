"""The ahead-of-time compile engine (eurocore.kernels.compile_engine): a Launch specialised as
Triton's JIT would, launch limits, vendor-specific cases, pickling to worker processes, and the
parsers of the compiler's output. Compiling every case is tests/kernels/test_aot_compile.py.
"""

import dataclasses
import pickle

import pytest
import torch

from eurocore.kernels import aot, swiglu
from eurocore.kernels import compile_engine as engine
from eurocore.kernels.launch import TensorSpec


def test_launch_over_1024_threads_is_rejected():
    case = next(c for c in aot.cases("rms_norm") if c.num_warps == 16)
    bad = dataclasses.replace(case, num_warps=32)
    with pytest.raises(engine.LaunchSizeError,
                       match=r"_rms_norm_\w+_kernel.*num_warps=32 launches 32 x 64 = 2048 "
                             r"threads per program on gfx942.*limit of 1024"):
        engine.compile_case(bad, engine.TARGETS["gfx942"])
    engine.check_launch(bad, engine.TARGETS["sm_90"])  # 32 x 32 = 1024: allowed on NVIDIA
    with pytest.raises(engine.LaunchSizeError, match="gfx90a"):
        engine.check_launch(bad, engine.TARGETS["gfx90a"])


def test_specialise_mirrors_the_jit():
    sig, const, div = engine.specialise(
        ["X", "Y", "a", "b", "c", "d", "eps", "F"],
        {"X": engine.Ptr("bf16"), "Y": engine.Ptr("fp32", aligned=False), "a": 4096,
         "b": 4097, "c": 0, "d": 1, "eps": 1e-6}, {"F": True})
    assert sig == {"X": "*bf16", "Y": "*fp32", "a": "i32", "b": "i32", "c": "i32",
                   "d": "constexpr", "eps": "fp32", "F": "constexpr"}
    assert const == {"d": 1, "F": True}
    assert div == ("X", "a", "c")
    with pytest.raises(ValueError, match="missing"):
        engine.specialise(["X", "n"], {"X": engine.Ptr("bf16")}, {})


def test_aot_case_binds_a_launch_as_python_does():
    plan = swiglu.swiglu_fwd_plan(*(TensorSpec((4, 48), "bf16") for _ in range(3)))
    case = engine.aot_case(plan, "n=48", vendors=("amd",))
    assert case.signature == {"G": "*bf16", "U": "*bf16", "Y": "*bf16", "stride_g": "i32",
                              "stride_u": "i32", "stride_y": "i32", "n_cols": "i32",
                              "BLOCK_N": "constexpr"}
    assert case.constexprs == {"BLOCK_N": 64}
    assert case.divisible == ("G", "U", "Y", "stride_g", "stride_u", "stride_y", "n_cols")
    assert (case.label, case.vendors, case.num_warps, case.num_stages, case.options) == (
        "n=48", ("amd",), 1, None, {})
    with pytest.raises(ValueError, match="do not bind"):
        engine.aot_case(plan._replace(args=plan.args[:-1]))
    with pytest.raises(ValueError, match="do not bind"):
        engine.aot_case(plan._replace(constexprs={}))
    with pytest.raises(TypeError, match="complex64"):
        engine.aot_case(plan._replace(args=(TensorSpec((4, 48), torch.complex64),
                                            *plan.args[1:])))


def test_cases_pickle_by_reference_with_every_field():
    """Worker processes rebuild a case by its kernel's module and name (they import the
    module afresh, see compile_engine) with all its fields: options and vendors too."""
    amd = next(c for c in aot.cases("attention") if c.vendors == ("amd",))
    assert "waves_per_eu" in amd.options
    for case in (aot.cases("rms_norm")[0], aot.cases("swiglu")[-1], amd):
        again = pickle.loads(pickle.dumps(case))
        assert again.fn is case.fn
        assert all(getattr(again, f.name) == getattr(case, f.name)
                   for f in dataclasses.fields(case)), case


def test_vendor_specific_case_is_refused_for_the_other_vendor():
    """An NVIDIA configuration is never compiled for an AMD target, nor the reverse."""
    attention = aot.cases("attention")
    nvidia = next(c for c in attention if c.vendors == ("nvidia",))
    amd = next(c for c in attention if c.vendors == ("amd",))
    for name, target in engine.TARGETS.items():
        on_nvidia = name.startswith("sm_")
        assert nvidia.applies_to(target) == on_nvidia
        assert amd.applies_to(target) == (not on_nvidia)
    with pytest.raises(ValueError, match=r"launched only on nvidia GPUs, not on gfx942"):
        engine.compile_case(nvidia, engine.TARGETS["gfx942"])
    with pytest.raises(ValueError, match=r"launched only on amd GPUs, not on sm_90"):
        engine.compile_case(amd, engine.TARGETS["sm_90"])
    rms = aot.cases("rms_norm")[0]
    assert rms.vendors == () and all(rms.applies_to(t) for t in engine.TARGETS.values())


@pytest.mark.slow
def test_vendor_cases_compile_for_their_vendors_targets_only(need_backend):
    """compile_all sends an NVIDIA configuration to sm_90 and sm_80 and an AMD one (with its
    waves_per_eu) to gfx90a and gfx942: four compilations for two cases on four targets."""
    need_backend(*engine.TARGETS)
    nvidia, amd = (next(c for c in aot.cases("attention") if c.vendors == (vendor,)
                        and c.kernel == "_attn_bwd_delta_kernel") for vendor in ("nvidia", "amd"))
    results = engine.compile_all([nvidia, amd], list(engine.TARGETS.values()))
    assert [(r.label, r.target) for r in results] == [
        (nvidia.label, "sm_90"), (nvidia.label, "sm_80"), (amd.label, "gfx90a"),
        (amd.label, "gfx942")]
    assert all(isinstance(r, engine.AotReport) for r in results), [str(r) for r in results]


def test_compiler_output_parsers():
    ptx = ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "ld.global.b16 %rs1, [ %rd2 + 0 ];\n"
           "ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];\n")
    loads, widest = engine.ptx_global_loads(ptx)
    assert widest == 16
    assert "ld.global.L1::evict_last.v2.b32" in loads
    amdgcn = ("  buffer_load_dwordx2 v[0:1], v2, s[0:3], 0 offen\n"
              "  global_load_ushort v3, v[4:5], off\n"
              "    .sgpr_count:     38\n    .vgpr_count:     23\n"
              "    .vgpr_spill_count: 2\n    .sgpr_spill_count: 0\n    .agpr_count:     0\n")
    assert engine.amdgcn_global_loads(amdgcn) == (
        ("buffer_load_dwordx2", "global_load_ushort"), 8)
    assert engine.amdgcn_metadata(amdgcn) == {"sgpr_count": 38, "vgpr_count": 23,
                                              "vgpr_spill_count": 2, "sgpr_spill_count": 0,
                                              "agpr_count": 0}
    log = ("ptxas info    : Function properties for k\n"
           "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers\n")
    assert engine.parse_ptxas_log(log) == (128, 40)
    assert engine.parse_ptxas_log("") == (None, None)
