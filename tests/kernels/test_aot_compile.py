"""Ahead-of-time compilation of every kernel configuration for sm_90, sm_80, gfx90a, gfx942.

No GPU is needed: Triton compiles for a named target. On CPU machines tests/conftest.py has
set TRITON_INTERPRET=1, so the kernels imported here are interpreted; the compile engine
(eurocore.kernels.compile_engine, re-exported by eurocore.kernels.aot) then compiles in worker
processes started without it (see its docstring).
"""

import dataclasses
import itertools
import math
import os

import pytest
import torch

from eurocore.kernels import aot
from eurocore.kernels import flash_attention as attention_kernels
from eurocore.kernels import rms_norm as rms_norm_kernels
from eurocore.kernels import rotary as rotary_kernels
from eurocore.kernels import swiglu as swiglu_kernels
from eurocore.kernels.launch import Launch, TensorSpec
from eurocore.ops import apply_rotary, flash_attention, flash_attention_varlen
from eurocore.ops import attention as attention_ops
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
    # cases of a vendor-specific configuration (attention) compile for that vendor only
    assert len(results) == sum(c.applies_to(aot.TARGETS[target]) for c in cases)
    assert {r.target for r in results} == {target}
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
# Launch plans: one source for the launchers and the compile check
# ---------------------------------------------------------------------------------------------


def _real(arg):
    """A CPU tensor of a TensorSpec's shape, dtype, strides and element offset into a fresh
    (16-byte aligned) allocation; any other argument as it is."""
    if not isinstance(arg, TensorSpec):
        return arg
    strides = arg.stride()
    extent = 1 + sum((n - 1) * s for n, s in zip(arg.shape, strides, strict=True))
    size = arg.offset + (extent if all(arg.shape) else 0)
    return torch.empty(size, dtype=arg.dtype).as_strided(arg.shape, strides, arg.offset)


def _plan_calls():
    """(name, plan, arguments over TensorSpecs) for launches of every plan: rms_norm with and
    without a residual and a weight, mixed dtypes, zero-centred, a misaligned x, one row,
    n = 1, fewer programs than rows; swiglu contiguous, as the halves of a fused projection,
    with a misaligned gate and with an expanded dy."""
    spec = TensorSpec
    calls = []
    for rows, n, x, r, w, zc, offset, programs in (
            (5, 48, "bf16", "bf16", "bf16", False, 0, 5), (3, 37, "fp32", None, None, False, 0, 2),
            (4, 40, "bf16", "fp32", "fp32", True, 0, 4), (2, 37, "fp16", None, "fp16", False, 1, 2),
            (1, 33, "bf16", "bf16", None, False, 0, 1), (6, 1, "bf16", None, "bf16", False, 0, 4)):
        hd = spec((1,), x).dtype if r is None else torch.promote_types(spec((1,), x).dtype,
                                                                         spec((1,), r).dtype)
        xs, weight = spec((rows, n), x, offset=offset), spec((n,), w) if w else None
        residual, h = (spec((rows, n), r), spec((rows, n), hd)) if r else (None, None)
        rstd = spec((rows,), "fp32")
        name = f"rows={rows} n={n} x:{x} r:{r} w:{w} zc={zc} offset={offset}"
        calls.append((f"rms fwd {name}", rms_norm_kernels.rms_norm_fwd_plan,
                      (xs, weight, residual, 1e-6, zc, spec((rows, n), hd), h, rstd)))
        dr = spec((rows, n), r) if r and r != x else None
        calls.append((f"rms bwd {name}", rms_norm_kernels.rms_norm_bwd_plan,
                      (spec((rows, n), hd), spec((rows, n), hd) if r else None, h or xs, weight,
                       rstd, zc, spec((rows, n), x), dr, spec((programs, n), "fp32"), programs)))
    for rows, n, dtype, fused, gate_offset, dy_strides in (
            (3, 48, "bf16", False, 0, None), (5, 37, "fp16", True, 0, None),
            (2, 48, "fp32", True, 0, None), (4, 48, "bf16", False, 1, (0, 1)),
            (1, 1, "bf16", False, 0, None)):
        strides = (2 * n, 1) if fused else None
        gate = spec((rows, n), dtype, strides, offset=gate_offset)
        up = spec((rows, n), dtype, strides, offset=gate_offset + n if fused else 0)
        out = [spec((rows, n), dtype) for _ in range(3)]
        name = f"rows={rows} n={n} {dtype} fused={fused} gate_offset={gate_offset}"
        calls.append((f"swiglu fwd {name}", swiglu_kernels.swiglu_fwd_plan, (gate, up, out[0])))
        calls.append((f"swiglu bwd {name}", swiglu_kernels.swiglu_bwd_plan,
                      (spec((rows, n), dtype, dy_strides), gate, up, out[1], out[2])))
    return calls


