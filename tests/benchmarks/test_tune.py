"""The tile sweep's logic (benchmarks/tune.py) on the CPU: the pinned configuration is the
reference, a candidate that changes the output is marked wrong, a failing one is a row with
its error, none starts after the deadline, and every row reaches the sink as it ends. The
sweeps over the real kernels need a GPU (gpu_check.sh's opt-in tune step)."""

import contextlib
import time

import torch

from eurocore.benchmarks import harness, tune

CPU = torch.device("cpu")


def _sweep(candidates, deadline=None):
    """A sweep whose "kernel" returns its configuration's value times a vector; a
    configuration of None raises."""
    config = {}

    @contextlib.contextmanager
    def apply(value):
        config["value"] = value
        yield

    def make_run():
        if config["value"] is None:
            raise RuntimeError("does not compile\nsecond line")
        vector = torch.arange(1.0, 5.0) * config["value"]
        return lambda: (vector.clone(),)

    sunk = []
    rows = tune.sweep("op", "case", make_run, candidates, apply, CPU, deadline=deadline,
                      sink=sunk.append)
    return rows, sunk


def test_sweep_checks_each_candidate_against_the_pinned_one():
    rows, sunk = _sweep([1.0, 1.001, 2.0, None])
    assert sunk == rows and [r["config"] for r in rows] == ["1.0", "1.001", "2.0", "None"]
    assert rows[0]["ok"] and rows[0]["rel_err"] == 0.0
    assert rows[1]["ok"] and 0 < rows[1]["rel_err"] < 2e-2
    assert not rows[2]["ok"] and rows[2]["rel_err"] > 0.5
    assert rows[3]["error"] == "RuntimeError: does not compile" and "ms" not in rows[3]
    assert all(r["ms"] >= 0 and r["host_ms"] >= 0 for r in rows[:3])


def test_sweep_starts_nothing_after_its_deadline():
    rows, sunk = _sweep([1.0, 2.0], deadline=time.monotonic() - 1)
    assert sunk == rows
    assert [r.get("status") for r in rows] == [harness.NOT_RUN, harness.NOT_RUN]
    assert all("ms" not in r for r in rows)
