"""Training on prepared corpora: every layout trains on the same global batches (DP 2, PP 2
and TP 2 take one process's steps), and a TP=2 run's loss falls with validation logged."""

from __future__ import annotations

import pytest
import torch

from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, train
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
