"""The warmup + cosine schedule and the AdamW parameter groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from eurocore.train.optim import adamw, learning_rate


def test_warmup_then_cosine():
    kw = {"peak": 1.0, "warmup_steps": 10, "total_steps": 110, "minimum": 0.1}
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(9, **kw) == pytest.approx(1.0)
    assert learning_rate(10, **kw) == pytest.approx(1.0)
    assert learning_rate(60, **kw) == pytest.approx(0.55)  # half way: the mean
    assert learning_rate(110, **kw) == pytest.approx(0.1)
    assert learning_rate(500, **kw) == pytest.approx(0.1)
    rates = [learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_only_matrices_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2}
    assert {p.dim() for p in no_decay["params"]} == {1}
