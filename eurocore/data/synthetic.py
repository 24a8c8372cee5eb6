"""Synthetic training data with a known loss floor: a seeded sparse Markov source.

Each token t has ``branching`` possible successors s_1..s_k (distinct, drawn at random)
with probabilities P_t (a flat Dirichlet draw). Documents start in the stationary
distribution π of the chain and follow it, so every next-token prediction inside a document
faces the conditional distribution of a stationary chain, and no model can do better in
expectation than its entropy rate

    H = Σ_t π_t · H(P_t) = -Σ_t π_t Σ_j P_t,j · log P_t,j     (nats per token)

which is what :meth:`MarkovSource.entropy_rate` returns: the floor the training log shows
the loss approaching. Rows of a batch pack several documents (lengths drawn uniformly from
``min_doc_len .. seq``); ``position_ids`` restart at each document and the label of each
document's last token is -100 (its successor starts an unrelated document).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from eurocore.data.source import Batch, check_same_data
from eurocore.utils.checks import check_int


class MarkovSource:
    """The chain of one ``seed``: successors (vocab, k), their probabilities and cumulative
    probabilities (vocab, k) fp64, and the stationary distribution π (vocab,) fp64.

    Args:
        vocab_size: tokens of the chain (the model's vocabulary).
        branching: successors per token, k in [1, vocab_size].
        seed: fixes the chain.
    """

    def __init__(self, vocab_size: int, branching: int = 4, seed: int = 0) -> None:
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("branching", branching, minimum=1, maximum=vocab_size)
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.branching, self.seed = vocab_size, branching, seed
        # k distinct successors per token: the top k of random scores over the vocabulary;
        # large vocabularies: random draws, collisions re-drawn until distinct
        if vocab_size <= 4096:
            scores = torch.rand(vocab_size, vocab_size, generator=gen)
            self.successors = scores.topk(branching, dim=1).indices
        else:
            self.successors = _distinct_successors(vocab_size, branching, gen)
        gamma = -torch.log(torch.rand(vocab_size, branching, generator=gen, dtype=torch.float64))
        self.probs = gamma / gamma.sum(dim=1, keepdim=True)  # flat Dirichlet
        self.cumulative = self.probs.cumsum(dim=1)
        self.stationary = self._stationary()

    def _stationary(self, iterations: int = 10000, tol: float = 1e-13) -> torch.Tensor:
        """π = π P by power iteration on the sparse transition matrix (lazy chain
        ½(I + P): same π, and it converges even when P is periodic)."""
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        flat_succ = self.successors.flatten()
        for _ in range(iterations):
            step = torch.zeros_like(pi).index_add_(0, flat_succ,
                                                   (pi[:, None] * self.probs).flatten())
            new = 0.5 * (pi + step)
            if (new - pi).abs().sum() < tol:
                return new / new.sum()
            pi = new
        return pi / pi.sum()

    def entropy_rate(self) -> float:
        """H = Σ_t π_t H(P_t) in nats per token: the expected loss of the true chain."""
        per_token = -(self.probs * self.probs.log()).sum(dim=1)
        return float((self.stationary * per_token).sum())

    def batch(self, batch: int, seq: int, step: int, *, stream: int = 0,
              min_doc_len: int | None = None, device: torch.device | str = "cpu") -> Batch:
        """Batch ``step`` of data stream ``stream`` (a data-parallel rank): a pure function
        of (seed, stream, step, shapes), the same on every rank of a TP group.

        Rows pack documents of lengths drawn from [min_doc_len, seq] (default seq // 4).
        """
        min_doc_len = max(2, seq // 4) if min_doc_len is None else min_doc_len
        if not 1 <= min_doc_len <= seq:
            raise ValueError(f"min_doc_len: expected an int in [1, {seq}], got {min_doc_len}")
        # Below 2**63 the seed is the formula's value; above, it wraps (manual_seed's range).
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + stream) * 1_000_033 + step) % 2**63)
        positions = _document_positions(batch, seq, min_doc_len, gen)
        starts = positions == 0
        first_tokens = torch.multinomial(self.stationary, batch * seq, replacement=True,
                                         generator=gen).view(batch, seq)
        uniforms = torch.rand(batch, seq, generator=gen, dtype=torch.float64)
        tokens = torch.empty(batch, seq, dtype=torch.int64)
        current = first_tokens[:, 0]
        tokens[:, 0] = current
        for i in range(1, seq):
            choice = (uniforms[:, i, None] > self.cumulative[current]).sum(dim=1)
            following = self.successors[current, choice.clamp_max(self.branching - 1)]
            current = torch.where(starts[:, i], first_tokens[:, i], following)
            tokens[:, i] = current
        labels = torch.roll(tokens, -1, dims=1)
        labels[torch.roll(starts, -1, dims=1)] = -100  # a document's last token
        return Batch(tokens.to(device), labels.to(device), positions.to(device))


def _document_positions(batch: int, seq: int, min_doc_len: int,
                        gen: torch.Generator) -> torch.Tensor:
    """(batch, seq) positions restarting at 0 at each document of a packed row."""
    rows = []
    for _ in range(batch):
        row, filled = [], 0
        while filled < seq:
            length = int(torch.randint(min_doc_len, seq + 1, (1,), generator=gen))
            length = min(length, seq - filled)
            row.append(torch.arange(length))
            filled += length
        rows.append(torch.cat(row))
    return torch.stack(rows)


def _distinct_successors(vocab_size: int, branching: int, gen: torch.Generator) -> torch.Tensor:
    succ = torch.randint(0, vocab_size, (vocab_size, branching), generator=gen)
    while True:
        ordered = succ.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not dup.any():
            return succ
        succ[dup] = torch.randint(0, vocab_size, (int(dup.sum()), branching), generator=gen)


def uniform_loss(vocab_size: int) -> float:
    """log(vocab): the loss of a model that knows nothing, the start of the curve."""
    return math.log(vocab_size)


class SyntheticSource:
    """The Markov chain as a token source (``eurocore.data.source.TokenSource``): global
    batch ``step`` is ``chain.batch(batch_size, seq_len, step)``, its loss floor the chain's
    entropy rate. No validation split: every batch is fresh and the floor is known."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, *, branching: int = 4,
                 seed: int = 0) -> None:
        self.chain = MarkovSource(vocab_size, branching, seed)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.loss_floor = self.chain.entropy_rate()

    def global_batch(self, step: int, rows: slice = slice(None)) -> Batch:
        return self.chain.batch(self.batch_size, self.seq_len, step).rows(rows)

    def validation_batch(self, index: int, rows: slice = slice(None)) -> Batch | None:
        return None

    def describe(self) -> str:
        chain = self.chain
        return (f"Markov source over {chain.vocab_size} tokens, {chain.branching} successors "
                f"each; loss floor (entropy rate) {self.loss_floor:.4f}, uniform "
                f"{uniform_loss(chain.vocab_size):.4f} nats")

    def progress(self, steps: int) -> list[str]:
        return []  # every batch is fresh

    def state_dict(self) -> dict[str, Any]:
        chain = self.chain
        return {"source": "markov", "vocab_size": chain.vocab_size,
                "branching": chain.branching, "seed": chain.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_data(state, self.state_dict())
