"""The host-overhead benchmark (``python -m eurocore.benchmarks host``) on the CPU: its JSON
has a row for every op x variant x implementation, with consistent ratios; the kernel-launch
stub it runs under launches nothing, and only inside its block. Nothing about speed is
asserted: these are CPU figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eurocore.benchmarks import host
from eurocore.benchmarks.__main__ import main as bench_main
from tests.conftest import DEVICE


def test_cli_writes_every_op_and_implementation(tmp_path, capsys):
    # torch.compile's "eager" backend: dynamo's host path without Inductor's C++ builds,
    # which would take minutes on this machine for no more coverage.
    status = bench_main(["host", "--calls", "2", "--repeats", "1", "--compile-backend", "eager",
                         "--out", str(tmp_path)])
    assert status == 0
    printed = capsys.readouterr().out
    files = list(tmp_path.glob("*-host.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == "host"
    assert data["environment"]["torch"] == torch.__version__
    assert data["goal"] == {"impl": "eurocore fast path", "max_ratio_to_torch_eager": 1.5}
    assert data["skipped"] == []

    ops = host.available_ops()
    assert {"rms_norm", "apply_rotary", "flash_attention", "swiglu"} <= set(ops)
    rows = {(r["op"], r["variant"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(op, variant, impl) for op in ops for variant in host.VARIANTS
                         for impl in host.IMPLS}
    for (op, variant, _), r in rows.items():
        assert r["host_us"] > 0, r
        eager = rows[(op, variant, "torch eager")]["host_us"]
        assert math.isclose(r["ratio_to_torch_eager"], r["host_us"] / eager, rel_tol=1e-12), r
        if DEVICE.type == "cpu":
            assert r["kernel_launch"].startswith("no-op"), r
    for op in ops:
        assert op in printed
    assert "goal <=1.5x" in printed and "fast/eager" in printed


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        host.main(["--ops", "rms_norm,nonsense", "--no-json"])
    assert exc.value.code == 2
    assert "--ops: unknown nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host.main(["--calls", "0", "--no-json"])


def test_no_kernel_launch_launches_nothing_inside_its_block_only():
    """Inside the block a launcher still runs to its launch and writes nothing; after it,
    the same launch writes the output again."""
    from eurocore.kernels import rms_norm as launchers

    x = torch.randn(3, 16, device=DEVICE)

    def launch() -> tuple[torch.Tensor, torch.Tensor]:
        y, rstd = torch.zeros_like(x), torch.zeros(3, device=DEVICE)
        launchers.rms_norm_fwd(x, None, None, 1e-5, False, y, None, rstd)
        return y, rstd

    with host.no_kernel_launch():
        y, rstd = launch()
    assert not y.any() and not rstd.any()
    y, rstd = launch()
    assert rstd.all()
    torch.testing.assert_close(y, x * rstd[:, None])
