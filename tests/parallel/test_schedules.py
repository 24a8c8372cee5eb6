"""Pipeline schedules: every step exactly once and in a valid order, the 1F1B in-flight
bound, and idle fractions equal to (p - 1) / (v·m + p - 1) in simulation."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from eurocore.parallel.schedules import (
    Step,
    bubble_fraction,
    max_in_flight,
    one_f_one_b,
    schedule,
    simulate,
)

LAYOUTS = [(2, 1, 1), (2, 4, 1), (4, 8, 1), (4, 3, 1), (4, 7, 1), (3, 5, 1),
           (2, 4, 2), (4, 8, 2), (4, 4, 2), (2, 6, 3), (4, 16, 4)]  # (p, m, v)


def _steps(p: int, m: int, v: int, name: str | None = None) -> list[list[Step]]:
    name = name or ("1f1b" if v == 1 else "interleaved-1f1b")
    return [schedule(name, rank, p, m, v) for rank in range(p)]


@pytest.mark.parametrize("name, p, m, v", [
    (name, p, m, v) for name in ("all-forward-all-backward", "1f1b", "interleaved-1f1b")
    for p, m, v in LAYOUTS if v == 1 or name == "interleaved-1f1b"])
def test_each_forward_and_backward_once_backward_after_forward(name, p, m, v):
    for rank, steps in enumerate(_steps(p, m, v, name)):
        counts = Counter(steps)
        expected = {Step(kind, mb, c) for kind in "FB" for mb in range(m) for c in range(v)}
        assert set(counts) == expected and set(counts.values()) == {1}, (rank, steps)
        for i, step in enumerate(steps):
            if step.kind == "B":
                assert Step("F", step.microbatch, step.chunk) in steps[:i], (rank, step)


@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 8), (4, 3), (4, 7), (3, 5), (8, 5)])
def test_1f1b_order_and_in_flight_bound(p, m):
    for rank in range(p):
        steps = one_f_one_b(rank, p, m)
        warmup = min(p - rank - 1, m)
        assert [s.kind for s in steps[:warmup]] == ["F"] * warmup
        steady = steps[warmup:warmup + 2 * (m - warmup)]
        assert [s.kind for s in steady] == ["F", "B"] * (m - warmup)
        # microbatches forward and backward in order
        assert [s.microbatch for s in steps if s.kind == "F"] == list(range(m))
        assert [s.microbatch for s in steps if s.kind == "B"] == list(range(m))
        assert max_in_flight(steps) == min(p - rank, m)


def test_1f1b_holds_fewer_activations_than_all_forward_all_backward():
    assert max_in_flight(schedule("all-forward-all-backward", 0, 4, 8)) == 8
    assert max_in_flight(schedule("1f1b", 0, 4, 8)) == 4


def test_interleaved_visits_chunks_in_groups_of_p():
    p, m, v = 2, 4, 2
    forwards = [(s.microbatch, s.chunk) for s in schedule("interleaved-1f1b", 0, p, m, v)
                if s.kind == "F"]
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    backwards = [(s.microbatch, s.chunk) for s in schedule("interleaved-1f1b", 0, p, m, v)
                 if s.kind == "B"]
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]


@pytest.mark.parametrize("p, m, v", LAYOUTS)
def test_simulated_idle_fraction_is_the_bubble_formula(p, m, v):
    """Forward 1 and backward 2 units per stage, split evenly over the v chunks."""
    timeline = simulate(_steps(p, m, v), v, forward_cost=1.0 / v, backward_cost=2.0 / v)
    for rank in range(p):
        assert timeline.idle_fraction(rank) == pytest.approx(bubble_fraction(p, m, v))
    assert timeline.makespan == pytest.approx(3.0 * (m + (p - 1) / v))


def test_all_forward_all_backward_has_the_same_bubble():
    timeline = simulate(_steps(4, 8, 1, "all-forward-all-backward"))
    assert timeline.idle_fraction(0) == pytest.approx(bubble_fraction(4, 8))


def test_a_deadlocking_schedule_is_reported():
    # rank 0 waits for a backward that rank 1 only runs after a forward rank 0 never sends
    steps = [[Step("B", 0), Step("F", 0)], [Step("F", 0), Step("B", 0)]]
    with pytest.raises(ValueError, match=r"^steps_per_rank: the schedule deadlocks"):
        simulate(steps)


def test_interleaved_needs_microbatches_divisible_by_stages():
    with pytest.raises(ValueError, match=r"^num_microbatches: .* multiple of the pipeline "
                                         r"size 4, got 6; use 8"):
        schedule("interleaved-1f1b", 0, 4, 6, 2)


@pytest.mark.parametrize("args, arg", [((0, 0, 4), "num_stages"), ((0, 2, 0), "num_microbatches"),
                                       ((2, 2, 4), "rank")])
def test_bad_arguments_are_named(args, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        schedule("1f1b", *args)
    with pytest.raises(ValueError, match=r"^name\b"):
        schedule("zero-bubble", 0, 2, 2)


def test_interleaved_with_one_chunk_is_1f1b():
    for p, m in itertools.product((2, 4), (4, 8)):
        for rank in range(p):
            assert schedule("interleaved-1f1b", rank, p, m, 1) == one_f_one_b(rank, p, m)
