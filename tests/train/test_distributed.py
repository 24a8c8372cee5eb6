"""Launch environments (torchrun, srun steps, the sbatch batch shell, plain python), the
multi-node loopback check, GPU oversubscription, and ``eurocore train --dry-run``'s memory
estimate (against hand counts, the meta-device model and the accounting benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import eurocore.train.__main__ as train_module
from eurocore.model import ModelConfig, memory, preset, stage_chunks
from eurocore.parallel import ParallelGroups, local_part
from eurocore.parallel.data_parallel import shard_data_parallel
from eurocore.train import distributed
from eurocore.train.config import TrainConfig
from eurocore.train.distributed import (
    Launch,
    check_rendezvous,
    detect_launch,
    init_process,
    launch_environment,
    local_device,
)
from eurocore.train.trainer import STATE_BYTES_PER_PARAMETER, estimate_memory
from tests.parallel.launch import run_on_ranks

PROG = "python -m eurocore.train"
ROOT = Path(__file__).resolve().parents[2]
# Everything a launcher or a job sets that these tests set themselves.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                    "SLURM_NNODES", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES",
                    "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_ID",
                    *distributed.VISIBLE_DEVICES_VARIABLES)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variable leaks in from the shell running the tests."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _gpus(monkeypatch, count: int) -> None:
    """torch sees ``count`` GPUs (0: none); nothing touches a real one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _process(env: dict[str, str]) -> tuple[int, int, int, torch.device]:
    """(rank, world size, local rank, device) of a process started with ``env``, as
    ``init_process`` works them out (without joining a group)."""
    launch = detect_launch(env)
    device = local_device("auto", launch.local_rank, env, launch.local_world_size)
    return launch.rank, launch.world_size, launch.local_rank, device


def _cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


# --- which launcher, which rank -----------------------------------------------------------


def test_plain_python_is_one_process(monkeypatch):
    _gpus(monkeypatch, 0)
    assert launch_environment({}) == (0, 1, 0, False)
    assert _process({}) == (0, 1, 0, torch.device("cpu"))


def test_torchrun(monkeypatch):
    _gpus(monkeypatch, 4)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launch_environment(env) == (5, 8, 1, True)
    assert _process(env) == (5, 8, 1, _cuda(1))
    assert launch_environment({**env, "LOCAL_WORLD_SIZE": "8"}) == (5, 8, 1, False)
    # torchrun inside an srun step: torchrun's variables win over the step's
    step = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
            "SLURM_STEP_NUM_NODES": "2"}
    assert detect_launch({**env, **step}) == Launch("torchrun", 5, 8, 1, True,
                                                    local_world_size=4)


def test_torchrun_without_local_world_size_takes_slurms_node_count():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert launch_environment(env) == (3, 8, 3, False)  # nothing tells: one node
    assert launch_environment({**env, "SLURM_STEP_NUM_NODES": "2"})[3]
    assert launch_environment({**env, "SLURM_NNODES": "2"})[3]  # from the batch shell
    assert not launch_environment({**env, "SLURM_STEP_NUM_NODES": "1", "SLURM_NNODES": "2"})[3]


STEP = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        # what the job's batch shell exported, inherited by the step
        "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}


def test_srun_step_each_task_sees_every_gpu(monkeypatch):
    """LUMI: 8 tasks per node, each sees the node's 8 GCDs and takes its local rank's."""
    _gpus(monkeypatch, 8)
    assert _process(STEP) == (11, 16, 3, _cuda(3))
    assert detect_launch(STEP).multi_node
    assert [_process({**STEP, "SLURM_PROCID": str(8 + i), "SLURM_LOCALID": str(i)})[3]
            for i in range(8)] == [_cuda(i) for i in range(8)]


def test_srun_step_with_a_gpu_per_task(monkeypatch):
    """srun --gpus-per-task=1: each task sees one GPU, the one SLURM chose for it."""
    _gpus(monkeypatch, 1)
    env = {**STEP, "CUDA_VISIBLE_DEVICES": "3"}
    assert _process(env) == (11, 16, 3, _cuda(0))
    assert _process({**env, "SLURM_LOCALID": "0", "SLURM_PROCID": "8"})[3] == _cuda(0)


