"""Activation recomputation (--recompute full): a recomputed layer keeps only its input for
the backward, and the losses, gradient norms and weights after training equal those
without recomputation, in one process and at TP 2 with SP, PP 2 and DP 2."""

from __future__ import annotations

import pytest
import torch

from eurocore.model import preset
from eurocore.model.llama import LlamaModel
from eurocore.train.cli import build_parser, parse_config
from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, Trainer
from tests.parallel.launch import run_on_ranks

RUN = {"steps": 3, "batch_size": 4, "seq_len": 32, "micro_batch_size": 1, "data_workers": 0,
       "eval_every": 0, "log_every": 1, "model_overrides": {"num_layers": 4}}


def _saved_bytes(model: LlamaModel, tokens: torch.Tensor) -> int:
    """Bytes the forward keeps for the backward (what autograd saves)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens).backward()
    return sum(saved)


def test_a_recomputed_layer_keeps_only_its_input():
    config = preset("tiny", num_layers=4)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    kept = _saved_bytes(LlamaModel(config), tokens)
    recomputed = _saved_bytes(LlamaModel(config, recompute_layers=range(4)), tokens)
    two = _saved_bytes(LlamaModel(config, recompute_layers=[1, 2]), tokens)
    layer_input = tokens.numel() * config.hidden_size * 4  # fp32 (seq, batch, hidden)
    per_layer = (kept - recomputed) / 4
    assert per_layer > 10 * layer_input  # a layer saves far more than its input
    assert two == pytest.approx(kept - 2 * per_layer)


def _losses(config: TrainConfig, process: Process) -> list[tuple[float, float]]:
    trainer = Trainer(config, process, log=lambda _: None)
    history = trainer.train()
    return [(m["loss"], m["grad_norm"]) for m in history]


def test_recomputation_changes_no_loss_in_one_process():
    cpu = Process(0, 1, 0, torch.device("cpu"))
    assert _losses(TrainConfig(**RUN), cpu) == \
        _losses(TrainConfig(**RUN, recompute="full"), cpu)


LAYOUTS = [{"tp": 2, "sequence_parallel": True}, {"pp": 2, "recompute_layers": (1, 2)}, {}]


def _compare_layouts(rank: int, world: int) -> None:
    process = Process(rank, world, rank, torch.device("cpu"))
    for layout in LAYOUTS:
        plain = {k: v for k, v in layout.items() if k != "recompute_layers"}
        without = _losses(TrainConfig(**RUN, **plain), process)
        with_ = _losses(TrainConfig(**RUN, **layout, recompute="full"), process)
        flat = [x for pair in without for x in pair]
        assert [x for pair in with_ for x in pair] == pytest.approx(flat, rel=1e-6), layout


def test_recomputation_changes_no_loss_at_tp2_pp2_dp2():
    run_on_ranks(_compare_layouts, 2)


def test_the_options():
    parser = build_parser("eurocore train", "")
    config = parse_config(parser, ["--recompute", "full", "--recompute-layers", "0,1"])
    assert config.recomputed_layers() == (0, 1)
    assert parse_config(parser, ["--recompute", "full"]).recomputed_layers() == (0, 1)
    with pytest.raises(ValueError, match=r"^recompute_layers: "):
        TrainConfig(recompute="full", recompute_layers=(2,))  # tiny has layers 0 and 1
    with pytest.raises(ValueError, match=r"^recompute_layers: chooses layers for"):
        TrainConfig(recompute_layers=(0,))
