"""The synthetic Markov source: its entropy rate is the loss floor, batches are packed
documents, and everything is a pure function of the seeds."""

from __future__ import annotations

import math

import pytest
import torch

from eurocore.data import MarkovSource


def test_one_successor_has_zero_entropy_rate():
    assert MarkovSource(50, branching=1, seed=3).entropy_rate() == pytest.approx(0.0, abs=1e-12)


def test_entropy_rate_is_stationary_average_of_row_entropies():
    source = MarkovSource(40, branching=3, seed=1)
    pi = source.stationary
    # π is stationary: π P = π, with P built densely here
    dense = torch.zeros(40, 40, dtype=torch.float64)
    dense.scatter_add_(1, source.successors, source.probs)
    torch.testing.assert_close(pi @ dense, pi, rtol=0, atol=1e-12)
    assert pi.sum().item() == pytest.approx(1.0) and (pi >= 0).all()
    rows = -(dense.clamp_min(1e-300).log() * dense).sum(dim=1)
    assert source.entropy_rate() == pytest.approx(float(pi @ rows), rel=1e-12)
    assert 0 < source.entropy_rate() < math.log(3)


def test_samples_follow_the_chain_and_reach_the_entropy_rate():
    """The empirical cross-entropy of the true chain on sampled labels matches H."""
    source = MarkovSource(30, branching=4, seed=2)
    batch = source.batch(64, 96, step=0)
    tokens, labels = batch.tokens, batch.labels
    kept = labels != -100
    prev, nxt = tokens[kept], labels[kept]
    # every transition is one of the successors
    match = source.successors[prev] == nxt[:, None]
    assert match.any(dim=1).all()
    log_p = torch.log((source.probs[prev] * match).sum(dim=1))
    assert (-log_p.mean()).item() == pytest.approx(source.entropy_rate(), rel=0.05)


def test_batches_pack_documents_with_restarting_positions():
    source = MarkovSource(20, seed=0)
    batch = source.batch(5, 40, step=7, min_doc_len=6)
    positions, labels = batch.position_ids, batch.labels
    assert (positions[:, 0] == 0).all()
    steps = positions[:, 1:] - positions[:, :-1]
    assert ((steps == 1) | (positions[:, 1:] == 0)).all()
    assert (positions == 0).sum() > 5  # several documents per row on average
    # the last token of each document (next one starts a new document) is ignored
    last = torch.roll(positions, -1, dims=1) == 0
    assert (labels[last] == -100).all() and (labels[~last] != -100).all()
    # labels are the next tokens inside documents
    assert torch.equal(labels[:, :-1][~last[:, :-1]], batch.tokens[:, 1:][~last[:, :-1]])


def test_batches_are_pure_functions_of_seed_stream_and_step():
    a, b = MarkovSource(25, seed=4), MarkovSource(25, seed=4)
    first, again = a.batch(3, 16, step=2, stream=1), b.batch(3, 16, step=2, stream=1)
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.position_ids, again.position_ids)
    assert not torch.equal(first.tokens, a.batch(3, 16, step=3, stream=1).tokens)
    assert not torch.equal(first.tokens, a.batch(3, 16, step=2, stream=0).tokens)


def test_large_vocabularies_get_distinct_successors():
    source = MarkovSource(5000, branching=4, seed=0)
    ordered = source.successors.sort(dim=1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()


@pytest.mark.parametrize("kwargs, arg", [({"vocab_size": 0}, "vocab_size"),
                                         ({"vocab_size": 5, "branching": 6}, "branching")])
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        MarkovSource(**kwargs)
