"""The training run: the loss falls toward the floor, a TP=2 run (sequence parallel) takes
the same steps as one process, and the torchrun command of the README works."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, Trainer, train
from tests.parallel.launch import run_on_ranks

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# data_workers 0: short runs pay no loader-process start-up (test_loader_workers_change_nothing
# runs the workers)
SHORT = {"steps": 6, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_every": 1,
         "data_workers": 0}


def test_loss_falls_toward_the_floor():
    lines: list[str] = []
    history = train(TrainConfig(steps=60, batch_size=8, seq_len=64, warmup_steps=10,
                                log_every=10), CPU, log=lines.append)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert first > 5.0 and last < 0.6 * first, (first, last)
    assert any("floor" in line for line in lines) and lines[-1].startswith("done")
    assert all(m["tokens_per_s"] > 0 and m["step_ms"] > 0 for m in history)


def _final_parameters(store: dict):
    """An on_finish callback keeping one process's final parameters by name."""
    def keep(model, groups):
        (chunk,) = model
        store.update({n: p.detach().clone() for n, p in chunk.named_parameters()})
    return keep


def _check_parameters(reference: dict):
    """An on_finish callback comparing this rank's shards with one process's parameters."""
    def check(model, groups):
        for chunk in model:
            for name, param in chunk.named_parameters():
                module = chunk.get_submodule(name.rpartition(".")[0])
                full = reference["embedding.weight" if name == "head.weight"
                                 and name not in reference else name]
                if hasattr(module, "local_shard"):
                    full = module.local_shard(full)
                local = param.full_tensor() if hasattr(param, "full_tensor") else param
                # Adam divides by sqrt(v) + eps: where a gradient is near eps, a difference
                # in fp32 rounding (another reduction order) moves the weight differently by
                # up to a few 1e-5 over 6 steps (4e-5 seen on one of 5632 elements at
                # TP2 x PP2 with SP); a step itself is ~lr = 3e-3.
                torch.testing.assert_close(local.detach(), full, rtol=1e-3, atol=6e-5,
                                           msg=lambda m, n=name: f"parameter {n}: {m}")
    return check


