"""Activation recomputation (--recompute selective|full): what a layer keeps for the
backward, and the losses and gradient norms equal to those without recomputation, in one
process and at TP 2 with SP, PP 2 (some layers only) and DP 2."""

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
    """Bytes the forward keeps for the backward: the storages of what autograd saves, each
    once, measured when the forward has ended (selective recomputation empties some), not
    counting parameters. Then runs the backward (the refilled storages feed it)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                  lambda t: t):
        loss = model(tokens, tokens)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    loss.backward()
    return sum(n for ptr, n in storages.items() if ptr and ptr not in params)


def test_what_a_recomputed_layer_keeps():
    """full: only the layer's input; selective: everything but the two norm outputs and the
    SwiGLU product, exactly; chosen layers only."""
    config = preset("tiny", num_layers=4)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    kept = _saved_bytes(LlamaModel(config), tokens)
    full = _saved_bytes(LlamaModel(config, recompute="full"), tokens)
    two = _saved_bytes(LlamaModel(config, recompute="full", recompute_layers=[1, 2]), tokens)
    layer_input = tokens.numel() * config.hidden_size * 4  # fp32 (seq, batch, hidden)
    per_layer = (kept - full) / 4 + layer_input
    assert per_layer > 10 * layer_input  # a layer saves far more than its input
    assert two == kept - 2 * (per_layer - layer_input)
    selective = _saved_bytes(LlamaModel(config, recompute="selective"), tokens)
    freed = 4 * tokens.numel() * (2 * config.hidden_size + config.ffn_hidden_size)
    assert selective == kept - 4 * freed
    one = _saved_bytes(LlamaModel(config, recompute="selective", recompute_layers=[3]), tokens)
    assert one == kept - freed


def _losses(config: TrainConfig, process: Process) -> list[tuple[float, float]]:
    trainer = Trainer(config, process, log=lambda _: None)
    history = trainer.train()
    return [(m["loss"], m["grad_norm"]) for m in history]


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_changes_no_loss_in_one_process(recompute):
    cpu = Process(0, 1, 0, torch.device("cpu"))
    assert _losses(TrainConfig(**RUN), cpu) == \
        _losses(TrainConfig(**RUN, recompute=recompute), cpu)


def test_selective_gradients_are_the_same_bits():
    """Every parameter's gradient, not only their norm."""
    config = preset("tiny", num_layers=2)
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    grads = []
    for recompute in ("none", "selective"):
        model = LlamaModel(config, recompute=recompute)
        model(tokens, tokens).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


LAYOUTS = [{"tp": 2, "sequence_parallel": True}, {"pp": 2, "recompute_layers": (1, 2)}, {}]


def _compare_layouts(rank: int, world: int) -> None:
    process = Process(rank, world, rank, torch.device("cpu"))
    for layout in LAYOUTS:
        plain = {k: v for k, v in layout.items() if k != "recompute_layers"}
        without = _losses(TrainConfig(**RUN, **plain), process)
        full = _losses(TrainConfig(**RUN, **layout, recompute="full"), process)
        flat = [x for pair in without for x in pair]
        assert [x for pair in full for x in pair] == pytest.approx(flat, rel=1e-6), layout
        # selective recomputes the same values with the same kernels: the same bits
        assert _losses(TrainConfig(**RUN, **layout, recompute="selective"), process) == \
            without, layout


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
