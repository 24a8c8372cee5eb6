"""MFU (eurocore.train.metrics, ModelConfig.training_flops_per_token): the FLOPs per token
against a hand count and against PaLM's formula, the peak table by device name, and the
trainer's logged TFLOP/s and MFU. Where the metrics go: OUTPUT_DIR/metrics.jsonl (its
schema, a cut-short last line, a resume), TensorBoard, the console's elapsed time and ETA,
and ``eurocore plot``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import sys

import pytest
import torch

from eurocore.__main__ import main as eurocore_main
from eurocore.data import SyntheticSource
from eurocore.model import preset
from eurocore.train.checkpoint import versions
from eurocore.train.distributed import Process
from eurocore.train.metrics import (
    METRICS_FILE,
    Progress,
    device_peak,
    format_duration,
    peak_tflops,
    read_metrics,
)
from eurocore.train.plot import plot_run
from eurocore.train.trainer import TrainConfig, Trainer, train

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_flops_per_token_of_the_tiny_model_by_hand():
    # h 64 (8 heads of 8), k and v 32 wide (4 kv heads of 8), f 176, 2 layers, vocab 250,
    # s 128; forward per layer: q 2·64·64 + k, v 2·2·64·32 + out 2·64·64 + gate, up, down
    # 6·64·176 + attention 2·128·64; then the head 2·64·250
    per_layer = 8192 + 8192 + 8192 + 67584 + 16384
    forward = 2 * per_layer + 2 * 64 * 250
    assert preset("tiny").training_flops_per_token(128) == 3 * forward == 747_264


@pytest.mark.parametrize("name, seq_len", [("llama3-8b", 8192), ("llama-1b", 2048),
                                           ("eurollm-9b", 4096)])
def test_flops_per_token_is_palms_formula_with_causal_attention(name, seq_len):
    """6 x the parameters that multiply (no embedding lookup, no norm) + 6·L·s·h."""
    config = preset(name)
    norms = (2 * config.num_layers + 1) * config.hidden_size
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
    matmul = config.num_parameters() - norms - lookup
    expected = 6 * matmul + 6 * config.num_layers * seq_len * config.hidden_size
    assert config.training_flops_per_token(seq_len) == expected


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("AMD Instinct MI250X/MI250", 191.5), ("AMD Instinct MI300X", 1307.4),
    ("AMD Instinct MI325X", 1307.4), ("NVIDIA GeForce RTX 4090", None), ("", None),
])
def test_the_peak_table_by_device_name(device_name, peak):
    assert peak_tflops(device_name) == peak


def test_a_cpu_has_no_peak_unless_given():
    assert device_peak(torch.device("cpu")) == (None, "peak unknown: a CPU")
    assert device_peak(torch.device("cpu"), 2.5) == (2.5, "--peak-tflops")


@pytest.mark.parametrize("peak", [None, 1e-6])
def test_the_trainer_logs_tflops_and_mfu(peak):
    lines: list[str] = []
    config = TrainConfig(steps=3, batch_size=4, seq_len=32, log_every=1, data_workers=0,
                         eval_every=0, peak_tflops=peak)
    history = Trainer(config, CPU, log=lines.append).train()
    flops = preset("tiny").training_flops_per_token(32)
    for metrics in history:
        assert metrics["tflops_per_device"] == pytest.approx(metrics["tokens_per_s"] * flops
                                                             / 1e12)
        # in-process loading (no workers): every step waits for its batch
        assert 0 < metrics["data_wait_ms"] < metrics["step_ms"]
        assert metrics["max_allocated_gib"] is None and metrics["max_reserved_gib"] is None
        if peak is None:
            assert metrics["mfu"] is None
        else:
            assert metrics["mfu"] == pytest.approx(metrics["tflops_per_device"] / peak)
    steps = [line for line in lines if line.startswith("step ")]
    assert all(("MFU" in line) == (peak is not None) for line in steps), steps
    assert any(line.startswith("mfu: against 1e-06 TFLOP/s per device (--peak-tflops)")
               for line in lines) == (peak is not None)


def test_peak_tflops_must_be_positive():
    with pytest.raises(ValueError, match=r"^peak_tflops"):
        TrainConfig(peak_tflops=0.0)



# -------------------------------------------------------------------------------------------
# metrics.jsonl, TensorBoard, the console line, eurocore plot
# -------------------------------------------------------------------------------------------

# logged: steps 0 and 2 (log_every), 1 and 3 (validation, eval_every 2), 3 (the last)
RUN = {"steps": 4, "batch_size": 4, "seq_len": 32, "log_every": 2, "eval_every": 2,
       "eval_iters": 1, "data_workers": 0, "checkpoint_every": 0}
STEP_KEYS = {"step": int, "loss": float, "lr": float, "grad_norm": float,
             "tokens_per_s": float, "tokens_per_s_per_device": float,
             "tflops_per_device": float, "step_ms": float, "data_wait_ms": float,
             "elapsed_s": float}
DURATION = r"\d+s|\d+m\d\ds|\d+h\d\dm"


class _Validated(SyntheticSource):
    """The synthetic source with validation batches (other Markov batches), so that a
    run's valid_loss is recorded."""

    def validation_batch(self, index, rows=slice(None)):
        return self.global_batch(10**6 + index, rows)