@pytest.mark.parametrize("name,plan,args", [pytest.param(*call, id=call[0])
                                             for call in _plan_calls()])
def test_plan_over_tensor_specs_is_the_plan_over_tensors(name, plan, args):
    """A plan's Launch over real CPU tensors and over TensorSpecs of the same shapes, strides
    and offsets is the same launch to the JIT: grid, signature, constexprs, divisibility and
    options. The stand-in cannot drift from the tensors it stands for."""
    from_specs, from_tensors = plan(*args), plan(*map(_real, args))
    assert from_specs.grid == from_tensors.grid
    a, b = aot.aot_case(from_specs, name), aot.aot_case(from_tensors, name)
    assert (a.kernel, a.signature, a.constexprs, a.divisible, a.num_warps, a.num_stages,
            a.options) == (b.kernel, b.signature, b.constexprs, b.divisible, b.num_warps,
                           b.num_stages, b.options)


@pytest.mark.parametrize("shape,dtype,strides,offset", [
    ((3, 5), "bf16", None, 0), ((3, 5), "fp32", (10, 1), 5), ((4, 1), "fp16", (0, 1), 1),
    ((2, 3, 4), "i64", None, 2), ((0, 7), "bf16", None, 0), ((8,), "fp32", None, 4)])
def test_tensor_spec_answers_as_the_tensor_does(shape, dtype, strides, offset):
    spec = TensorSpec(shape, dtype, strides, offset)
    tensor = _real(spec)
    assert (spec.shape, spec.dtype, spec.dim(), spec.ndim, spec.stride(), spec.element_size(),
            spec.is_contiguous()) == (tensor.shape, tensor.dtype, tensor.dim(), tensor.ndim,
                                      tensor.stride(), tensor.element_size(),
                                      tensor.is_contiguous())
    assert [spec.stride(i) for i in range(spec.dim())] == list(tensor.stride())
    assert (spec.data_ptr() % 16 == 0) == (tensor.data_ptr() % 16 == 0)
    with pytest.raises(AttributeError):
        spec.device  # noqa: B018  (only what plans read: a plan reading more fails here)


def test_launch_runs_its_kernel_unless_the_grid_is_empty():
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    Launch(Kernel(), (3, 2), (1, 2.0), {"BLOCK": 8}, {"num_warps": 4}).run()
    assert launches == [((3, 2), (1, 2.0), {"BLOCK": 8, "num_warps": 4})]
    Launch(Kernel(), (0,), (1,), {}, {}).run()
    Launch(Kernel(), (3, 0), (1,), {}, {}).run()
    assert len(launches) == 1


