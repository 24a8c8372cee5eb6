"""Each collective against the same computation on full tensors, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from eurocore.parallel import (
    ParallelGroups,
    all_gather_forward_reduce_scatter_backward,
    all_gather_forward_split_backward,
    all_reduce_forward_copy_backward,
    copy_forward_all_reduce_backward,
    reduce_scatter_forward_all_gather_backward,
    split_forward_all_gather_backward,
)
from tests.parallel.launch import run_on_ranks

SHAPE = (8, 3, 12)  # divisible by 2 and 4 along dims 0 and 2


def _full(seed: int) -> torch.Tensor:
    """The same random tensor on every rank."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _per_rank(seed: int, rank: int) -> torch.Tensor:
    return _full(seed + 100 * (rank + 1))


def _check_collectives(rank: int, world: int) -> None:
    group = dist.group.WORLD
    chunk = lambda t, dim: t.chunk(world, dim)[rank]  # noqa: E731

    # Identity forward, all-reduce backward: the input gradient is the sum of every rank's.
    x = _full(0).requires_grad_()
    y = copy_forward_all_reduce_backward(x, group)
    assert torch.equal(y, x)
    y.backward(_per_rank(1, rank))
    assert torch.allclose(x.grad, sum(_per_rank(1, r) for r in range(world)))

    # All-reduce forward, copy backward.
    x = _per_rank(2, rank).requires_grad_()
    y = all_reduce_forward_copy_backward(x, group)
    assert torch.allclose(y, sum(_per_rank(2, r) for r in range(world)))
    y.backward(_full(3))
    assert torch.equal(x.grad, _full(3))

    for dim in (0, -1):
        # Split forward, all-gather backward.
        x = _full(4).requires_grad_()
        y = split_forward_all_gather_backward(x, group, dim)
        assert torch.equal(y, chunk(_full(4), dim))
        y.backward(chunk(_full(5), dim))
        assert torch.equal(x.grad, _full(5))

        # All-gather forward, split backward.
        x = chunk(_full(6), dim).clone().requires_grad_()
        y = all_gather_forward_split_backward(x, group, dim)
        assert torch.equal(y, _full(6))
        y.backward(_full(7))
        assert torch.equal(x.grad, chunk(_full(7), dim))

        # All-gather forward, reduce-scatter backward (sequence parallelism).
        x = chunk(_full(8), dim).clone().requires_grad_()
        y = all_gather_forward_reduce_scatter_backward(x, group, dim)
        assert torch.equal(y, _full(8))
        y.backward(_per_rank(9, rank))
        total = sum(_per_rank(9, r) for r in range(world))
        assert torch.allclose(x.grad, chunk(total, dim))

        # Reduce-scatter forward, all-gather backward.
        x = _per_rank(10, rank).requires_grad_()
        y = reduce_scatter_forward_all_gather_backward(x, group, dim)
        total = sum(_per_rank(10, r) for r in range(world))
        assert torch.allclose(y, chunk(total, dim))
        y.backward(chunk(_full(11), dim))
        assert torch.equal(x.grad, _full(11))

    with pytest.raises(ValueError, match=r"^x\b"):
        split_forward_all_gather_backward(torch.zeros(5, 3), group, 0)


def _check_groups(rank: int, world: int, tp: int, pp: int) -> None:
    groups = ParallelGroups.build(tp=tp, pp=pp)
    assert (groups.tp_size, groups.pp_size, groups.dp_size) == (tp, pp, world // (tp * pp))
    # tp varies fastest: a TP group holds adjacent ranks.
    assert groups.tp_rank == rank % tp
    assert groups.dp_rank == (rank // tp) % groups.dp_size
    assert groups.pp_rank == rank // (tp * groups.dp_size)
    if tp > 1:
        assert dist.get_process_group_ranks(groups.tp_group) == list(
            range(rank - rank % tp, rank - rank % tp + tp))
    else:
        assert groups.tp_group is None
    with pytest.raises(ValueError, match=r"^tp\b"):
        ParallelGroups.build(tp=world + 1)
    with pytest.raises(ValueError, match=r"^dp\b"):
        ParallelGroups.build(tp=tp, pp=pp, dp=world)


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_full_tensors(world):
    run_on_ranks(_check_collectives, world)


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2), (1, 2), (4, 1)])
def test_groups_place_tensor_parallel_ranks_together(tp, pp):
    run_on_ranks(_check_groups, 4, tp, pp)


def test_single_process_needs_no_distributed():
    groups = ParallelGroups.build()
    assert groups == ParallelGroups.single()
    x = torch.randn(4, 6, requires_grad=True)
    for fn in (copy_forward_all_reduce_backward, all_reduce_forward_copy_backward):
        assert fn(x, groups.tp_group) is x
    assert split_forward_all_gather_backward(x, groups.tp_group) is x
    assert all_gather_forward_split_backward(x, groups.tp_group) is x


def test_bad_layout_on_one_process_names_the_size():
    with pytest.raises(ValueError, match=r"^tp\b.*divide"):
        ParallelGroups.build(tp=2)
    with pytest.raises(ValueError, match=r"^pp\b"):
        ParallelGroups.build(pp=0)


def test_require_divisible_by_tp_names_the_quantity():
    groups = ParallelGroups(tp_size=3)
    groups.require_divisible_by_tp("kv_heads", 9)
    with pytest.raises(ValueError, match=r"^kv_heads: 8 is not divisible by tp = 3"):
        groups.require_divisible_by_tp("kv_heads", 8)