def _source(config: TrainConfig) -> _Validated:
    return _Validated(config.model_config().vocab_size, config.batch_size, config.seq_len)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run in an output directory: (directory, config, history, console lines)."""
    directory = tmp_path_factory.mktemp("run")
    config = TrainConfig(**RUN, output_dir=str(directory))
    lines: list[str] = []
    history = Trainer(config, CPU, log=lines.append, data=_source(config)).train()
    return directory, config, history, lines


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "step"]


def test_metrics_jsonl_starts_with_the_run(run):
    directory, config, _, lines = run
    first = json.loads((directory / METRICS_FILE).read_text().splitlines()[0])
    assert first["kind"] == "run"
    assert first["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    assert first["model_config"] == dataclasses.asdict(config.model_config())
    layout = first["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["sequence_parallel"]) == \
        (1, 1, 1, False)
    assert first["world_size"] == 1 and first["device"].startswith("cpu")
    assert (first["peak_tflops"], first["peak_source"]) == (None, "peak unknown: a CPU")
    assert first["versions"] == versions()
    assert set(first["versions"]) == {"eurocore", "torch", "triton", "python"}
    assert (first["start_step"], first["resumed"]) == (0, False)
    started = dt.datetime.fromisoformat(first["start_time"])
    assert abs(dt.datetime.now(dt.timezone.utc) - started) < dt.timedelta(minutes=10)
    assert f"metrics: {directory / METRICS_FILE} (" in "\n".join(lines)


def test_metrics_jsonl_has_one_line_per_logged_step_as_returned(run):
    directory, _, history, _ = run
    records = read_metrics(directory / METRICS_FILE)
    assert [r["kind"] for r in records] == ["run", "step", "step", "step", "step"]
    steps = _steps(records)
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert steps == [{"kind": "step", **m} for m in history]  # every key, every value
    for record in steps:
        for key, kind in STEP_KEYS.items():
            assert type(record[key]) is kind, (key, record)
        assert record["mfu"] is None  # a CPU: no peak
        assert record["tokens_per_s_per_device"] == record["tokens_per_s"]  # one device
        assert record["max_allocated_gib"] is None and record["max_reserved_gib"] is None
    assert [("valid_loss" in r) for r in steps] == [False, True, False, True]
    assert all(type(r["valid_loss"]) is float for r in steps if "valid_loss" in r)


def test_the_reader_skips_a_cut_short_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / METRICS_FILE
    whole = [{"kind": "run", "start_step": 0}, {"kind": "step", "step": 0, "loss": 5.5}]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    path.write_text(text + '{"kind": "step", "step": 1, "lo')  # killed while writing
    assert read_metrics(path) == whole
    path.write_text(text + "{not json\n" + json.dumps(whole[1]) + "\n")
    with pytest.raises(ValueError, match=r"^metrics: .*metrics\.jsonl'.*: line 3 is not a "
                                         r"JSON object"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"^RUN_DIR: '.*nothing.jsonl' is missing"):
        read_metrics(tmp_path / "nothing.jsonl", arg="RUN_DIR")


def test_a_resume_keeps_the_steps_before_it_and_logs_the_rest_once(tmp_path):
    """A run killed after its checkpoint of step 3 had logged steps 3 to 5 and half a line;
    resumed from step 3, the file holds each step once: the first run's 0 to 2, a run line,
    the resumed run's 3 to 5 (and TensorBoard shows each step once too)."""
    config = TrainConfig(**{**RUN, "steps": 6, "log_every": 1, "eval_every": 0,
                            "checkpoint_every": 3, "keep_last": 0},
                         output_dir=str(tmp_path))
    first = train(config, CPU, log=lambda _: None)
    path = tmp_path / METRICS_FILE
    with path.open("a") as f:
        f.write('{"kind": "step", "step": 6, "loss"')
    resumed = train(dataclasses.replace(config, checkpoint_every=0,
                                        resume=str(tmp_path / "checkpoints" / "step-00000003")),
                    CPU, log=lambda _: None)
    assert [m["step"] for m in resumed] == [3, 4, 5]
    records = read_metrics(path)
    assert [(r["kind"], r.get("step", r.get("start_step"))) for r in records] == [
        ("run", 0), ("step", 0), ("step", 1), ("step", 2), ("run", 3), ("step", 3),
        ("step", 4), ("step", 5)]
    assert records[4]["resumed"] is True
    steps = _steps(records)
    assert steps[:3] == [{"kind": "step", **m} for m in first[:3]]
    assert steps[3:] == [{"kind": "step", **m} for m in resumed]
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))