def test_aot_case_binds_a_launch_as_python_does():
    plan = swiglu_kernels.swiglu_fwd_plan(*(TensorSpec((4, 48), "bf16") for _ in range(3)))
    case = aot.aot_case(plan, "n=48", vendors=("amd",))
    assert case.signature == {"G": "*bf16", "U": "*bf16", "Y": "*bf16", "stride_g": "i32",
                              "stride_u": "i32", "stride_y": "i32", "n_cols": "i32",
                              "BLOCK_N": "constexpr"}
    assert case.constexprs == {"BLOCK_N": 64}
    assert case.divisible == ("G", "U", "Y", "stride_g", "stride_u", "stride_y", "n_cols")
    assert (case.label, case.vendors, case.num_warps, case.num_stages, case.options) == (
        "n=48", ("amd",), 1, None, {})
    with pytest.raises(ValueError, match="do not bind"):
        aot.aot_case(plan._replace(args=plan.args[:-1]))
    with pytest.raises(ValueError, match="do not bind"):
        aot.aot_case(plan._replace(constexprs={}))
    with pytest.raises(TypeError, match="complex64"):
        aot.aot_case(plan._replace(args=(TensorSpec((4, 48), torch.complex64), *plan.args[1:])))


def test_plan_cases_pickle_by_reference():
    """A case made from a plan pickles its kernel by module and name (worker processes import
    the module afresh, see compile_engine) with all its fields."""
    import pickle

    for case in (aot.cases("rms_norm")[0], aot.cases("swiglu")[-1]):
        again = pickle.loads(pickle.dumps(case))
        assert again.fn is case.fn
        assert all(getattr(again, f.name) == getattr(case, f.name)
                   for f in dataclasses.fields(case)), case


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

    for flag, values in (("HAS_POSITIONS", (False, True)), ("INTERLEAVED", (False, True)),
                         ("CONJUGATE", (False, True)), ("COPY_TAIL", (False, True))):
        for value in values:
            assert has(**{flag: value}), (flag, value)
    # dtype x style x head dim with the common flags, and the backward of each style
    for dtype, interleaved, head_dim in itertools.product(DTYPES, (False, True),
                                                          aot.ROTARY_HEAD_DIMS):
        block = rotary_kernels.launch_config(head_dim // 2, 0)["BLOCK_HALF"]
        common = dict(HAS_POSITIONS=False, stride_pos_inner=1, CONJUGATE=False,
                      COPY_TAIL=False)
        assert has(dtype, INTERLEAVED=interleaved, BLOCK_HALF=block, **common)
        assert has("bf16", **{**common, "INTERLEAVED": interleaved, "CONJUGATE": True},
                   BLOCK_HALF=block)
    # The op's normalised positions: none (the sequence index: inner, or outer in sbhd),
    # rows read along inner (bshd, thd), or transposed (sbhd: along outer).
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


# ---------------------------------------------------------------------------------------------
# Flash attention
# ---------------------------------------------------------------------------------------------

ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel")
# read before any test patches the kernels
ATTENTION_PARAMS = {name: aot.kernel_params(getattr(attention_kernels, name))
                    for name in ATTENTION_KERNELS}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "waves_per_eu")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_INDEX_DTYPES = {"i32": torch.int32, "i64": torch.int64}
# small odd shapes for the launch comparisons (the AOT cases use production sizes)
_ATTENTION_TEST_SHAPE = dict(head_dim=16, batch=2, seqlen_q=5, heads=4)