def test_the_batch_shell_is_one_process(monkeypatch):
    """sbatch exports SLURM_PROCID and SLURM_NTASKS to the job script itself: a plain
    python there is one process (it used to believe it was rank 0 of 16 and wait)."""
    _gpus(monkeypatch, 8)
    shell = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
             "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    assert launch_environment(shell) == (0, 1, 0, False)
    assert detect_launch(shell) == Launch("batch-shell", job_tasks=16)
    assert _process(shell) == (0, 1, 0, _cuda(0))


def test_the_batch_shell_refuses_a_multi_process_layout(clean_env, capsys):
    """A job script that runs the trainer without srun, with a layout needing several
    processes: one line naming the option and saying why, before any group or model."""
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "16"), ("SLURM_NNODES", "2")):
        clean_env.setenv(name, value)
    started = []
    clean_env.setattr(train_module, "init_process", lambda *a: started.append(a))
    assert train_module.main(["--tp", "2", "--device", "cpu", "--steps", "1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{PROG}: error: --tp: tp · pp = 2 needs 2 processes")
    assert "batch shell of a SLURM job (SLURM_NTASKS = 16" in line and "srun" in line
    assert not started and not dist.is_initialized()


@pytest.mark.parametrize("present", [("WORLD_SIZE",), ("RANK",), ("LOCAL_RANK",),
                                     ("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "LOCAL_RANK")])
def test_partial_torchrun_variables_name_what_is_missing(present):
    """A batch script exporting WORLD_SIZE alone (as some guides do) used to make every
    srun task rank 0 on GPU 0, and turned the loopback check off."""
    values = {"RANK": "1", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    env = {**STEP, **{name: values[name] for name in present}}
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in present]
    with pytest.raises(ValueError, match=rf"^{missing[0]}: torchrun's variables come together, "
                                         rf"but {' and '.join(present)} .* "
                                         rf"{' and '.join(missing)} .* not"):
        detect_launch(env)


@pytest.mark.parametrize("env, name", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}, "SLURM_LOCALID"),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "4", "SLURM_LOCALID": "0"}, "SLURM_PROCID"),
    ({**STEP, "SLURM_STEP_TASKS_PER_NODE": "eight"}, "SLURM_STEP_TASKS_PER_NODE"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "abc"}, "SLURM_NTASKS"),
])
def test_bad_launcher_variables_are_named(env, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        detect_launch(env)


# --- the rendezvous of a multi-node run ---------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_loopback_rendezvous_fails_loudly_across_nodes(host):
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: .* loopback address .* multi-node"):
        check_rendezvous(host, multi_node=True)
    check_rendezvous(host, multi_node=False)  # one node: fine


def test_unresolvable_rendezvous_is_named():
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: .* does not resolve"):
        check_rendezvous("no-such-host.invalid", multi_node=True)


def test_a_routable_rendezvous_passes():
    check_rendezvous("10.1.2.3", multi_node=True)


@pytest.mark.parametrize("launch", [
    {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"},
    # no LOCAL_WORLD_SIZE: the step's node count tells
    {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "SLURM_STEP_NUM_NODES": "2"},
    {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "SLURM_NNODES": "2"},
    {k: v for k, v in STEP.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
], ids=["torchrun", "torchrun-in-step", "torchrun-in-job", "srun"])
def test_init_process_refuses_a_loopback_master_on_several_nodes(clean_env, launch):
    """The check runs before any group is joined: nothing waits for itself."""
    for name, value in {**launch, "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(name, value)
    clean_env.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: 'localhost' resolves to the loopback"):
        init_process("cpu")


# --- GPUs per rank -------------------------------------------------------------------------


def test_more_ranks_than_gpus_is_an_error(monkeypatch):
    """Two ranks of one node on one GPU: local rank 5 of 8 where each task sees 4 GPUs (it
    used to take GPU 5 % 4 = 1, silently). With the node's rank count known, every rank
    says it, not only those beyond the last GPU (the others would wait for them)."""
    _gpus(monkeypatch, 4)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(ValueError, match=r"^device: 8 ranks on this node \(local rank 5\) but "
                                         r"4 GPUs visible .* two ranks would share one GPU"):
        _process(env)
    with pytest.raises(ValueError, match=r"^device: 8 ranks on this node \(local rank 0\)"):
        _process({**env, "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=r"^device: 16 ranks on this node"):  # srun, LUMI
        _process({**STEP, "SLURM_STEP_TASKS_PER_NODE": "16"})
    # --device cpu runs any number of ranks
    assert local_device("cpu", 5, env, 8) == torch.device("cpu")


def test_one_gpu_that_no_launcher_chose_is_not_shared(monkeypatch):
    """A node with one GPU and two ranks (no per-task CUDA_VISIBLE_DEVICES): an error, not
    both ranks on GPU 0."""
    _gpus(monkeypatch, 1)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    with pytest.raises(ValueError, match=r"^device: 2 ranks on this node .* 1 GPU visible "
                                         r"\(none of CUDA_VISIBLE_DEVICES"):
        _process(env)
    assert _process({**env, "ROCR_VISIBLE_DEVICES": "5"})[3] == _cuda(0)  # srun chose it


# --- --dry-run: the memory per rank -------------------------------------------------------

GIB = 2**30


def _eurollm_by_hand() -> list[int]:
    """EuroLLM-9B, tp 8 with SP x pp 2 (16 ranks), seq 4096, 16 microbatches of 1, selective
    recomputation, fused loss, bf16: the total bytes per rank of each stage, counted by
    hand. h 4096, 32 heads and 8 kv heads of 128, ffn 12288, vocabulary 128000, 21 layers
    per stage."""
    h, t, layers, n, tokens = 4096, 8, 21, 4096 // 8, 4096  # n: tokens of this SP shard
    per_layer = (6144 * h + h * h + 2 * 12288 * h + h * 12288) // t + 2 * h  # + 2 norms
    embedding = 128000 // t * h
    parameters = [layers * per_layer + embedding, layers * per_layer + h + embedding]
    assert parameters == [572_170_240, 572_174_336]
    norm = 2 * n * h + 4 * n                              # input and fp32 rstd
    core = 2 * tokens * (4096 + 2 * 1024 + 4096) // t + 4 * tokens * 32 // t  # q k v out lse
    swiglu = 2 * tokens * 2 * 12288 // t                  # gate and up
    layer = 2 * norm + core + swiglu                      # selective: no norm outputs nor product
    output = norm + 2 * tokens * h + 8 * tokens + 4 * tokens + 8  # fused loss
    # 1F1B: stage 0 holds 2 microbatches at once, stage 1 (the last) one
    activations = [2 * layers * layer, layers * layer + output]
    return [16 * p + a for p, a in zip(parameters, activations, strict=True)]


def _llama3_by_hand() -> int:
    """Llama-3-8B, tp 4 without SP x dp 2 (FSDP2; 8 ranks), seq 8192, 2 microbatches of 1
    per replica, full recomputation, the logits path: the total bytes of data-parallel rank
    0 (FSDP2 leaves it ceil(rows / 2) rows of each weight), counted by hand. h 4096, 32
    heads and 8 kv heads of 128, ffn 14336, vocabulary 128256 (32064 rows per TP rank), 32
    layers."""
    h, t, s = 4096, 4, 8192
    rows = 128256 // t                                    # 32064, even: no padding
    per_layer = (1536 // 2 * h + h // 2 * 1024 + 7168 // 2 * h + h // 2 * 3584
                 + 2 * (h // 2))                          # halves of this TP rank's shards
    parameters = 32 * per_layer + 2 * (rows // 2 * h) + h // 2
    norm = 2 * s * h + 4 * s
    whole_layer = (2 * norm + 2 * s * h + 2 * s * (4096 + 2 * 1024 + 4096) // t
                   + 4 * s * 32 // t + 2 * s * h + 2 * s * 2 * 14336 // t + 2 * s * 14336 // t)
    kept = 32 * 2 * s * h                                 # full: each layer's input only
    logits = norm + 2 * s * h + 8 * s * rows + rows + 14 * s + 8
    # one microbatch in flight (no pipeline), and the layer being recomputed, once
    return 16 * parameters + kept + logits + whole_layer


EUROLLM = TrainConfig(preset="eurollm-9b", tp=8, pp=2, sequence_parallel=True, seq_len=4096,
                      batch_size=16, micro_batch_size=1, recompute="selective", device="cuda")
LLAMA3 = TrainConfig(preset="llama3-8b", tp=4, seq_len=8192, batch_size=4, micro_batch_size=1,
                     recompute="full", fused_loss=False)


def test_memory_estimate_against_hand_counts():
    eurollm = estimate_memory(EUROLLM, 16)
    assert [rank.total for rank in eurollm] == _eurollm_by_hand()
    assert [rank.activation_peak.in_flight for rank in eurollm] == [2, 1]
    assert [rank.parameters for rank in eurollm] == [572_170_240, 572_174_336]
    (llama3,) = estimate_memory(LLAMA3, 8)
    assert llama3.total == _llama3_by_hand()
    assert llama3.weights + llama3.gradients + llama3.optimizer == \
        STATE_BYTES_PER_PARAMETER * llama3.parameters


def test_interleaving_holds_more_microbatch_chunks_on_the_first_rank():
    """Interleaved 1F1B (p = 2, v = 2, m = 4): rank r warms up (p - r - 1)·2 + (v - 1)·p
    chunk-forwards (Megatron-LM's schedule: 4 on rank 0, 2 on rank 1), and the steady state
    runs one more forward before the first backward: 5 and 3 held at the peak."""
    config = ModelConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=8,
                         num_kv_heads=4, ffn_hidden_size=176, max_seq_len=64)
    peaks = memory.activation_bytes_per_rank(config, seq=64, micro_batch=1, num_microbatches=4,
                                             pp=2, vpp=2)
    assert [p.in_flight for p in peaks] == [5, 3]
    layer = memory.layer_activation_bytes(config, 64, 1, 1, False)
    assert peaks[0].bytes == 5 * layer  # one layer per chunk; the output layer is rank 1's
    assert peaks[0].per_microbatch == (layer, layer)


def test_dry_run_prints_the_plan_and_exits_without_a_gpu_or_a_group(clean_env, capsys):
    """The EuroLLM-9B plan on a login node: the resolved config, the layout and each
    stage's GiB per rank; exit 0 within 64 GiB, 2 (one line) within 8. No GPU is asked
    about when the memory is given, and no group is joined."""
    clean_env.setattr(torch.cuda, "is_available", lambda: pytest.fail("asked for a GPU"))
    clean_env.setattr(train_module, "init_process", lambda *a: pytest.fail("started"))
    argv = ["--preset", "eurollm-9b", "--tp", "8", "--pp", "2", "--sequence-parallel",
            "--seq-len", "4096", "--global-batch-size", "16", "--micro-batch-size", "1",
            "--recompute", "selective", "--device", "cuda", "--dry-run", "--world-size", "16"]
    assert train_module.main([*argv, "--device-memory-gib", "64"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and 'preset = "eurollm-9b"' in out
    assert "world: 16 processes (--world-size)" in out
    assert "layout: tp 8 (sequence parallel) x pp 2 x dp 1; 16 microbatches" in out
    stage0, stage1 = _eurollm_by_hand()
    assert out.splitlines()[-4].split()[-1] == f"{stage1 / GIB:.2f}"  # the last stage's row
    assert f"the largest rank (stage 0) needs {stage0 / GIB:.2f} GiB" in out
    assert train_module.main([*argv, "--device-memory-gib", "8"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{PROG}: error: --device-memory-gib: the estimate, "
                           f"{stage0 / GIB:.2f} GiB per rank of stage 0, exceeds")
    assert not dist.is_initialized()


def test_dry_run_reads_a_visible_gpu_and_the_jobs_task_count(clean_env, capsys):
    """In a batch script (no step): the world is the job's SLURM_NTASKS; the visible GPU's
    memory is read from its properties."""
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "16")):
        clean_env.setenv(name, value)
    _gpus(clean_env, 8)
    properties = type("Properties", (), {"total_memory": 64 * GIB, "name": "AMD MI250X"})
    clean_env.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    assert train_module.main(["--config", str(ROOT / "configs" / "eurollm-9b-lumi.toml"),
                              "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world: 16 processes (SLURM_NTASKS of this job)" in out
    assert "device memory: 64.00 GiB (AMD MI250X, GPU 0 of this host)" in out


def test_dry_run_options_need_dry_run(clean_env, capsys):
    assert train_module.main(["--world-size", "16"]) == 2
    assert capsys.readouterr().err.startswith(f"{PROG}: error: --world-size: only for "
                                              f"--dry-run")
    assert train_module.main(["--dry-run", "--world-size", "0"]) == 2
    assert "--world-size: expected" in capsys.readouterr().err
    assert train_module.main(["--dry-run", "--tp", "2", "--world-size", "3"]) == 2
    assert "--tp: tp · pp = 2 does not divide the world size 3" in capsys.readouterr().err


def test_the_dry_runs_per_layer_bytes_are_the_accounting_benchmarks_measurement():
    """What the estimate charges per decoder layer (each recompute setting) and for the
    output layer (fused loss and logits path) equals the bytes the accounting benchmark
    measures with autograd's saved-tensor hooks; and a one-stage run's activations are
    those per-layer measurements summed."""
    from eurocore.benchmarks import parallel_accounting as pa

    seq = 16
    config = preset("tiny", max_seq_len=seq)
    rows = {row["recompute"]: row for row in pa.measure(
        config, seq, 1, [pa.Setting(1, False, r) for r in ("none", "selective", "full")])}
    for recompute, row in rows.items():
        assert memory.layer_activation_bytes(config, seq, 1, 1, False, recompute) == \
            row["activation_bytes_measured"]
    measured_output = rows["none"]["output_layer"]
    for fused, name in ((True, "fused"), (False, "logits")):
        assert memory.output_layer_bytes(config, seq, 1, 1, False, fused) == \
            measured_output[name]["bytes"]
    (rank,) = estimate_memory(TrainConfig(seq_len=seq, batch_size=1, device="cuda"), 1)
    assert rank.activations == config.num_layers * rows["none"]["activation_bytes_measured"] \
        + measured_output["fused"]["bytes"]


LAYOUTS = [  # (tp, pp, vpp, dp) on 4 ranks; a tied embedding, 4 layers
    (2, 2, 1, 1), (2, 1, 1, 2), (1, 2, 2, 2), (1, 1, 1, 4),
]


def _check_parameters_match_the_meta_model(rank: int, world: int) -> None:
    # 250 tokens: the vocabulary is padded at tp 2; rows of 250 // 4 split unevenly by FSDP2
    config = preset("tiny", num_layers=4, tie_embeddings=True)
    for tp, pp, vpp, dp in LAYOUTS:
        groups = ParallelGroups.build(tp=tp, pp=pp, dp=dp)
        chunks = [shard_data_parallel(chunk, groups, chunk.layers)
                  for chunk in stage_chunks(config, groups, num_chunks=vpp, device="meta")]
        # parameters shared within a chunk (a tied head) count once, as the trainer's log
        held = {id(p): local_part(p).numel() for chunk in chunks for p in chunk.parameters()}
        expected = memory.parameters_per_rank(config, tp=tp, pp=pp, dp=dp, vpp=vpp,
                                              dp_rank=groups.dp_rank)
        assert sum(held.values()) == expected[groups.pp_rank], (tp, pp, vpp, dp, rank)


@pytest.mark.slow
def test_parameters_per_rank_match_the_model_built_on_meta():
    """The analytic count of each rank's parameters equals what stage_chunks builds (on the
    meta device, FSDP2-sharded) in four layouts of 4 gloo ranks."""
    run_on_ranks(_check_parameters_match_the_meta_model, 4)