def test_tensorboard_events_hold_the_logged_scalars(run):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    directory, _, history, _ = run
    events = accumulator.EventAccumulator(str(directory / "tensorboard"))
    events.Reload()
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"),
                     ("speed/tokens_per_s", "tokens_per_s")]:
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (m["step"], pytest.approx(m[key], rel=1e-6)) for m in history], tag
    assert [e.step for e in events.Scalars("valid/loss")] == [1, 3]
    assert "speed/mfu" not in events.Tags()["scalars"]  # None: no scalar


def test_tensorboard_can_be_turned_off(tmp_path):
    lines: list[str] = []
    config = TrainConfig(**{**RUN, "steps": 1, "eval_every": 0}, output_dir=str(tmp_path),
                         tensorboard=False)
    Trainer(config, CPU, log=lines.append).train()
    assert not (tmp_path / "tensorboard").exists()
    assert len(_steps(read_metrics(tmp_path / METRICS_FILE))) == 1
    assert f"metrics: {tmp_path / METRICS_FILE} (TensorBoard off)" in lines


def test_no_output_directory_no_metrics_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    Trainer(TrainConfig(**{**RUN, "steps": 1, "eval_every": 0}), CPU, log=lines.append).train()
    assert list(tmp_path.iterdir()) == []
    assert not any(line.startswith("metrics:") for line in lines)


def test_the_console_line_gives_elapsed_time_and_eta(run):
    _, _, _, lines = run
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4
    for line in steps[:-1]:
        assert re.search(rf"\| ({DURATION}) elapsed, eta ({DURATION})$", line), line
    assert re.search(rf"\| ({DURATION}) elapsed$", steps[-1]), steps[-1]  # the last: no ETA


def test_progress_times_the_steps_after_the_first_logged_one():
    progress = Progress(first_step=0, steps=10, start=100.0)
    assert progress.update(0, now=105.0) == (5.0, 45.0)  # warm-up: nothing better yet
    assert progress.update(4, now=109.0) == (9.0, 5.0)  # 1 s per step since step 0
    assert progress.update(9, now=114.0) == (14.0, 0.0)
    resumed = Progress(first_step=100, steps=200, start=0.0)
    assert resumed.update(100, now=2.0) == (2.0, 2.0 * 99)


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"),
                                            (185, "3m05s"), (3720, "1h02m"),
                                            (90_000, "25h00m"), (-3, "0s")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown


def test_eurocore_plot_writes_a_png_of_the_run(run, tmp_path, capsys):
    directory, _, history, _ = run
    output = tmp_path / "plot.png"
    assert eurocore_main(["plot", str(directory), "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    data = output.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert eurocore_main(["plot", str(directory)]) == 0  # the default: RUN_DIR/metrics.png
    assert (directory / "metrics.png").read_bytes().startswith(b"\x89PNG")
    figure = plot_run(read_metrics(directory / METRICS_FILE))
    loss, lr, speed, _ = figure.axes
    assert [a.get_title() for a in figure.axes] == [
        "loss", "learning rate", "throughput", "TFLOP/s per device (peak unknown: no MFU)"]
    train_line, valid_line = loss.get_lines()
    assert list(train_line.get_ydata()) == [m["loss"] for m in history]
    assert list(valid_line.get_xdata()) == [1, 3]
    assert list(lr.get_lines()[0].get_ydata()) == [m["lr"] for m in history]
    assert list(speed.get_lines()[0].get_ydata()) == [m["tokens_per_s"] for m in history]


def test_eurocore_plot_draws_mfu_where_known():
    records = [{"kind": "step", "step": s, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 1e5,
                "tflops_per_device": 400.0, "mfu": 0.4} for s in range(3)]
    figure = plot_run(records)
    assert figure.axes[3].get_title() == "MFU"
    assert list(figure.axes[3].get_lines()[0].get_ydata()) == [40.0] * 3


def test_eurocore_plot_errors_name_what_is_wrong(tmp_path, capsys, monkeypatch):
    assert eurocore_main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"eurocore plot: RUN_DIR: {str(tmp_path / METRICS_FILE)!r} is missing" in err
    assert eurocore_main(["plot", str(tmp_path / "absent")]) == 1
    assert "eurocore plot: PATH: " in capsys.readouterr().err
    results = tmp_path / "results.json"  # a file goes to the benchmarks' plotting
    results.write_text("{}")
    assert eurocore_main(["plot", str(results)]) == 1
    assert "not the results of" in capsys.readouterr().err
    (tmp_path / METRICS_FILE).write_text(json.dumps({"kind": "run"}) + "\n")
    assert eurocore_main(["plot", str(tmp_path)]) == 1
    assert "holds no logged step yet" in capsys.readouterr().err
    (tmp_path / METRICS_FILE).write_text(json.dumps({"kind": "step", "step": 0, "loss": 1.0})
                                         + "\n")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert eurocore_main(["plot", str(tmp_path)]) == 1
    assert "eurocore plot: eurocore plot needs matplotlib: pip install eurocore[plot]" in \
        capsys.readouterr().err
    assert not (tmp_path / "metrics.png").exists()
