"""The bad-input catalogue of the run options (issue 13, "No silent wrong results"): every
option of ``eurocore train`` and ``eurocore bench`` that cannot work is refused at start-up
with exit status 2 and one line naming the option, before any process group, model, timing
or output file exists; options that used to pass start-up and crash later (an IndexError at
the first pipeline send, a memory kill after building the model, an unwritable output after
the whole run) are refused just as early; and the outputs are written as the work goes, so a
run cut short keeps what it did."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eurocore.benchmarks.__main__ as bench_module
import eurocore.train.__main__ as train_module
import eurocore.train.trainer as trainer_module
from eurocore.benchmarks import harness
from eurocore.benchmarks.__main__ import main as bench_main
from eurocore.model import preset
from eurocore.parallel import ParallelGroups
from eurocore.parallel.pipeline import run_schedule
from eurocore.train.__main__ import main as train_main
from eurocore.train.distributed import Process
from eurocore.train.trainer import STATE_BYTES_PER_PARAMETER, TrainConfig, train

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_PROG = "python -m eurocore.train"
BENCH_PROG = "python -m eurocore.benchmarks"
# A real run that takes well under a second on the CPU.
SHORT_RUN = ["--steps", "3", "--log-every", "1", "--global-batch-size", "2", "--seq-len", "16",
             "--device", "cpu", "--data-workers", "0"]
# What a launcher sets; one leaking in from the shell would make main() join a process group.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                    "SLURM_NNODES")


@pytest.fixture(autouse=True)
def _one_plain_process(monkeypatch, tmp_path):
    """Every test here runs as one plain process, whatever the shell exported, in a fresh
    directory (a run's default output directory, runs/..., lands there)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


class Calls:
    """A stand-in for a function that records each call (and does nothing, or raises)."""

    def __init__(self, result=None, error: BaseException | None = None):
        self.calls: list[tuple] = []
        self.result, self.error = result, error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def no_run(monkeypatch):
    """Replaces the trainer's start (init_process) and the run (train) by recorders, so a
    test can prove that neither was reached."""
    spies = {"init_process": Calls(result=CPU), "train": Calls(result=[])}
    for name, spy in spies.items():
        monkeypatch.setattr(train_module, name, spy)
    return spies


def _assert_one_error_line(err: str, prog: str, option: str) -> None:
    """stderr is exactly ``prog: error: option: ...`` on one line."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: {option}:"), err
    assert "Traceback" not in err


# --- 1. numeric options that cannot work --------------------------------------------------

NUMERIC = [
    pytest.param(["--lr", "nan"], "--lr", id="lr-nan"),
    pytest.param(["--lr", "inf"], "--lr", id="lr-inf"),
    pytest.param(["--lr", "0"], "--lr", id="lr-zero"),
    pytest.param(["--lr=-1"], "--lr", id="lr-negative"),
    pytest.param(["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr", id="min-lr-above-lr"),
    pytest.param(["--min-lr=-1e-4"], "--min-lr", id="min-lr-negative"),
    pytest.param(["--min-lr", "nan"], "--min-lr", id="min-lr-nan"),
    pytest.param(["--weight-decay=-0.1"], "--weight-decay", id="weight-decay-negative"),
    pytest.param(["--weight-decay", "nan"], "--weight-decay", id="weight-decay-nan"),
    pytest.param(["--lr", "0.5", "--weight-decay", "2"], "--weight-decay",
                 id="lr-times-weight-decay-is-1"),
    pytest.param(["--lr", "0.9", "--weight-decay", "1.5"], "--weight-decay",
                 id="lr-times-weight-decay-above-1"),
    pytest.param(["--lr", "2"], "--lr", id="lr-above-1"),
    pytest.param(["--grad-clip", "0"], "--grad-clip", id="grad-clip-zero"),
    pytest.param(["--grad-clip", "inf"], "--grad-clip", id="grad-clip-inf"),
    pytest.param(["--grad-clip", "nan"], "--grad-clip", id="grad-clip-nan"),
    pytest.param(["--steps", "10", "--warmup-steps", "11"], "--warmup-steps",
                 id="warmup-beyond-steps"),
    pytest.param(["--warmup-steps=-1"], "--warmup-steps", id="warmup-negative"),
    pytest.param(["--steps", "0"], "--steps", id="steps-zero"),
    pytest.param(["--global-batch-size", "0"], "--global-batch-size", id="batch-zero"),
    pytest.param(["--global-batch-size", "16", "--micro-batch-size", "3"],
                 "--micro-batch-size", id="micro-batch-not-dividing"),
    pytest.param(["--micro-batch-size", "0"], "--micro-batch-size", id="micro-batch-zero"),
    pytest.param(["--seq-len", "257"], "--seq-len", id="seq-len-beyond-max"),
    pytest.param(["--seq-len", "0"], "--seq-len", id="seq-len-zero"),
    pytest.param(["--seq-len", "1"], "--seq-len", id="seq-len-one"),  # failed in the data
    pytest.param(["--tp", "2", "--sequence-parallel", "--seq-len", "33"], "--seq-len",
                 id="seq-len-not-divisible-by-tp"),
    pytest.param(["--data-seed=-1"], "--data-seed", id="data-seed-negative"),
    pytest.param(["--markov-branching", "251"], "--markov-branching",
                 id="branching-beyond-vocab"),
    pytest.param(["--markov-branching", "0"], "--markov-branching", id="branching-zero"),
    pytest.param(["--layers", "0"], "--layers", id="layers-zero"),
    pytest.param(["--log-every", "0"], "--log-every", id="log-every-zero"),
]


@pytest.mark.parametrize("argv, option", NUMERIC)
def test_numeric_option_that_cannot_work_is_refused(argv, option, no_run, capsys):
    """Exit 2, one line naming the option, and neither the process nor the run started."""
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    _assert_one_error_line(err, TRAIN_PROG, option)
    assert out == ""
    assert not no_run["init_process"].calls and not no_run["train"].calls


def test_good_options_reach_the_run(no_run, capsys):
    """The control for the cases above: the same path with sound options starts the run,
    with the TrainConfig the options describe."""
    assert train_main(["--lr", "1e-3", "--min-lr", "1e-4", "--seq-len", "256",
                       "--markov-branching", "250", "--steps", "10", "--warmup-steps", "10",
                       "--global-batch-size", "6", "--micro-batch-size", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert len(no_run["init_process"].calls) == 1
    ((config, process), _), = no_run["train"].calls
    assert process is CPU
    assert (config.lr, config.min_lr, config.seq_len, config.markov_branching) == (
        1e-3, 1e-4, 256, 250)
    assert (config.batch_size, config.micro_batch_size, config.warmup_steps) == (6, 3, 10)


# --- 2. options accepted at start-up that used to crash later -----------------------------

LATE_CRASHES = [
    pytest.param(["--vpp", "2"], "--vpp", id="vpp-without-pipeline"),
    pytest.param(["--pp", "2", "--layers-per-stage", "1,2"], "--layers-per-stage",
                 id="layers-per-stage-wrong-sum"),
    pytest.param(["--pp", "2", "--layers-per-stage", "2"], "--layers-per-stage",
                 id="layers-per-stage-too-few"),
    pytest.param(["--layers-per-stage", "1,x"], "--layers-per-stage",
                 id="layers-per-stage-not-ints"),
    pytest.param(["--tp", "3"], "--tp", id="tp-not-dividing-heads"),
    pytest.param(["--tp", "2"], "--tp", id="tp-beyond-world"),
    pytest.param(["--pp", "2"], "--pp", id="pp-beyond-world"),
    pytest.param(["--pp", "4", "--layers", "2"], "--pp", id="pp-cannot-fill-stages"),
    pytest.param(["--pp", "4"], "--pp", id="pp-beyond-the-preset-layers"),
]


@pytest.mark.parametrize("argv, option", LATE_CRASHES)
def test_layout_option_is_refused_at_start_up(argv, option, no_run, capsys):
    """Layouts that used to fail at the first send (or building the model) are refused
    before the process starts."""
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    _assert_one_error_line(err, TRAIN_PROG, option)
    assert out == ""
    assert not no_run["init_process"].calls and not no_run["train"].calls


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "RANK", "SLURM_NTASKS"])
def test_launcher_variable_that_is_not_a_number_is_named(monkeypatch, variable, no_run, capsys):
    """A malformed launcher variable: one line naming it, not a traceback from int()."""
    if variable.startswith("SLURM"):
        monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv(variable, "abc")
    assert train_main([]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, variable)
    assert not no_run["init_process"].calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_each_rank_says_what_its_device_lacks(monkeypatch, no_run, capsys):
    """What one rank finds about its own device, that rank says, with its rank (a rank other
    than 0 used to exit 2 in silence); what every rank finds alike, rank 0 alone says."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun sets all three
    assert train_main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err, TRAIN_PROG, "--device")
    assert err.rstrip().endswith("(rank 1)")
    assert train_main(["--lr", "nan"]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_device_cuda_without_gpu_is_refused(monkeypatch, capsys):
    """``--device cuda`` with no GPU: exit 2 naming --device, and the run never starts."""
    run = Calls(result=[])
    monkeypatch.setattr(train_module, "train", run)
    assert train_main(["--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    _assert_one_error_line(err, TRAIN_PROG, "--device")
    assert out == "" and not run.calls


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.skipif(STATE_BYTES_PER_PARAMETER * preset("llama3-8b").num_parameters()
                    <= _host_memory(), reason="this host holds llama3-8b's training state")
def test_preset_too_big_for_memory_fails_fast(monkeypatch, capsys):
    """llama3-8b's weights, gradients and AdamW state (~120 GiB) exceed this host: exit 2
    naming --preset within seconds, no parallel groups and no model built."""
    build, chunks = Calls(error=AssertionError("groups built")), Calls(
        error=AssertionError("model built"))
    monkeypatch.setattr(ParallelGroups, "build", build)
    monkeypatch.setattr(trainer_module, "stage_chunks", chunks)
    start = time.perf_counter()
    assert train_main(["--preset", "llama3-8b", "--device", "cpu"]) == 2
    assert time.perf_counter() - start < 20
    out, err = capsys.readouterr()
    _assert_one_error_line(err, TRAIN_PROG, "--preset")
    assert "GiB" in err
    assert not build.calls and not chunks.calls
    assert "step" not in out


@pytest.mark.skipif(STATE_BYTES_PER_PARAMETER * preset("llama3-8b").num_parameters()
                    <= _host_memory(), reason="this host holds llama3-8b's training state")
def test_preset_too_big_is_refused_before_the_process_group(monkeypatch, capsys):
    """The memory estimate refuses the preset before init_process is called."""
    start = Calls(result=CPU)
    monkeypatch.setattr(train_module, "init_process", start)
    monkeypatch.setattr(trainer_module, "stage_chunks", Calls(error=AssertionError("built")))
    assert train_main(["--preset", "llama3-8b", "--device", "cpu"]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "--preset")
    assert not start.calls


@pytest.mark.parametrize("fields, world, name", [
    pytest.param({"vpp": 2}, None, "vpp", id="vpp-without-pipeline"),
    pytest.param({"pp": 2, "layers_per_stage": (1, 2)}, None, "layers_per_stage",
                 id="layers-per-stage-wrong-sum"),
    pytest.param({"tp": 3}, None, "tp", id="tp-not-dividing-heads"),
    pytest.param({"lr": math.nan}, None, "lr", id="lr-nan"),
    pytest.param({"tp": 2}, 1, "tp", id="layout-tp-beyond-world"),
    pytest.param({"batch_size": 3}, 2, "batch_size", id="layout-batch-over-replicas"),
    pytest.param({"pp": 2, "vpp": 2, "model_overrides": {"num_layers": 4},
                  "batch_size": 6, "micro_batch_size": 2}, 2, "micro_batch_size",
                 id="layout-interleaving-microbatches"),
])
def test_train_config_names_the_field(fields, world, name):
    """TrainConfig (alone) and its layout (for a world size) raise ValueError naming the
    field; world None: the construction itself refuses."""
    with pytest.raises(ValueError) as info:
        config = TrainConfig(**fields)
        assert world is not None, "TrainConfig accepted the fields"
        config.layout(world)
    assert str(info.value).startswith(f"{name}: "), info.value


@pytest.mark.parametrize("fields, name", [
    pytest.param({"steps": True}, "steps", id="steps-bool"),
    pytest.param({"batch_size": 2.0}, "batch_size", id="batch-float"),
    pytest.param({"layers_per_stage": [1, 1]}, "layers_per_stage", id="layers-per-stage-list"),
    pytest.param({"sequence_parallel": 1}, "sequence_parallel", id="sequence-parallel-int"),
])
def test_train_config_refuses_wrong_types(fields, name):
    """A wrong type is a TypeError naming the field (no silent coercion of True to 1)."""
    with pytest.raises(TypeError, match=f"^{name}: "):
        TrainConfig(**fields)


def test_run_schedule_refuses_virtual_stages_without_a_pipeline():
    """num_chunks > 1 with pp 1 would make a chunk send to itself (the old IndexError):
    a ValueError naming num_chunks, before any forward step."""
    forward = Calls(result=torch.zeros(()))
    with pytest.raises(ValueError, match=r"^num_chunks: "):
        run_schedule([], forward, ParallelGroups.single(), num_chunks=2, num_microbatches=1,
                     activation_shape=(4, 1, 8), dtype=torch.float32,
                     device=torch.device("cpu"))
    assert not forward.calls


def test_lr_beyond_float32_is_refused_at_start_up(no_run, capsys):
    """An lr no fp32 parameter can take is refused like any other bad --lr."""
    assert train_main(["--lr", "1e300", "--weight-decay", "0"]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "--lr")
    assert not no_run["train"].calls


# --- 3. outputs checked before the work, written as it goes ------------------------------

def _unwritable_file_paths(tmp_path: Path) -> dict[str, Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    (tmp_path / "a-dir").mkdir()
    return {"under-a-file": blocker / "metrics.json",
            "under-proc": Path("/proc/eurocore-test/metrics.json"),
            "a-directory": tmp_path / "a-dir"}


@pytest.mark.parametrize("where", ["under-a-file", "under-proc", "a-directory"])
def test_metrics_json_unwritable_is_refused_before_the_run(where, tmp_path, no_run, capsys):
    """--metrics-json that cannot be written fails at start-up, not after the whole run."""
    path = _unwritable_file_paths(tmp_path)[where]
    before = sorted(tmp_path.rglob("*"))
    assert train_main([*SHORT_RUN, "--metrics-json", str(path)]) == 2
    out, err = capsys.readouterr()
    _assert_one_error_line(err, TRAIN_PROG, "--metrics-json")
    assert "step" not in out
    assert not no_run["init_process"].calls and not no_run["train"].calls
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing created


def test_metrics_json_empty_path_is_refused(no_run, capsys):
    """``--metrics-json ''`` names no file: exit 2 naming the option."""
    assert train_main([*SHORT_RUN, "--metrics-json", ""]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "--metrics-json")
    assert not no_run["train"].calls


def test_rejected_run_creates_no_directories(tmp_path, no_run, capsys):
    """A run refused for another option leaves no trace of its --metrics-json path: the
    writability check creates nothing that stays."""
    path = tmp_path / "new" / "sub" / "metrics.json"
    assert train_main([*SHORT_RUN, "--metrics-json", str(path), "--lr", "nan"]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "--lr")
    assert train_main([*SHORT_RUN, "--metrics-json", str(path), "--tp", "2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "--tp")
    assert list(tmp_path.iterdir()) == []


def test_diverged_run_stops_with_one_line(monkeypatch, tmp_path, capsys):
    """A loss or gradient norm that is not finite stops the run at the logged step with exit
    status 1 and one line (not a NaN training to the end with exit 0); the metrics logged
    before it are kept."""
    norms = iter([torch.tensor(0.5), torch.tensor(math.nan)])
    monkeypatch.setattr(trainer_module, "clip_grad_norm_", lambda *_: next(norms))
    path = tmp_path / "metrics.json"
    assert train_main([*SHORT_RUN, "--metrics-json", str(path)]) == 1
    _assert_one_error_line(capsys.readouterr().err, TRAIN_PROG, "loss")
    assert [m["step"] for m in json.loads(path.read_text())] == [0]


def test_metrics_json_holds_every_logged_step(tmp_path, capsys):
    """A short real run writes a JSON list with one entry per logged step, and leaves no
    temporary file beside it."""
    path = tmp_path / "out" / "metrics.json"
    assert train_main([*SHORT_RUN, "--metrics-json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    history = json.loads(path.read_text())
    assert isinstance(history, list)
    assert [m["step"] for m in history] == [0, 1, 2]
    assert all(math.isfinite(m["loss"]) and m["lr"] > 0 for m in history)
    assert sum(line.startswith("step ") for line in out.splitlines()) == 3
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_metrics_json_grows_as_steps_are_logged(tmp_path, monkeypatch, capsys):
    """With no minimum interval between rewrites, each logged step is on disk when the next
    starts: the file read at each on_step holds every step so far."""
    monkeypatch.setattr(train_module, "METRICS_WRITE_INTERVAL_S", 0.0)
    path = tmp_path / "metrics.json"
    seen: list[list[int]] = []

    def spy_train(config, process, log, on_step, data=None, stop=None):
        def watch(metrics):
            on_step(metrics)
            seen.append([m["step"] for m in json.loads(path.read_text())])
        return train(config, process, log=log, on_step=watch, data=data, stop=stop)

    monkeypatch.setattr(train_module, "train", spy_train)
    assert train_main([*SHORT_RUN, "--metrics-json", str(path)]) == 0
    assert seen == [[0], [0, 1], [0, 1, 2]]


def test_metrics_json_rewrites_are_throttled(tmp_path, monkeypatch, capsys):
    """Within the minimum interval the file is written once, at the first logged step, and
    once more at the end with every step (a run with log_every=1 does not rewrite a growing
    file at every step)."""
    monkeypatch.setattr(train_module, "METRICS_WRITE_INTERVAL_S", 3600.0)
    path = tmp_path / "metrics.json"
    writes: list[int] = []
    original = train_module.write_json_atomically
    monkeypatch.setattr(train_module, "write_json_atomically",
                        lambda payload, p: writes.append(len(payload)) or original(payload, p))
    assert train_main([*SHORT_RUN, "--metrics-json", str(path)]) == 0
    assert writes == [1, 3]
    assert [m["step"] for m in json.loads(path.read_text())] == [0, 1, 2]


def test_metrics_json_keeps_the_steps_of_a_run_cut_short(tmp_path, monkeypatch):
    """A run that dies after its first logged step leaves that step in the file."""
    path = tmp_path / "out" / "metrics.json"

    def dies_after_one_step(config, process, log, on_step, **_):
        on_step({"step": 0, "loss": 5.5, "lr": 3e-3, "grad_norm": 1.0,
                 "tokens_per_s": 1.0, "step_ms": 1.0})
        raise RuntimeError("killed")

    monkeypatch.setattr(train_module, "train", dies_after_one_step)
    with pytest.raises(RuntimeError, match="killed"):
        train_main([*SHORT_RUN, "--metrics-json", str(path)])
    assert [m["step"] for m in json.loads(path.read_text())] == [0]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_train_calls_on_step_as_each_step_is_logged():
    """train() hands each logged step to on_step during the run, in order, before the step's
    log line (so a caller can write it out before anything else happens)."""
    lines: list[str] = []
    seen: list[tuple[int, int]] = []

    def on_step(metrics):
        seen.append((metrics["step"], sum(line.startswith("step") for line in lines)))

    history = train(TrainConfig(steps=5, log_every=2, batch_size=2, seq_len=16), CPU,
                    log=lines.append, on_step=on_step)
    assert seen == [(0, 0), (2, 1), (4, 2)]
    assert [m["step"] for m in history] == [0, 2, 4]


# The benchmark: ``--out``, ``--device`` and ``--ops`` checked before ceilings are measured.

@pytest.fixture
def no_timing(monkeypatch):
    """Records (and refuses) any measurement: a refused command must not get that far."""
    spy = Calls(error=AssertionError("ceilings measured"))
    monkeypatch.setattr(harness, "measure_ceilings", spy)
    return spy


def _bench_refused(argv: list[str], capsys) -> tuple[str, str]:
    with pytest.raises(SystemExit) as info:
        bench_main(argv)
    assert info.value.code == 2
    return capsys.readouterr()


@pytest.mark.parametrize("where", ["under-a-file", "a-file", "under-proc"])
def test_bench_out_unwritable_is_refused(where, tmp_path, no_timing, capsys):
    """--out that cannot take the JSON fails before anything is timed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    out_dir = {"under-a-file": blocker / "results", "a-file": blocker,
               "under-proc": Path("/proc/eurocore-test")}[where]
    out, err = _bench_refused(["--ops", "rms_norm", "--quick", "--device", "cpu",
                               "--out", str(out_dir)], capsys)
    assert f"{BENCH_PROG}: error: --out:" in err
    assert out == "" and not no_timing.calls
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize("device", [
    pytest.param("meta", id="meta"),
    pytest.param("foo", id="garbage"),
    pytest.param("", id="empty"),
    pytest.param("mps", id="mps"),
    pytest.param("cuda:99", id="cuda-index-beyond-gpus"),
    pytest.param("cuda", id="cuda-without-gpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bench_device_that_cannot_be_timed_is_refused(device, tmp_path, no_timing, capsys):
    """Only the CPU or a visible GPU can be timed; anything else exits 2 naming --device,
    with no JSON written."""
    out, err = _bench_refused(["--device", device, "--quick", "--out", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"{BENCH_PROG}: error: --device:"), err
    assert out == "" and not no_timing.calls
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ops", [["nope"], ["rms_norm,nope"], ["rms_norm", "rotary", "x"]],
                         ids=["unknown", "unknown-after-comma", "unknown-last"])
def test_bench_unknown_op_is_refused(ops, tmp_path, no_timing, capsys):
    """An unknown --ops name exits 2 naming --ops and the unknown name."""
    out, err = _bench_refused(["--ops", *ops, "--device", "cpu", "--out", str(tmp_path)],
                              capsys)
    assert f"{BENCH_PROG}: error: --ops: unknown" in err
    assert ops[-1].split(",")[-1] in err
    assert out == "" and not no_timing.calls
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_rms_norm_quick_writes_its_json(tmp_path, capsys):
    """The real op on the CPU (about 10 s): exit 0 and one JSON file holding its results."""
    assert bench_main(["--ops", "rms_norm", "--quick", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["results"] and {r["op"] for r in data["results"]} == {"rms_norm"}
    assert str(path) in capsys.readouterr().out


def _fake_cases(op: str):
    def cases(device, quick):
        return [harness.Case(op=op, variant="fwd", shape={"n": 64}, dtype="float32",
                             impl="torch eager", setup=lambda: (lambda: torch.ones(64) * 2),
                             bytes=512)]
    return cases


def _broken_cases(device, quick):
    raise RuntimeError("op exploded")


def test_bench_json_is_written_after_each_op(tmp_path, monkeypatch, capsys):
    """A run that dies in its second op leaves the JSON of the first on disk."""
    monkeypatch.setattr(bench_module, "OPS", {"first": _fake_cases("first"),
                                              "second": _broken_cases})
    with pytest.raises(RuntimeError, match="op exploded"):
        bench_main(["--ops", "first", "second", "--device", "cpu", "--out", str(tmp_path)])
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert [(r["op"], r["impl"]) for r in data["results"]] == [("first", "torch eager")]
    assert data["results"][0]["ms"] > 0


# --- 4. the real commands: exit status 2 and one line, no traceback ----------------------

def _command(name: str, tmp: Path) -> list[str]:
    blocker = tmp / "a-file"
    blocker.write_text("x\n")
    eurocore = Path(sys.executable).with_name("eurocore")
    return {
        "train-module-lr-nan": [sys.executable, "-m", "eurocore.train", "--lr", "nan"],
        "eurocore-train-vpp": [str(eurocore), "train", "--vpp", "2"],
        "bench-module-out": [sys.executable, "-m", "eurocore.benchmarks", "--device", "cpu",
                             "--out", str(blocker / "results")],
    }[name]


COMMANDS = {"train-module-lr-nan": (TRAIN_PROG, "--lr"),
            "eurocore-train-vpp": ("eurocore train", "--vpp"),
            "bench-module-out": (BENCH_PROG, "--out")}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Launches every command at once (each pays python and torch start-up) and waits."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    running = {}
    for name in COMMANDS:
        tmp = tmp_path_factory.mktemp(name)
        running[name] = (subprocess.Popen(_command(name, tmp), cwd=tmp, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE), tmp)
    done = {}
    for name, (proc, tmp) in running.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), tmp)
    return done


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_exits_2_with_one_line(name, launched):
    """The installed entry points: exit status 2, one error line naming the option, no
    traceback, nothing run and nothing written in the working directory."""
    result, cwd = launched[name]
    prog, option = COMMANDS[name]
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(f"{prog}: error: {option}:"), result.stderr
    if prog != BENCH_PROG:  # argparse's own errors print the usage first
        assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert [p.name for p in cwd.iterdir()] == ["a-file"]