def _run_layout(rank: int, world: int, expected: list[dict], layout: dict,
                reference: dict | None = None) -> None:
    process = Process(rank, world, rank, torch.device("cpu"))
    history = train(TrainConfig(**layout, **SHORT), process, log=lambda _: None,
                    on_finish=_check_parameters(reference) if reference else None)
    for got, want in zip(history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (rank, got, want)
        # the clipping norm is the whole model's, shards and replicated weights counted once
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (rank, got, want)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_run_takes_the_same_steps(sequence_parallel):
    expected = train(TrainConfig(**SHORT), CPU, log=lambda _: None)
    run_on_ranks(_run_layout, 2, expected, {"tp": 2, "sequence_parallel": sequence_parallel})


FOUR_LAYERS = {"model_overrides": {"num_layers": 4}, "micro_batch_size": 1}


@pytest.mark.parametrize("layout, world", [
    ({"pp": 2}, 2),
    ({"pp": 2, "vpp": 2}, 2),
    ({"tp": 2, "pp": 2, "sequence_parallel": True}, 4),
    ({"tp": 2}, 4),                                   # dp 2 (FSDP2) x tp 2
    ({"pp": 2}, 4),                                   # dp 2 x pp 2
])
def test_pipeline_run_takes_the_same_steps(layout, world):
    """Four microbatches accumulated (two per replica with dp 2): the same losses and
    clipping norms at every step, and the same parameters after the last of the 6 optimizer
    steps, as one process running them one after the other."""
    reference: dict = {}
    expected = train(TrainConfig(**FOUR_LAYERS, **SHORT), CPU, log=lambda _: None,
                     on_finish=_final_parameters(reference))
    run_on_ranks(_run_layout, world, expected, {**FOUR_LAYERS, **layout}, reference)


def test_loader_workers_change_nothing():
    """Batches read ahead by two worker processes train exactly as batches made in the
    training process."""
    inline = train(TrainConfig(**SHORT), CPU, log=lambda _: None)
    workers = train(TrainConfig(**{**SHORT, "data_workers": 2}), CPU, log=lambda _: None)
    assert [m["loss"] for m in inline] == [m["loss"] for m in workers]


def test_state_dict_resumes_bit_for_bit():
    """A Trainer given another's state_dict (a copy, taken after 3 steps) takes the next 3
    steps exactly as the uninterrupted one: losses, gradient norms and every parameter, bit
    for bit (everything a resume needs is in the state)."""
    config = TrainConfig(**{**SHORT, "steps": 6}, micro_batch_size=2)
    first = Trainer(config, CPU, log=lambda _: None)
    for _ in range(3):
        first.train_step()
    state = first.state_dict()
    saved = {"meta": copy.deepcopy(state["meta"]),
             "tensors": {k: (v.local if hasattr(v, "local") else v).clone()
                         for k, v in state["tensors"].items()}}
    expected = [first.train_step() for _ in range(3)]

    second = Trainer(config, CPU, log=lambda _: None)
    second.load_state_dict(saved)
    assert second.step == 3
    resumed = [second.train_step() for _ in range(3)]
    for want, got in zip(expected, resumed, strict=True):
        assert want["step"] == got["step"] and want["lr"] == got["lr"]
        assert torch.equal(want["loss"], got["loss"])
        assert torch.equal(want["grad_norm"], got["grad_norm"])
    for (name, a), (_, b) in zip(first.model.named_parameters(),
                                 second.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_refuses_other_data():
    trainer = Trainer(TrainConfig(**SHORT), CPU, log=lambda _: None)
    state = trainer.state_dict()
    state["meta"]["data"] = {**state["meta"]["data"], "seed": 7}
    with pytest.raises(ValueError, match=r"^data: the saved run's data differs in seed"):
        Trainer(TrainConfig(**SHORT), CPU, log=lambda _: None).load_state_dict(state)



def test_microbatches_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"^micro_batch_size\b"):
        TrainConfig(batch_size=4, micro_batch_size=3)


@pytest.mark.parametrize("kwargs, arg, exc", [({"steps": 0}, "steps", ValueError),
                                              ({"lr": 0.0}, "lr", ValueError),
                                              ({"warmup_steps": 400}, "warmup_steps", ValueError),
                                              ({"tp": True}, "tp", TypeError)])
def test_bad_config_is_named(kwargs, arg, exc):
    with pytest.raises(exc, match=rf"^{arg}\b"):
        TrainConfig(**kwargs)


def test_tp_the_model_cannot_split_is_rejected():
    with pytest.raises(ValueError, match=r"^tp: 3 does not divide num_heads"):
        train(TrainConfig(tp=3, **SHORT), CPU)  # tiny has 8 heads


def test_tp_larger_than_the_world_is_rejected():
    with pytest.raises(ValueError, match=r"^tp: .* does not divide the world size 1"):
        train(TrainConfig(tp=2, **SHORT), CPU)


def test_seq_len_beyond_the_model_is_rejected():
    with pytest.raises(ValueError, match=r"^seq_len\b"):
        train(TrainConfig(**{**SHORT, "seq_len": 512}), CPU)


# The torchrun tests' ranks run on the CPU (gloo) wherever the tests run: by default each
# rank takes the GPU of its local rank modulo the GPUs there are, so on a machine with fewer
# GPUs than ranks two ranks would share one, which NCCL refuses.
CPU_RANKS = ("--device", "cpu")


@pytest.mark.slow
def test_torchrun_tp_and_pp_on_four_ranks(tmp_path):
    """The README's 4-rank command, shortened: TP=2 x PP=2 with 4 microbatches."""
    metrics = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "-m", "eurocore.train", "--tp", "2", "--pp", "2", "--sequence-parallel",
         "--micro-batch-size", "4", "--steps", "3", "--log-every", "1",
         "--metrics-json", str(metrics), *CPU_RANKS],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tp 2 (sequence parallel) x pp 2" in result.stdout
    assert "expected pipeline bubble 20.0%" in result.stdout  # (2 - 1) / (4 + 2 - 1)
    assert len(json.loads(metrics.read_text())) == 3


@pytest.mark.slow
def test_torchrun_command(tmp_path):
    """The README's command, shortened: torchrun, 2 ranks, TP=2 with sequence parallelism."""
    metrics = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "eurocore.train", "--tp", "2", "--sequence-parallel", "--steps", "8",
         "--log-every", "4", "--metrics-json", str(metrics), *CPU_RANKS],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout and "floor" in result.stdout
    history = json.loads(metrics.read_text())
    assert [m["step"] for m in history] == [0, 4, 7]
