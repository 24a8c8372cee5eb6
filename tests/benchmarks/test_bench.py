"""The benchmark harness end to end on the CPU: a pytest-benchmark timing, the CLI's JSON
checked for self-consistency (bytes, FLOPs, times, GB/s, TFLOP/s and ceiling fractions), and
each op's cases (the rotary and attention baselines compute what eurocore computes)."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess

import pytest
import torch

from eurocore.benchmarks import attention, harness, rotary, swiglu
from eurocore.benchmarks.__main__ import main as bench_main
from eurocore.ops import apply_rotary_reference, rms_norm, rms_norm_reference, swiglu_reference
from eurocore.ops.attention import attention_reference


def test_rms_norm_forward_torch_backend(benchmark):
    """pytest-benchmark times the torch backend's forward on a tiny shape; the output is
    the reference's, bit for bit (the torch backend is the reference)."""
    x = torch.randn(7, 1025)
    w = torch.randn(1025)
    y = benchmark(rms_norm, x, w, 1e-5, backend="torch")
    assert torch.equal(y, rms_norm_reference(x, w, 1e-5))


def test_write_json_is_atomic_and_named_by_date_and_device(tmp_path):
    env = {"device_name": "NVIDIA H100 80GB HBM3", "is_cpu": False, "date": "2030-01-02"}
    ceilings = {"copy_gbps": 100.0, "matmul_tflops": 1.0}
    path = harness.write_json([], ceilings, env, tmp_path)
    assert path == tmp_path / "2030-01-02-nvidia-h100-80gb-hbm3.json"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert json.loads(path.read_text())["ceilings"] == ceilings


# The baseline each op is measured beside, present in every run.
_BASELINES = {"rms_norm": "torch eager", "rotary": "torch eager", "swiglu": "torch eager",
              "attention": "sdpa/flash" if torch.cuda.is_available() else "sdpa/math"}
# Ops that count FLOPs (TFLOP/s against the matmul rate) besides bytes.
_FLOP_OPS = {"attention"}


