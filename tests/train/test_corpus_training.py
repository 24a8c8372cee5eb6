"""Training on prepared corpora: every layout trains on the same global batches (DP 2, PP 2
and TP 2 take one process's steps), and a TP=2 run's loss falls with validation logged."""

from __future__ import annotations

import pytest
import torch

from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, Trainer, build_source, train
from tests.data.corpora import make_corpus, make_tokenizer
from tests.parallel.launch import run_on_ranks

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The data fields of a run on two prepared corpora (70/30) with a 90/10 split."""
    root = tmp_path_factory.mktemp("corpus-training")
    tokenizer = make_tokenizer(root)
    big, small = (make_corpus(root, tokenizer, name, count, seed)
                  for name, count, seed in (("big", 240, 0), ("small", 80, 1)))
    return {"data_path": ("0.7", big, "0.3", small), "tokenizer": str(tokenizer),
            "split": "90,10", "data_cache_dir": str(root / "cache"), "data_workers": 0,
            "seq_len": 32}


def _run(rank: int, world: int, config: TrainConfig, expected: list[dict]) -> None:
    process = Process(rank, world, rank, torch.device("cpu"))
    history = train(config, process, log=lambda _: None)
    for got, want in zip(history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (rank, got, want)
        if "valid_loss" in want:
            assert got["valid_loss"] == pytest.approx(want["valid_loss"], rel=1e-5)


@pytest.mark.parametrize("layout", [{"batch_size": 4}, {"pp": 2}, {"tp": 2}],
                         ids=["dp2", "pp2", "tp2"])
def test_every_layout_trains_on_the_same_batches(corpus, layout):
    """Two ranks in another layout take one process's losses, step by step, validation
    included: the global batches (and the validation batches) are the same."""
    fields = {**corpus, "steps": 4, "batch_size": 4, "log_every": 1, "eval_every": 2,
              "eval_iters": 2, "num_layers": 2, "micro_batch_size": 2}
    expected = train(TrainConfig(**fields), CPU, log=lambda _: None)
    assert all("valid_loss" in m for m in expected if m["step"] in (1, 3))
    run_on_ranks(_run, 2, TrainConfig(**{**fields, **layout}), expected)


def _falls(rank: int, world: int, config: TrainConfig) -> None:
    history = train(config, Process(rank, world, rank, torch.device("cpu")),
                    log=lambda _: None)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    valid = [m["valid_loss"] for m in history if "valid_loss" in m]
    assert len(valid) == 3 and valid[-1] < valid[0], valid


@pytest.mark.slow
def test_tp2_run_on_prepared_data_learns(corpus):
    """TP=2 with sequence parallelism on the prepared corpora: the loss falls by a third and
    the validation loss, logged every 10 steps, falls too."""
    config = TrainConfig(**corpus, tp=2, sequence_parallel=True, steps=30, batch_size=8,
                         log_every=10, eval_every=10, eval_iters=2, lr=3e-3)
    run_on_ranks(_falls, 2, config)


def test_every_token_weighs_the_same_however_the_batch_is_split(corpus):
    """Rows hold different numbers of trained tokens (document ends are -100), so a mean of
    microbatch means would change with the microbatch size; the per-token weighting gives
    one microbatch of 4 and four of 1 the same losses, validation included."""
    fields = {**corpus, "steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 3,
              "eval_iters": 1, "num_layers": 2, "seq_len": 128}
    first = TrainConfig(**fields, micro_batch_size=4)
    source = build_source(first, first.model_config())
    kept = [(source.global_batch(step).labels != -100).sum(dim=1).tolist()
            for step in range(3)]
    assert any(len(set(row)) > 1 for row in kept), kept  # else both weightings agree
    whole = train(first, CPU, log=lambda _: None)
    split = train(TrainConfig(**fields, micro_batch_size=1), CPU, log=lambda _: None)
    for a, b in zip(whole, split, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert split[-1]["valid_loss"] == pytest.approx(whole[-1]["valid_loss"], rel=1e-5)


def test_train_step_runs_past_the_configured_steps(corpus):
    """train_step is the loop's unit: a caller may run it past config.steps (the data
    reads on, the learning rate stays at its minimum)."""
    config = TrainConfig(**corpus, steps=2, batch_size=2, num_layers=1, lr=1e-3)
    trainer = Trainer(config, CPU, log=lambda _: None)
    results = [trainer.train_step() for _ in range(4)]
    assert [r["step"] for r in results] == [0, 1, 2, 3] and trainer.step == 4
    assert all(torch.isfinite(r["loss"]) for r in results)
    assert results[3]["lr"] == pytest.approx(trainer.learning_rate(2)) == pytest.approx(1e-4)


def test_the_log_says_when_a_corpus_begins_another_epoch(corpus):
    """The run's log names each corpus's new epoch once, after the step before it; a run
    that ends just before a new epoch says nothing of it."""
    def log_of(steps: int) -> list[str]:
        lines: list[str] = []
        config = TrainConfig(**{**corpus, "seq_len": 64}, steps=steps, batch_size=32,
                             num_layers=1, log_every=1)
        train(config, CPU, log=lines.append)
        return lines

    lines = log_of(12)
    epochs = [line for line in lines if "begins epoch" in line]
    assert epochs and len(epochs) == len(set(epochs)), epochs
    first = int(epochs[0].rsplit(" ", 1)[1])  # "... by step K": K's batch starts it
    assert epochs[0].startswith("data: ") and lines[lines.index(epochs[0]) - 1].startswith(
        f"step {first - 1:5d}")
    shorter = log_of(first)
    assert not any("begins epoch" in line for line in shorter), shorter
    assert shorter[-1].startswith("done:") and shorter[-2].startswith(f"step {first - 1:5d}")
