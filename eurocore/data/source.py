"""The one interface between the data and the trainer.

A token source serves global batches as a pure function of the step: every rank asks for
the rows it trains on, and every layout (TP, PP, DP) trains on the same global batches.
The synthetic Markov source and the tokenized corpus both implement it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Batch:
    """tokens, labels, position_ids: (rows, seq) int64. ``position_ids`` restart at 0 at
    each document's first token; a label of -100 is not trained on."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def rows(self, rows: slice) -> Batch:
        """The rows ``rows`` of this batch."""
        return Batch(self.tokens[rows], self.labels[rows], self.position_ids[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.tokens, self.labels, self.position_ids)))

    def pin_memory(self) -> Batch:
        """In page-locked memory (what DataLoader's pin_memory calls): a copy to the GPU
        can then run beside the compute."""
        return Batch(*(t.pin_memory() for t in (self.tokens, self.labels, self.position_ids)))


class TokenSource(Protocol):
    """Global batches of ``batch_size`` rows of ``seq_len`` tokens, on the CPU.

    ``loss_floor`` is the loss no model can beat in expectation, when the source knows it
    (None otherwise). ``describe`` is one line for the run's log. ``state_dict`` is what a
    resume must find unchanged (the data's identity) and where the run stands in it.
    """

    batch_size: int
    seq_len: int
    loss_floor: float | None

    def global_batch(self, step: int, rows: slice = slice(None)) -> Batch:
        """Rows ``rows`` of the global batch of optimizer step ``step``."""

    def validation_batch(self, index: int, rows: slice = slice(None)) -> Batch | None:
        """Rows ``rows`` of validation batch ``index`` (None: the source has no held-out
        data)."""

    def describe(self) -> str:
        """One line saying what the data is."""

    def progress(self, steps: int) -> list[str]:
        """Lines worth logging after ``steps`` optimizer steps (a source starting another
        epoch), each said once."""

    def state_dict(self) -> dict[str, Any]:
        """The data's identity, for a resume to check."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checks ``state`` names this data; raises ValueError saying what differs."""


def check_same_data(saved: dict[str, Any], ours: dict[str, Any]) -> None:
    """A resume's check of a source's ``state_dict``: raises ValueError naming each entry
    that differs between the saved run's data and this one's."""
    # as JSON sees them: a state read back from a checkpoint's JSON has lists for tuples
    saved, ours = json.loads(json.dumps(saved)), json.loads(json.dumps(ours))
    differ = sorted(k for k in set(ours) | set(saved) if ours.get(k) != saved.get(k))
    if differ:
        raise ValueError(f"data: the saved run's data differs in {', '.join(differ)}: saved "
                         f"{[saved.get(k) for k in differ]}, now "
                         f"{[ours.get(k) for k in differ]}")
