"""benchmarks/gpu_check.sh's logic on the CPU (GPU_CHECK_DEVICE=cpu: no install, gloo for the
collectives, the benchmarks' CPU shapes), one run shared by the tests: it ends before its
deadline, writes at most 8 files, runs the steps in order, and each benchmark's JSON says
how far it got. Also: the training benchmark's figures and options, a kernel benchmark
killed midway keeping the cases it finished, and the plots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from eurocore.__main__ import main as eurocore_main
from eurocore.benchmarks import harness, plot
from eurocore.benchmarks import train as train_bench
from eurocore.benchmarks.__main__ import OPS
from eurocore.benchmarks.__main__ import main as bench_main
from eurocore.model.config import preset
from eurocore.train.config import field_specs

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 150
# The attention and kernel benchmarks stop themselves at their own deadlines (7 s in, their
# caps being 12 s); the other steps end on their own, well within caps that leave room for
# a loaded machine; the tests get the time left before the overall deadline (their cap,
# 600 s by default, is far more). About 40 s in all on an idle 2-core machine.
CHECK_ENV = {"GPU_CHECK_DEVICE": "cpu", "DEADLINE": str(DEADLINE), "ATTENTION_CAP": "12",
             "TRAIN_CAP": "60", "KERNELS_CAP": "12", "KERNEL_OPS": "rotary rms_norm",
             "NCCL_CAP": "30", "HOST_CAP": "40",
             "HOST_ARGS": "--ops rms_norm --compile-backend eager --calls 20 --repeats 1",
             "TEST_PATHS": "tests/train/test_distributed.py", "OMP_NUM_THREADS": "1"}
STEPS = ["environment", "install", "train", "attention", "tune", "kernels", "host",
         "collectives", "tests"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the test session's interpreter switches (what a user has)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "EUROCORE_CUDA_EMULATION")}
    return {**env, "PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """(OUTDIR, seconds taken, printed output, exit status) of one CPU run of the check."""
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
                            env=_clean_env(**CHECK_ENV), capture_output=True, text=True,
                            timeout=DEADLINE + 60)
    return out, time.monotonic() - started, result.stdout + result.stderr, result.returncode


def test_check_ends_in_time_with_at_most_8_files(check):
    out, seconds, printed, status = check
    assert status == 0, printed[-3000:]
    assert seconds < DEADLINE + 5, printed[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert set(files) == {"gpu_check.log", "environment.txt", "summary.json",
                          "attention.json", "train.json", "kernels.json", "host.json",
                          "tests.xml"}, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_status"] == 0 and summary["elapsed_s"] <= DEADLINE
    assert "GPU_CHECK_DEVICE=cpu" in summary["cpp_extension"]
    assert "pytest-xdist" in (out / "environment.txt").read_text()


def test_steps_run_in_order_most_valuable_first(check):
    out, _, _, _ = check
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert steps["install"]["status"] == "skipped: cpu"
    assert steps["tune"]["status"].startswith("skipped")  # opt-in: TUNE_CAP 0 by default
    for name in ("train", "attention", "kernels", "host", "collectives", "tests"):
        assert steps[name]["status"] == "ok", steps[name]
        assert steps[name]["seconds"] <= steps[name]["limit_s"] + 1, steps[name]
    # the last step's limit is the time left, less the kill grace (5 s) and the summary's 3
    log = (out / "gpu_check.log").read_text()
    started, limit = map(int, re.search(r"== tests \(at (\d+) s; at most (\d+) s\)",
                                        log).groups())
    assert DEADLINE - started - 8 <= limit <= DEADLINE - started - 7
    assert log.index("== train") < log.index("== attention") < log.index("== kernels") \
        < log.index("== host") < log.index("== collectives") < log.index("== tests")
    assert (out / "train.json").stat().st_mtime <= (out / "attention.json").stat().st_mtime
    assert "gloo" in log and "broadcast, barrier, destroy: ok" in log
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0


@pytest.mark.parametrize("step, ops", [("attention", {"attention"}),
                                       ("kernels", {"rotary", "rms_norm"})])
def test_benchmarks_stopped_themselves_at_their_deadline(check, step, ops):
    """Each kernel benchmark step had 7 s: it measured what it could (some cases on an idle
    machine), listed the rest as not run, and its JSON says so (the summary reads the JSON's
    own status). The kernels step times the backward first."""
    out, _, _, _ = check
    data = json.loads((out / f"{step}.json").read_text())
    assert data["status"] == "deadline"
    assert {r["op"] for r in data["results"]} <= ops
    assert any(s["status"] == harness.NOT_RUN for s in data["skipped"])
    steps = {s["step"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps[step]["result_status"] == "deadline"
    if step == "kernels" and data["results"]:
        assert data["results"][0]["variant"] == "bwd"
        assert {r["variant"] for r in data["results"]} <= {"bwd", "fwd"}


def test_train_benchmark_json(check):
    """The CPU run of the training benchmark (--quick: the tiny model, 3 steps, 1 warm-up):
    every recompute setting TrainConfig accepts is planned, none first; each setting run
    has tokens/s, and no MFU or GPU memory on a CPU."""
    out, _, _, _ = check
    data = json.loads((out / "train.json").read_text())
    assert data["benchmark"] == "train" and data["status"] in ("complete", "deadline")
    assert data["environment"]["is_cpu"]
    choices = train_bench.recompute_choices()
    assert {"none", "full"} <= set(choices)
    assert data["settings"][0]["recompute"] == "none"
    assert {s["recompute"] for s in data["settings"]} == set(choices)
    assert len(data["results"]) + len(data["not_run"]) == len(data["settings"])
    assert data["results"], data
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["model"] == "tiny" and row["steps"] == 3 and row["timed_steps"] == 2
        assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0
        assert row["tokens_per_s"] == pytest.approx(
            row["tokens_per_step"] / (row["step_ms_mean"] / 1e3))
        assert row["mfu"] is None and row["peak_tflops"] is None
        assert row["max_allocated_gib"] is None and row["max_reserved_gib"] is None
        assert row["tokens_per_step"] == row["batch_size"] * row["seq_len"]


def test_recompute_settings_are_the_configs():
    spec = next(s for s in field_specs() if s.name == "recompute")
    assert train_bench.recompute_choices() == tuple(spec.choices)


def test_layers_cut_to_fit_the_device():
    """llama3-8b at 4 x 4096 tokens on an H200 (141 GB): some but not all of its 32 layers;
    more memory, more layers; llama-1b stays whole; too little memory still gives 1."""
    h200 = 150_100_000_000
    eight_b, one_b = preset("llama3-8b"), preset("llama-1b")
    layers = train_bench.fit_layers(eight_b, 4096, 4, h200)
    assert 4 <= layers < 32
    assert train_bench.fit_layers(eight_b, 4096, 4, 2 * h200) > layers
    assert train_bench.fit_layers(one_b, 2048, 8, h200) == 16
    assert train_bench.fit_layers(eight_b, 4096, 4, 1 << 30) == 1
    settings = train_bench.plan({"llama-1b": (2048, 4096), "llama3-8b": (4096,)},
                                ["none", "full"], 16384, h200)
    assert [(s.model, s.seq_len, s.recompute) for s in settings] == [
        ("llama-1b", 2048, "none"), ("llama-1b", 4096, "none"), ("llama3-8b", 4096, "none"),
        ("llama-1b", 2048, "full"), ("llama-1b", 4096, "full"), ("llama3-8b", 4096, "full")]
    assert [s.batch_size for s in settings[:3]] == [8, 4, 4]
    assert settings[2].layers_cut and settings[2].num_layers == layers


@pytest.mark.parametrize("argv, option", [
    (["--recompute", "sometimes"], "--recompute"),
    (["--steps", "2", "--warmup", "2"], "--warmup"),
    (["--seq-lens", "100000"], "--seq-lens"),
])
def test_train_benchmark_rejects_bad_options(argv, option, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_bench.main(["--device", "cpu", "--json", str(tmp_path / "t.json"), *argv])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_killed_kernel_benchmark_keeps_the_cases_it_finished(tmp_path):
    """The JSON is rewritten after every case: killed (SIGKILL) in the middle of an op, the
    file is whole and holds the cases measured so far, with status "running"."""
    path = tmp_path / "kernels.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "eurocore.benchmarks", "--device", "cpu", "--quick", "--ops",
         "rms_norm", "--json", str(path)], env=_clean_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() and len(json.loads(path.read_text())["results"]) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the benchmark ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    data = json.loads(path.read_text())
    assert data["status"] == "running"
    assert len(data["results"]) >= 2 and {r["op"] for r in data["results"]} == {"rms_norm"}
    assert all(r["ms"] > 0 for r in data["results"])
    assert [p.name for p in tmp_path.iterdir()] == ["kernels.json"]  # no temporary left


def test_plot_flag_draws_a_png_per_op(tmp_path, capsys, monkeypatch):
    """--plot after a CPU run of two ops (two cases each, to be quick): one non-empty PNG
    per op, beside the JSON, named after it."""
    for op in ("rms_norm", "rotary"):
        cases = OPS[op]
        monkeypatch.setitem(OPS, op, lambda device, quick, cases=cases: [
            c for c in cases(device, quick) if c.skip is None][:2])
    path = tmp_path / "bench.json"
    assert bench_main(["--device", "cpu", "--quick", "--ops", "rms_norm,rotary", "--json",
                       str(path), "--plot"]) == 0
    printed = capsys.readouterr().out
    for op in ("rms_norm", "rotary"):
        png = tmp_path / f"bench-{op}.png"
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert f"plot written to {png}" in printed


def _kernel_results() -> dict:
    def row(op, variant, shape, impl, fraction, flops):
        return {"op": op, "variant": variant, "shape": shape, "dtype": "bfloat16", "impl": impl,
                "copy_fraction": fraction, "matmul_fraction": fraction if flops else None}

    rows = [row("rms_norm", v, {"tokens": t, "hidden": 4096}, impl, f, False)
            for v in ("fwd", "bwd") for t in (4096, 16384)
            for impl, f in (("eurocore/triton", 0.9), ("torch eager", 0.6))]
    rows.append(row("rms_norm", "fwd", {"tokens": 65536, "hidden": 4096}, "torch eager", 0.7,
                    False))  # a shape one implementation lacks: a gap in its line
    rows += [row("attention", "fwd", {"seq": s, "causal": c}, "sdpa/flash", 0.5, True)
             for s in (4096, 16384) for c in (0, 1)]
    return {"schema": 3, "status": "complete", "results": rows, "skipped": [],
            "ceilings": {"copy_gbps": 4000.0, "matmul_tflops": 750.0},
            "environment": {"device_name": "NVIDIA H200", "is_cpu": False, "torch": "2.11",
                            "date": "2030-01-01"}}


def test_plot_results_one_png_per_op_and_the_train_json(check, tmp_path):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(_kernel_results()))
    paths = plot.plot_results(source, tmp_path / "plots")
    assert [p.name for p in paths] == ["run-rms_norm.png", "run-attention.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths)
    assert plot.shape_labels([{"seq": 4096, "causal": 0}, {"seq": 4096, "causal": 1}]) == \
        ["causal=0", "causal=1"]
    out, _, _, _ = check
    (train_png,) = plot.plot_results(out / "train.json", tmp_path / "plots")
    assert train_png.name == "train.png" and train_png.read_bytes().startswith(PNG_MAGIC)
    unrelated = tmp_path / "other.json"
    unrelated.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not the results of a eurocore benchmark"):
        plot.plot_results(unrelated, tmp_path)
    # the CLI: a file is benchmark results, PNGs beside it (or in -o DIR)
    assert eurocore_main(["plot", str(source)]) == 0
    assert (tmp_path / "run-attention.png").read_bytes().startswith(PNG_MAGIC)
    assert eurocore_main(["plot", str(source), "-o", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "run-rms_norm.png").exists()
