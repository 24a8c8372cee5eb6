"""Real processes killed and signalled: a run killed with SIGKILL right after a checkpoint,
or in the middle of writing one, and a run stopped by SIGTERM (one process, as under srun,
and one rank of a torchrun run) resume with the uninterrupted run's losses and gradient
norms at every later step, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eurocore.train.metrics import read_metrics
from eurocore.train.preemption import PREEMPTED_EXIT_STATUS

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
OPTIONS = ["--log-every", "1", "--global-batch-size", "4", "--seq-len", "32", "--device", "cpu",
           "--data-workers", "0", "--eval-every", "0", "--warmup-steps", "2"]
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"  # the same threads in every run: the same float sums
    return env


def _start(run: Path, steps: int, every: int, torchrun: bool = False) -> subprocess.Popen:
    """The training command on ``run`` (its output in run/log.txt, appended)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
                if torchrun else [sys.executable])
    layout = ["--tp", "2"] if torchrun else []
    command = [*launcher, "-m", "eurocore.train", *OPTIONS, *layout, "--steps", str(steps),
               "--checkpoint-every", str(every), "--output-dir", str(run),
               "--metrics-json", str(run / "metrics.json")]
    run.mkdir(parents=True, exist_ok=True)
    with (run / "log.txt").open("a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)


def _finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def _metrics(run: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"])
            for m in json.loads((run / "metrics.json").read_text())}


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run ended (or timed out) before {what}")
        time.sleep(0.0005)


def _resumed_from(run: Path) -> int:
    lines = [line for line in (run / "log.txt").read_text().splitlines()
             if line.startswith("resumed from")]
    assert lines, (run / "log.txt").read_text()[-3000:]
    return int(lines[-1].split(" at step ")[1].split()[0])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, tuple[float, float]]:
    run = tmp_path_factory.mktemp("uninterrupted")
    assert _finish(_start(run, steps=15, every=3)) == 0
    return _metrics(run)


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = _start(run, steps=15, every=3)
    latest = run / "checkpoints" / "latest"
    _wait_for(lambda: latest.exists() and latest.read_text().strip() == "step-00000006",
              process, "the checkpoint of step 6")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert _finish(_start(run, steps=15, every=3)) == 0
    start = _resumed_from(run)
    assert start >= 6
    resumed = _metrics(run)
    assert sorted(resumed) == list(range(start, 15))
    assert all(resumed[s] == uninterrupted[s] for s in resumed), (resumed, uninterrupted)
    # metrics.jsonl: the steps the killed run logged after its checkpoint are not repeated
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] == "step"] == list(range(15))
    # the closing line says which steps this run took (the log also holds the first run's)
    assert f"done: loss {resumed[start][0]:.4f} -> {resumed[14][0]:.4f} from step {start} to " \
           f"14 (of 15)" in (run / "log.txt").read_text()


def test_a_run_killed_while_writing_a_checkpoint_falls_back_to_the_previous(tmp_path,
                                                                            uninterrupted):
    """The kill lands while step-N.tmp exists (the process is stopped with SIGSTOP when the
    directory appears, and killed only if it is still there): the next start removes it
    and resumes from the checkpoint before."""
    run = tmp_path / "run"
    process = _start(run, steps=15, every=3)
    directory = run / "checkpoints"

    def saves_under_way() -> list[Path]:  # after the first checkpoint, so one precedes it
        return [p for p in directory.glob("step-*.tmp") if p.name != "step-00000003.tmp"
                and ".deleting" not in p.name] if directory.is_dir() else []

    interrupted = None
    while interrupted is None:
        _wait_for(lambda: bool(saves_under_way()), process, "a save caught while under way")
        os.killpg(process.pid, signal.SIGSTOP)
        pending = saves_under_way()
        if pending:
            interrupted = pending[0].name
            os.killpg(process.pid, signal.SIGKILL)
        else:
            os.killpg(process.pid, signal.SIGCONT)
    process.wait()
    step = int(interrupted.removeprefix("step-").removesuffix(".tmp"))
    assert _finish(_start(run, steps=15, every=3)) == 0
    log = (run / "log.txt").read_text()
    assert f"removing {interrupted}, a save that did not finish" in log
    assert _resumed_from(run) == step - 3
    resumed = _metrics(run)
    assert all(resumed[s] == uninterrupted[s] for s in resumed) and len(resumed) >= 3


def test_sigterm_saves_exits_3_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    """One process, as each task under srun: SIGTERM mid-run saves the step's checkpoint
    and exits with status 3; the same command resumes from it."""
    run = tmp_path / "run"
    process = _start(run, steps=15, every=1000)
    log = run / "log.txt"
    _wait_for(lambda: "step     3 |" in log.read_text(), process, "step 3")
    process.send_signal(signal.SIGTERM)
    assert _finish(process) == PREEMPTED_EXIT_STATUS
    text = log.read_text()
    assert "SIGTERM received: saving a checkpoint and stopping" in text
    assert f"(exit status {PREEMPTED_EXIT_STATUS})" in text
    assert _finish(_start(run, steps=15, every=1000)) == 0
    start = _resumed_from(run)
    resumed = _metrics(run)
    assert sorted(resumed) == list(range(start, 15))
    assert all(resumed[s] == uninterrupted[s] for s in resumed)


@pytest.mark.slow
def test_sigterm_to_one_torchrun_rank_stops_both_and_the_run_resumes_exactly(tmp_path):
    """TP 2 under torchrun, SIGTERM to one worker only: the ranks agree at the next step
    boundary, both save and exit 3 (torchrun reports it), and the same torchrun command
    resumes with the uninterrupted run's losses."""
    reference = tmp_path / "reference"
    assert _finish(_start(reference, steps=40, every=1000, torchrun=True)) == 0
    run = tmp_path / "run"
    process = _start(run, steps=40, every=1000, torchrun=True)
    log = run / "log.txt"
    _wait_for(lambda: "step     3 |" in log.read_text(), process, "step 3")
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)
    # torchrun's own status is 1 whatever its workers' (README: a batch script requeues on
    # the status of srun running the ranks directly). Its report has the status of the
    # first worker to end, 3; the other may be ended by torchrun once the checkpoint is
    # complete (rank 0 said so), before it exits on its own.
    assert _finish(process) == 1
    text = log.read_text()
    assert "SIGTERM received: saving a checkpoint and stopping" in text
    assert "the checkpoint of step" in text and "is complete" in text
    assert f"exitcode  : {PREEMPTED_EXIT_STATUS} (pid" in text, text[-3000:]
    assert _finish(_start(run, steps=40, every=1000, torchrun=True)) == 0
    start = _resumed_from(run)
    expected, resumed = _metrics(reference), _metrics(run)
    assert sorted(resumed) == list(range(start, 40))
    assert all(resumed[s] == expected[s] for s in resumed)
