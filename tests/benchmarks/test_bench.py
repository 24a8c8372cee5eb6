"""The benchmark harness end to end on the CPU: a pytest-benchmark timing, and the CLI's
JSON checked for self-consistency (bytes, times, GB/s and ceiling fractions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eurocore.benchmarks import harness
from eurocore.benchmarks.__main__ import main as bench_main
from eurocore.ops import rms_norm, rms_norm_reference


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


@pytest.mark.slow
def test_cli_quick_writes_consistent_json(tmp_path, capsys):
    assert bench_main(["--quick", "--ops", "rms_norm", "--out", str(tmp_path)]) == 0
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
    assert {r["impl"] for r in rows} >= {"torch eager"}
    assert any(r["impl"].startswith("eurocore/") for r in rows)
    assert {r["variant"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["op"] == "rms_norm"
        assert r["bytes"] > 0 and r["ms"] > 0, r
        assert math.isclose(r["gbps"], r["bytes"] / r["ms"] / 1e6, rel_tol=1e-9), r
        assert math.isclose(r["copy_fraction"], r["gbps"] / ceilings["copy_gbps"],
                            rel_tol=1e-9), r
    assert not [s for s in data["skipped"] if s["status"] == "failed"], data["skipped"]