@pytest.mark.slow
@pytest.mark.parametrize("op", ["rms_norm", "rotary", "attention", "swiglu"])
def test_cli_quick_writes_consistent_json(op, tmp_path, capsys):
    assert bench_main(["--quick", "--ops", op, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())

    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["device_name"]
    if env["is_cpu"]:
        assert "NOT GPU performance" in printed
        assert "cpu" in files[0].stem.split("-")  # never mistaken for a GPU result
    assert env["date"] in files[0].name

    ceilings = data["ceilings"]
    assert ceilings["copy_gbps"] > 0
    assert ceilings["matmul_tflops"] > 0

    rows = data["results"]
    assert {r["impl"] for r in rows} >= {_BASELINES[op]}
    assert any(r["impl"].startswith("eurocore/") for r in rows)
    assert {r["variant"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["op"] == op
        assert r["bytes"] > 0 and r["ms"] > 0, r
        assert math.isclose(r["gbps"], r["bytes"] / r["ms"] / 1e6, rel_tol=1e-9), r
        assert math.isclose(r["copy_fraction"], r["gbps"] / ceilings["copy_gbps"],
                            rel_tol=1e-9), r
        if op in _FLOP_OPS:  # TFLOP/s = FLOPs / time; fraction of the measured matmul rate
            assert r["flops"] > 0, r
            assert math.isclose(r["tflops"], r["flops"] / (r["ms"] * 1e-3) / 1e12,
                                rel_tol=1e-9), r
            assert math.isclose(r["matmul_fraction"], r["tflops"] / ceilings["matmul_tflops"],
                                rel_tol=1e-9), r
        else:
            assert r["flops"] is None and r["tflops"] is None, r
    if op in _FLOP_OPS:
        assert "TFLOP/s" in printed and "%matmul" in printed
    assert not [s for s in data["skipped"] if s["status"] == "failed"], data["skipped"]


def _rotary_eager_cases(variant):
    found = [c for c in rotary.cases("cpu", quick=True)
             if c.impl == "torch eager" and c.variant == variant]
    assert found, f"no torch eager {variant} case on the CPU"
    return found


def test_rotary_cpu_cases():
    """CPU: float32, the torch backend (auto's choice there), torch eager, GPU-only
    implementations listed as skipped, torch.compile skipped only with quick."""
    cases = rotary.cases("cpu", quick=True)
    run = [c for c in cases if c.skip is None]
    assert {c.impl for c in run} == {"eurocore/torch", "torch eager"}
    assert {c.variant for c in run} == set(rotary.VARIANTS)
    assert {c.shape["seq"] * c.shape["batch"] for c in run} == set(rotary.CPU_TOKENS)
    assert all(c.dtype == "float32" and c.setup is not None for c in run)
    skipped = {c.impl: c.skip for c in cases if c.skip is not None}
    assert skipped["liger"] == skipped["flash-attn"] == "GPU-only implementation"
    assert "quick" in skipped["torch.compile"]
    assert "torch.compile" in {c.impl for c in rotary.cases("cpu", quick=False)}


def test_rotary_case_bytes_are_the_fewest():
    """Bytes: q and k read and written once, plus the fp32 cos/sin rows used, once; the
    backward moves as much, fwd+bwd the sum. The GPU grid is listed (not run) here too."""
    cases = rotary.cases("cuda", quick=False)
    run = [c for c in cases if c.skip is None]
    assert {(c.shape["batch"], c.shape["seq"]) for c in cases if c.shape} == {
        (1, 4096), (4, 4096), (16, 4096)}
    for c in cases:
        if not c.shape:
            continue
        assert c.dtype == "bfloat16"
        assert (c.shape["q_heads"], c.shape["k_heads"], c.shape["head_dim"]) == (32, 8, 128)
        tokens = c.shape["batch"] * c.shape["seq"]
        one_pass = tokens * (32 + 8) * 128 * 2 * 2 + 4096 * 64 * 4 * 2
        assert c.bytes == (2 * one_pass if c.variant == "fwd+bwd" else one_pass), c
    assert {c.variant for c in run} <= set(rotary.VARIANTS)
    assert rotary.fwd_bytes(256, 256, 8, 2, 128, 4) == 2 * 256 * 10 * 128 * 4 + 2 * 256 * 64 * 4


def _record_inputs(monkeypatch, module) -> list:
    """Wraps ``module.make_inputs`` so that every set of inputs a case's setup makes is
    appended to the returned list."""
    inputs = []
    make_inputs = module.make_inputs

    def recording(*args, **kwargs):
        made = make_inputs(*args, **kwargs)
        inputs.append(made)
        return made

    monkeypatch.setattr(module, "make_inputs", recording)
    return inputs


def test_rotary_eager_baseline_computes_what_eurocore_computes(monkeypatch):
    """Each CPU torch-eager forward case, run through its own setup, returns the rotation of
    its inputs that eurocore's reference computes (fp32 tolerance); the backward cases run
    and return gradients shaped like q and k."""
    inputs = _record_inputs(monkeypatch, rotary)
    for case in _rotary_eager_cases("fwd"):
        inputs.clear()
        out_q, out_k = case.setup()()
        ((q, k, cos, sin),) = inputs
        assert q.shape == (case.shape["batch"], case.shape["seq"], case.shape["q_heads"],
                           case.shape["head_dim"])
        ref_q, ref_k = apply_rotary_reference(q, k, cos, sin)
        assert not torch.equal(ref_q, q)  # the rotation does something at these positions
        torch.testing.assert_close(out_q, ref_q, rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(out_k, ref_k, rtol=1.3e-6, atol=1e-5)
    for variant in ("bwd", "fwd+bwd"):
        for case in _rotary_eager_cases(variant):
            inputs.clear()
            dq, dk = case.setup()()
            ((q, k, _, _),) = inputs
            assert dq.shape == q.shape and dk.shape == k.shape
            assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_rotary_hf_tables_duplicate_the_half_width_table():
    cos, sin = torch.randn(9, 4), torch.randn(9, 4)
    full_cos, full_sin = rotary.hf_tables(cos, sin, 7, torch.float16)
    assert full_cos.shape == full_sin.shape == (1, 7, 8)
    assert full_cos.dtype == torch.float16
    assert torch.equal(full_cos[0, :, 4:], cos[:7].half())
    assert torch.equal(full_sin[0, :, :4], sin[:7].half())


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def test_attention_cpu_cases_run():
    """CPU: float32 at the CPU shapes, eurocore's auto backend (torch, the reference, on the
    CPU) and SDPA's math backend for every variant; the GPU implementations listed as
    skipped. Each case's setup builds its inputs, and the callable it returns runs."""
    cases = attention.cases("cpu", quick=True)
    run = [c for c in cases if c.skip is None]
    assert {c.impl for c in run} == {"eurocore/torch", "sdpa/math"}
    assert {c.variant for c in run} == set(attention.VARIANTS)
    for impl, variant in itertools.product(("eurocore/torch", "sdpa/math"), attention.VARIANTS):
        assert [c.shape for c in run if (c.impl, c.variant) == (impl, variant)] == \
            attention.cpu_shapes()
    assert {c.shape["seq"] for c in run} == set(attention.CPU_SEQLENS)
    assert {c.shape["causal"] for c in run} == {0, 1}
    assert all(c.dtype == "float32" and c.flops and c.bytes for c in run)
    skipped = {c.impl: c.skip for c in cases if c.skip is not None}
    assert skipped == dict.fromkeys(("sdpa/flash", "sdpa/cudnn", "flash-attn"),
                                    "GPU-only implementation")
    for case in run:
        result = case.setup()()
        outputs = result if isinstance(result, tuple) else (result,)
        assert all(torch.isfinite(t).all() for t in outputs), case
        b, s, h, d = (case.shape[k] for k in ("batch", "seq", "heads", "head_dim"))
        assert all(t.numel() == b * s * h * d for t in outputs), case  # out, or dq, dk, dv


def test_attention_flops_and_bytes_are_hand_counted():
    """The quick GPU grid (listed, not run: no GPU needed), causal, batch 4 x seq 4096, 16
    heads of 128: forward 4·b·h·s²·d / 2 FLOPs, backward 2.5x, both 3.5x; bytes q, k, v, out
    (forward) and q, k, v, out, dout, dq, dk, dv plus the fp32 lse (backward), bf16."""
    cases = [c for c in attention.cases("cuda", quick=True) if c.shape]
    runnable = [c for c in cases if c.skip is None]  # every implementation counts alike
    causal = {c.variant: c for c in runnable
              if c.shape["causal"] and c.shape["heads"] == c.shape["kv_heads"]}
    assert causal["fwd"].shape == {"batch": 4, "seq": 4096, "heads": 16, "kv_heads": 16,
                                   "head_dim": 128, "causal": 1}
    fwd = 274_877_906_944  # 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    assert causal["fwd"].flops == fwd
    assert causal["bwd"].flops == 687_194_767_360  # 2.5 x
    assert causal["fwd+bwd"].flops == 962_072_674_304  # 3.5 x
    tensor = 4 * 4096 * 16 * 128 * 2  # one (b, s, h, d) bf16 tensor: 64 MiB
    assert causal["fwd"].bytes == 4 * tensor
    assert causal["bwd"].bytes == 8 * tensor + 4 * 16 * 4096 * 4
    assert causal["fwd+bwd"].bytes == 12 * tensor + 4 * 16 * 4096 * 4
    full = next(c for c in runnable if not c.shape["causal"] and c.variant == "fwd")
    assert full.flops == 2 * fwd
    assert attention.attention_flops(2, 4, 128, 128, 64, False, "fwd") == 33_554_432


def test_attention_quick_gpu_grid_runs_shape_by_shape():
    """--quick on a GPU: MHA at seq 4096 (as the earlier H100 runs), then Llama's GQA (32
    query heads, 8 kv heads of 128) at 4096 tokens causal and not, and 16384 causal, 16384
    tokens per batch; every variant of a shape listed before the next shape, so a run cut
    at its deadline holds whole shapes."""
    runnable = [c for c in attention.cases("cuda", quick=True) if c.skip is None]
    shapes = list(dict.fromkeys(tuple(c.shape.values()) for c in runnable))
    assert shapes == [(4, 4096, 16, 16, 128, 0), (4, 4096, 16, 16, 128, 1),
                      (4, 4096, 32, 8, 128, 0), (4, 4096, 32, 8, 128, 1),
                      (1, 16384, 32, 8, 128, 1)]
    order = [shapes.index(tuple(c.shape.values())) for c in runnable]
    assert order == sorted(order)
    for shape in shapes:
        assert {c.variant for c in runnable if tuple(c.shape.values()) == shape} == \
            set(attention.VARIANTS)


def test_attention_gpu_grid():
    """16384 tokens per batch, hidden 2048 (32 heads of 64, 16 of 128), MHA, causal and not,
    seq 1024 .. 16384, bf16, plus one GQA point; every variant for each implementation."""
    listed = attention.cases("cuda", quick=False)
    # eurocore: runnable on a GPU, or listed as skipped (the interpreter is not benchmarked)
    assert any(c.impl.startswith("eurocore/") for c in listed)
    cases = [c for c in listed if c.shape]
    shapes = {tuple(c.shape.values()) for c in cases}
    mha = {(16384 // s, s, 2048 // d, 2048 // d, d, causal) for s in attention.GPU_SEQLENS
           for d in (64, 128) for causal in (0, 1)}
    assert shapes == mha | {(4, 4096, 16, 4, 128, 1)}
    assert all(c.dtype == "bfloat16" for c in cases)
    by_impl: dict[str, int] = {}
    for c in cases:  # cuDNN's cases become memory-efficient ones where cuDNN cannot run
        impl = "sdpa/cudnn" if c.impl == "sdpa/efficient" else c.impl
        by_impl[impl] = by_impl.get(impl, 0) + 1
    assert {"sdpa/flash", "sdpa/cudnn"} <= set(by_impl)
    assert all(n == len(shapes) * 3 for n in by_impl.values()), by_impl


def test_attention_sdpa_baseline_computes_what_eurocore_computes(monkeypatch):
    """Each CPU sdpa/math forward case, run through its own setup, returns the attention of
    its inputs that eurocore's reference computes (fp32 tolerance), causal or not."""
    inputs = _record_inputs(monkeypatch, attention)
    found = [c for c in attention.cases("cpu", quick=True)
             if c.impl == "sdpa/math" and c.variant == "fwd"]
    assert {c.shape["causal"] for c in found} == {0, 1}
    for case in found:
        inputs.clear()
        out = case.setup()()
        ((q, k, v),) = inputs
        ref, _ = attention_reference(q, k, v, causal=bool(case.shape["causal"]))
        torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_name", ["rms_norm", "rotary"])
def test_gpu_cases_show_cuda_next_to_triton(module_name, monkeypatch):
    """On a GPU both kernel backends get rows; one that cannot run is listed as skipped with
    its reason (cases are only listed here, nothing runs)."""
    import importlib

    import eurocore.ops.backends as backends

    module = importlib.import_module(f"eurocore.benchmarks.{module_name}")
    monkeypatch.setattr(backends, "backend_status",
                        lambda name: backends.BackendStatus(name != "cuda", "not built here"))
    listed = module.cases("cuda", quick=True)
    runnable = {c.impl for c in listed if c.skip is None}
    skipped = {c.impl: c.skip for c in listed if c.skip is not None}
    assert "eurocore/triton" in runnable
    assert skipped["eurocore/cuda"] == "not built here"
    monkeypatch.setattr(backends, "backend_status",
                        lambda name: backends.BackendStatus(True, "available"))
    runnable = {c.impl for c in module.cases("cuda", quick=True) if c.skip is None}
    assert {"eurocore/triton", "eurocore/cuda"} <= runnable


def test_swiglu_cases(monkeypatch):
    """CPU: float32, the torch backend, torch eager, Liger listed as GPU-only, torch.compile
    skipped only with quick; each eager forward computes the op's reference. On a GPU: a
    Triton row and no cuda row (the op has no C++ kernel), Liger run or skipped with its
    reason; bytes are each input read and each output written once."""
    cases = swiglu.cases("cpu", quick=True)
    run = [c for c in cases if c.skip is None]
    assert {c.impl for c in run} == {"eurocore/torch", "torch eager"}
    assert {c.variant for c in run} == set(swiglu.VARIANTS)
    skipped = {c.impl: c.skip for c in cases if c.skip is not None}
    assert skipped["liger"] == "GPU-only implementation"
    assert "quick" in skipped["torch.compile"]
    assert "torch.compile" in {c.impl for c in swiglu.cases("cpu", quick=False)}
    (case,) = [c for c in run if c.impl == "torch eager" and c.variant == "fwd"
               and c.shape == {"tokens": 256, "intermediate": 1024}]
    assert case.bytes == 3 * 256 * 1024 * 4
    inputs = _record_inputs(monkeypatch, swiglu)
    out = case.setup()()
    ((gate, up),) = inputs
    torch.testing.assert_close(out, swiglu_reference(gate, up))

    listed = swiglu.cases("cuda", quick=True)
    impls = {c.impl for c in listed}
    assert "eurocore/triton" in impls and "eurocore/cuda" not in impls
    assert {"torch eager", "torch.compile", "liger"} <= impls
    bwd = [c for c in listed if c.variant == "bwd" and c.skip is None]
    assert bwd and all(c.bytes == 5 * 16384 * 14336 * 2 for c in bwd)


def test_environment_records_the_commit(tmp_path, monkeypatch):
    """Results say which code produced them: this checkout's commit (a test run is one), and
    None outside a git checkout."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit = harness.environment("cpu")["commit"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) and commit.startswith(head)
    monkeypatch.setattr(harness.subprocess, "run",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert harness.environment("cpu")["commit"] is None