class _NamedRecorder:
    """Stands in for one kernel: records ``kernel[grid](*args, **kwargs)`` with its name."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


def _attention_key(kernel, signature, constexprs, divisible, num_warps, num_stages, options):
    return (kernel, aot.config_key(signature), aot.config_key(constexprs), divisible,
            num_warps, num_stages, aot.config_key(options))


def _case_key(case):
    return _attention_key(case.kernel, case.signature, case.constexprs, case.divisible,
                          case.num_warps, case.num_stages, case.options)


def _recorded_key(name, args, kwargs):
    """What the JIT specialises for a recorded launch (by aot.specialise), with its options."""
    params = ATTENTION_PARAMS[name]
    kwargs = dict(kwargs)
    launch = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    assert len(args) + len(kwargs) == len(params), name
    values = {p: aot.Ptr(_INDEX_OR_FLOAT[v.dtype], v.data_ptr() % 16 == 0)
              if isinstance(v, torch.Tensor) else v for p, v in zip(params, args, strict=False)}
    sig, const, div = aot.specialise(params, values, kwargs)
    options = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
    return _attention_key(name, sig, const, div, launch["num_warps"], launch["num_stages"],
                          options)


def _launch_attention(monkeypatch, device, vendor, *, head_dim, batch, seqlen_q, heads,
                      dtype="bf16", seqlen_k=None, kv_heads=None, cu_seqlens=None,
                      causal=False, window=(-1, -1), softcap=0.0, backward=True):
    """Calls flash_attention (or flash_attention_varlen, with ``cu_seqlens`` = (index dtype,
    sequences)) with backend="triton", the launchers' vendor set to ``vendor`` and the kernels
    replaced by recorders (nothing runs); with ``backward`` also takes the gradients. Returns
    the recorded launches, forward first. Arguments as aot._attention_launch takes them."""
    launches = []
    for name in ATTENTION_KERNELS:
        monkeypatch.setattr(attention_kernels, name, _NamedRecorder(name, launches))
    monkeypatch.setattr(attention_kernels, "vendor", lambda _device: vendor)
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    kv_heads = heads if kv_heads is None else kv_heads
    dt = _TORCH_DTYPES[dtype]

    def tensor(*shape):
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_(backward)

    options = dict(causal=causal, window_size=window, softcap=softcap, backend="triton")
    if cu_seqlens:
        index, n_seqs = cu_seqlens
        cu_q = torch.linspace(0, seqlen_q, n_seqs + 1).round().to(device, _INDEX_DTYPES[index])
        cu_k = torch.linspace(0, seqlen_k, n_seqs + 1).round().to(device, _INDEX_DTYPES[index])
        q, k, v = (tensor(seqlen_q, heads, head_dim), tensor(seqlen_k, kv_heads, head_dim),
                   tensor(seqlen_k, kv_heads, head_dim))
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, int(cu_q.diff().max()),
                                     int(cu_k.diff().max()), **options)
    else:
        q = tensor(batch, seqlen_q, heads, head_dim)
        k, v = (tensor(batch, seqlen_k, kv_heads, head_dim) for _ in range(2))
        out = flash_attention(q, k, v, **options)
    if backward:
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    return launches


_ATTENTION_LAUNCHES = [
    {},
    {"head_dim": 24},  # BLOCK_D 32, strides not divisible by 16
    {"head_dim": 64, "seqlen_q": 16, "batch": 1},
    {"head_dim": 256, "seqlen_q": 33},
    {"kv_heads": 2},  # GQA
    {"kv_heads": 1, "head_dim": 128},  # MQA: n_kv_heads is the constexpr 1
    {"heads": 1},  # n_heads 1
    {"causal": True},
    {"causal": True, "seqlen_q": 3, "seqlen_k": 7},
    {"window": (3, 1)},  # window_right 1: the constexpr 1
    {"causal": True, "window": (16, -1)},
    {"softcap": 5.0},
    {"dtype": "fp16"},
    {"dtype": "fp32"},  # PRECISION "ieee"
    {"cu_seqlens": ("i32", 3), "seqlen_q": 11},
    {"cu_seqlens": ("i64", 3), "seqlen_q": 11, "seqlen_k": 13},
    {"cu_seqlens": ("i32", 3), "seqlen_q": 48, "causal": True, "kv_heads": 2},
    {"cu_seqlens": ("i32", 1), "seqlen_q": 7},
]


@pytest.mark.parametrize("vendor", aot.ATTENTION_VENDORS)
@pytest.mark.parametrize("config", _ATTENTION_LAUNCHES, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "base")
def test_attention_aot_case_is_the_launchers(monkeypatch, device, vendor, config):
    """aot._attention_launch specialises exactly as the launchers do, on each vendor: the
    forward, then δ, dk/dv and dq of the backward, each with the same signature, constexprs,
    divisibility, warps, stages and vendor options (waves_per_eu on AMD) as the real launch
    through flash_attention / flash_attention_varlen. The AOT cases are built by the same
    function at production sizes."""
    spec = {**_ATTENTION_TEST_SHAPE, **config}
    expected = [_case_key(c) for backward in (False, True)
                for c in aot._attention_launch(vendor=vendor, backward=backward, **spec)]
    # after building the expected cases: this patches the kernels
    launches = _launch_attention(monkeypatch, device, vendor, **spec)
    found = [_recorded_key(name, args, kwargs) for name, _, args, kwargs in launches]
    assert [key[0] for key in found] == list(ATTENTION_KERNELS)
    for want, got in zip(expected, found, strict=True):
        assert got == want, (config, dict(got[2]), dict(want[2]))


_ATTENTION_PRODUCTION = dict(batch=2, seqlen_q=4096, heads=32, head_dim=128)


@pytest.mark.parametrize("vendor", aot.ATTENTION_VENDORS)
@pytest.mark.parametrize("config", [
    {},
    {"kv_heads": 8},
    {"causal": True},
    {"causal": True, "kv_heads": 8},
    {"softcap": 50.0},
    {"dtype": "fp16"},
    {"head_dim": 64},
    {"head_dim": 96},
    {"head_dim": 80},
    {"head_dim": 256},
    {"cu_seqlens": ("i32", 8), "seqlen_q": 16384},
    {"cu_seqlens": ("i32", 8), "seqlen_q": 16384, "causal": True, "kv_heads": 8},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "llama-mha")
def test_attention_production_launches_are_aot_cases(monkeypatch, device, vendor, config):
    """flash_attention at Llama-size shapes (forward and backward, the kernels replaced by
    recorders) launches on each vendor only binaries the AOT set compiles for that vendor."""
    compiled = {_case_key(c) for c in _attention_cases() if c.vendors == (vendor,)}
    launches = _launch_attention(monkeypatch, device, vendor,
                                 **{**_ATTENTION_PRODUCTION, **config})
    assert len(launches) == 4
    for name, _, args, kwargs in launches:
        key = _recorded_key(name, args, kwargs)
        assert key in compiled, (config, name, dict(key[2]))


def _attention_cases():
    return aot.cases("attention")


def _tiles(case):
    c = case.constexprs
    return (c["BLOCK_M"], c.get("BLOCK_N"), c["BLOCK_D"], case.num_warps, case.num_stages,
            aot.config_key(case.options))


def test_attention_cases_cover_every_launch_config():
    """Every configuration launch_config gives any head_dim the op accepts (multiples of 8 up
    to 256), forward and backward, on each vendor, is compiled for each kernel in bf16 and
    only for that vendor, and head_dim 128's in fp16 too: a configuration added to the tables
    without an AOT case fails here."""
    cases = _attention_cases()
    head_dims = range(8, attention_ops.MAX_KERNEL_HEAD_DIM + 1, 8)
    config_of = {"_attn_fwd_kernel": "forward", "_attn_bwd_delta_kernel": "dq",
                 "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
    for vendor, kernel in itertools.product(aot.ATTENTION_VENDORS, ATTENTION_KERNELS):
        for head_dim in head_dims:
            cfg = attention_kernels.launch_config(head_dim, vendor, config_of[kernel])
            options = aot.config_key({k: v for k, v in cfg.items() if k not in (
                "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")})
            dtypes = ("bf16", "fp16") if head_dim in aot.ATTENTION_FP16_HEAD_DIMS else ("bf16",)
            for dtype in dtypes:
                block_n = None if kernel == "_attn_bwd_delta_kernel" else cfg["BLOCK_N"]
                want = (cfg["BLOCK_M"], block_n, cfg["BLOCK_D"], cfg["num_warps"],
                        cfg["num_stages"], options)
                pointer = "OUT" if kernel == "_attn_bwd_delta_kernel" else "Q"
                assert any(c.kernel == kernel and c.vendors == (vendor,) and _tiles(c) == want
                           and c.signature[pointer] == f"*{dtype}" for c in cases), \
                    (vendor, kernel, dtype, head_dim, want)


def test_attention_cases_vary_every_flag_and_specialisation():
    cases = _attention_cases()
    assert 60 <= len(cases) <= 140, len(cases)  # CI compiles each for two targets
    assert {c.kernel for c in cases} == set(ATTENTION_KERNELS)
    for vendor in aot.ATTENTION_VENDORS:
        mine = [c for c in cases if c.vendors == (vendor,)]
        # AMD tuning beside NVIDIA's: waves_per_eu and one stage on AMD only
        if vendor == "amd":
            waves = attention_kernels.AMD_WAVES_PER_EU
            config_of = {"_attn_fwd_kernel": "forward", "_attn_bwd_dkdv_kernel": "dkdv"}
            assert all(c.options == {"waves_per_eu": waves[config_of.get(c.kernel, "dq")]}
                       and c.num_stages == 1 for c in mine)
        else:
            assert all(c.options == {} for c in mine)
            assert any(c.num_stages > 1 for c in mine)
        for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
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
            # lengths (and so the lse strides the kernels derive from them) not multiples
            # of 16; seqlen_q != seqlen_k
            assert any(not c.constexprs["VARLEN"] and "fixed_seqlen_q" not in c.divisible
                       for c in of_kernel)
            assert any("fixed_seqlen_k" not in c.divisible for c in of_kernel)
        fwd = [c for c in mine if c.kernel == "_attn_fwd_kernel" and c.constexprs["VARLEN"]]
        assert {c.signature["CU_Q"] for c in fwd} == {"*i32", "*i64"}
    for c in cases:  # only what the launchers make: fresh (aligned) tensors; packed: index
        # cu_seqlens and batch strides 0, else q (or out) passed in their place
        assert all(a in c.divisible for a, t in c.signature.items() if t.startswith("*")), c
        if c.constexprs["VARLEN"]:
            batch_stride = "stride_ob" if c.kernel == "_attn_bwd_delta_kernel" else "stride_qb"
            assert c.signature["CU_Q"] in ("*i32", "*i64") and batch_stride in c.divisible, c
        else:
            assert c.signature["CU_Q"] == c.signature["Q" if "Q" in c.signature else "OUT"], c


def test_vendor_specific_case_is_refused_for_the_other_vendor():
    """An NVIDIA configuration is never compiled for an AMD target, nor the reverse."""
    nvidia = next(c for c in _attention_cases() if c.vendors == ("nvidia",))
    amd = next(c for c in _attention_cases() if c.vendors == ("amd",))
    for name, target in aot.TARGETS.items():
        on_nvidia = name.startswith("sm_")
        assert nvidia.applies_to(target) == on_nvidia
        assert amd.applies_to(target) == (not on_nvidia)
    with pytest.raises(ValueError, match=r"launched only on nvidia GPUs, not on gfx942"):
        aot.compile_case(nvidia, aot.TARGETS["gfx942"])
    with pytest.raises(ValueError, match=r"launched only on amd GPUs, not on sm_90"):
        aot.compile_case(amd, aot.TARGETS["sm_90"])
    rms = aot.cases("rms_norm")[0]
    assert rms.vendors == () and all(rms.applies_to(t) for t in aot.TARGETS.values())


def test_cases_pickle_with_their_options_and_vendors():
    """Worker processes rebuild a case by reference: options and vendors survive."""
    import pickle

    amd = next(c for c in _attention_cases() if c.vendors == ("amd",))
    again = pickle.loads(pickle.dumps(amd))
    assert (again.kernel, again.signature, again.constexprs, again.num_warps, again.num_stages,
            again.divisible, again.label, again.options, again.vendors) == (
        amd.kernel, amd.signature, amd.constexprs, amd.num_warps, amd.num_stages,
        amd.divisible, amd.label, amd.options, amd.vendors)
    assert again.options == amd.options and "waves_per_eu" in again.options


@pytest.mark.slow
def test_attention_compiles_for_its_vendors_targets_only():
    """compile_all sends an NVIDIA configuration to sm_90 and sm_80 and an AMD one (with its
    waves_per_eu) to gfx90a and gfx942: four compilations for two cases on four targets."""
    for target in aot.TARGETS:
        _need_backend(target)
    nvidia = next(c for c in _attention_cases() if c.vendors == ("nvidia",)
                  and c.kernel == "_attn_bwd_delta_kernel")
    amd = next(c for c in _attention_cases() if c.vendors == ("amd",)
               and c.kernel == "_attn_bwd_delta_kernel")
    results = aot.compile_all([nvidia, amd], list(aot.TARGETS.values()))
    assert [(r.label, r.target) for r in results] == [
        (nvidia.label, "sm_90"), (nvidia.label, "sm_80"), (amd.label, "gfx90a"),
        (amd.label, "gfx942")]
    assert all(isinstance(r, aot.AotReport) for r in results), [str(r) for r in results]


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------

SWIGLU_KERNELS = ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")


def _swiglu_variant(case):
    if case.constexprs.get("n_cols") == 1:
        return "n=1"
    return "aligned" if "n_cols" in case.divisible else "unaligned"


def test_swiglu_cases_cover_every_launch_config():
    """Every (block, warps) launch_config gives a row up to SWIGLU_SWEEP_N, for each kernel,
    with n a multiple of 16 and not wherever the configuration admits both: a configuration
    added to launch_config without an AOT case fails here."""
    wanted = set()
    for n in range(1, aot.SWIGLU_SWEEP_N + 1):
        cfg = aot.config_key(swiglu_kernels.launch_config(n))
        variant = "n=1" if n == 1 else ("aligned" if n % 16 == 0 else "unaligned")
        wanted.update((kernel, cfg, variant) for kernel in SWIGLU_KERNELS)
    assert {cfg for _, cfg, _ in wanted} == set(
        aot.distinct_launch_configs(swiglu_kernels.launch_config, aot.SWIGLU_SWEEP_N))
    covered = {(c.kernel, aot.config_key({"BLOCK_N": c.constexprs["BLOCK_N"],
                                          "num_warps": c.num_warps}), _swiglu_variant(c))
               for c in aot.cases("swiglu")}
    missing = sorted(wanted - covered, key=str)
    assert not missing, f"launch configurations without an AOT case: {missing}"
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


@pytest.mark.slow
def test_swiglu_bf16_loads_16_bytes_at_a_time():
    """The aligned bf16 kernels at the largest block must use 16-byte vector loads:
    ld.global.v4 on sm_90, dwordx4 on gfx942; a narrower load means the hints were lost."""
    _need_backend("sm_90")
    _need_backend("gfx942")
    for kernel in SWIGLU_KERNELS:
        (case,) = [c for c in aot.cases("swiglu") if c.kernel == kernel
                   and c.signature["G"] == "*bf16"
                   and c.constexprs["BLOCK_N"] == swiglu_kernels.MAX_BLOCK_N
                   and "n_cols" in c.divisible and "fused" not in c.label
                   and all(a in c.divisible for a in c.signature if a.isupper()
                           and a != "BLOCK_N")]
        sm_90, gfx942 = aot.compile_all([case], [aot.TARGETS["sm_90"], aot.TARGETS["gfx942"]])
        assert isinstance(sm_90, aot.AotReport), str(sm_90)
        assert sm_90.widest_load == 16 and sm_90.spills == 0, (sm_90.loads, sm_90.spills)
        assert any(load.startswith("ld.global.v4") for load in sm_90.loads), sm_90.loads
        assert isinstance(gfx942, aot.AotReport), str(gfx942)
        assert any(load.endswith("_load_dwordx4") for load in gfx942.loads), gfx942.loads
