"""Batches ahead of the step that needs them, in background worker processes.

    for step, batch in prefetch(source, rows, start=0, stop=steps, workers=2, pin=True):
        ...   # batch: this rank's rows of global batch `step`, pinned for a fast copy

A thin use of ``torch.utils.data.DataLoader``: the dataset's item i is rows ``rows`` of the
source's global batch i, so the order is the source's and the workers only read ahead.
Each worker keeps ``prefetch_factor`` (at least 2) steps ready.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from eurocore.data.source import Batch, TokenSource


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step``: (step, rows ``rows`` of the source's global batch ``step``)."""

    def __init__(self, source: TokenSource, rows: slice) -> None:
        self.source, self.rows = source, rows

    def __getitem__(self, step: int) -> tuple[int, Batch]:
        return step, self.source.global_batch(step, self.rows)


def prefetch(source: TokenSource, rows: slice, *, start: int, stop: int | None,
             workers: int = 2, pin: bool = False, prefetch_factor: int = 2
             ) -> Iterator[tuple[int, Batch]]:
    """(step, batch) for steps ``start .. stop - 1`` (``stop`` None: without end);
    ``workers`` processes read ahead (0: in this process, nothing ahead), batches in pinned
    memory when ``pin``."""
    steps = itertools.count(start) if stop is None else range(start, stop)
    if workers == 0:
        for step in steps:
            batch = source.global_batch(step, rows)
            yield step, batch.pin_memory() if pin else batch
        return
    loader = torch.utils.data.DataLoader(
        _StepBatches(source, rows), batch_size=None, sampler=steps, num_workers=workers,
        prefetch_factor=max(2, prefetch_factor), pin_memory=pin)
    yield from loader
