"""Where a rank's shard of a weight sits in the full, layout-free tensor.

A checkpoint that any layout can read stores each weight whole (its global shape) and each
rank writes, or reads, only the boxes it holds. Under tensor parallelism a rank's weight is
a row or column slice of the full matrix, or several (a fused q/k/v or gate/up matrix holds
its slice of each part, and the parts are separate full tensors); a vocabulary table holds
padding rows that belong to no full tensor. FSDP2 then keeps a range of that TP-local
weight's rows on each data-parallel rank (``torch.chunk`` over dim 0).

A :class:`FullSlice` says: rows ``rows`` of this rank's TP-local weight are the box of full
tensor ``part`` (shape ``full_shape``) that starts at ``offsets``; the box's other sizes are
the local weight's. The parallel layers describe their weights with ``full_slices``;
:func:`data_parallel_rows` and :func:`restrict` take FSDP's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FullSlice:
    """Rows ``rows`` of a TP-local weight = the box at ``offsets`` of full tensor ``part``.

    part: which full tensor (0 unless the weight fuses several, like q/k/v).
    full_shape: that full tensor's shape.
    rows: a range of the local weight's dim 0.
    offsets: where row ``rows.start`` (and the local weight's first column) sits in it.
    """

    part: int
    full_shape: tuple[int, ...]
    rows: range
    offsets: tuple[int, ...]


def data_parallel_rows(param: torch.Tensor) -> range:
    """The rows of the TP-local weight that this data-parallel rank holds of ``param``: all
    of them for a plain tensor; FSDP2's ``Shard(0)`` share of a DTensor (``torch.chunk``
    over the DP ranks: chunks of ceil(n / dp) rows, the last ones shorter or empty)."""
    if not hasattr(param, "to_local"):
        return range(param.shape[0])
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or getattr(placements[0], "dim", None) != 0:
        raise ValueError(f"param: expected FSDP2's Shard(0) over one mesh dimension, got "
                         f"{placements} over {mesh.ndim}")
    rows, parts, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // parts)
    first = min(rows, rank * chunk)
    local = range(first, min(rows, first + chunk))
    if len(local) != param.to_local().shape[0]:  # FSDP's sharding rule changed under us
        raise RuntimeError(f"param: FSDP holds {param.to_local().shape[0]} rows here, "
                           f"torch.chunk's rule says {len(local)}")
    return local


def restrict(slices: list[FullSlice], rows: range) -> list[FullSlice]:
    """``slices`` cut to the TP-local rows ``rows`` (a data-parallel share), with ``rows``
    renumbered from its start: the slices of the tensor that holds only those rows."""
    cut = []
    for piece in slices:
        first, last = max(piece.rows.start, rows.start), min(piece.rows.stop, rows.stop)
        if first >= last:
            continue
        shift = first - piece.rows.start
        cut.append(FullSlice(piece.part, piece.full_shape,
                             range(first - rows.start, last - rows.start),
                             (piece.offsets[0] + shift, *piece.offsets[1:])))
    return cut
