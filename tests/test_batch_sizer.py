"""The learned batch size (engine/batch_sizer.py): the most images per second from the costs it has seen,
smaller batches where batching does not pay, and every size near the best one measured again now and then."""

from __future__ import annotations

import pytest

from omni_grpc.engine.batch_sizer import BatchSizer


def taught(costs: dict[int, float], *, max_size: int = 8, explore_every: int = 1000) -> BatchSizer:
    """A sizer that has seen calls of these sizes cost these seconds (after a shape's first, warm-up call)."""
    sizer = BatchSizer(max_size, explore_every=explore_every)
    sizer.observe("shape", 1, 99.0)  # the warm-up call: not a cost
    for samples, seconds in costs.items():
        sizer.observe("shape", samples, seconds)
    return sizer


def test_the_first_call_of_a_shape_is_not_taken_as_its_cost() -> None:
    sizer = BatchSizer(8)
    sizer.observe("shape", 4, 50.0)
    assert sizer.learned() == {}
    sizer.observe("shape", 4, 2.0)
    assert sizer.learned() == {"shape": {4: 2.0}}


def test_with_nothing_known_a_batch_takes_all_that_fit() -> None:
    sizer = BatchSizer(8)
    assert sizer.size("shape", 1, 5) == 5
    assert sizer.size("shape", 1, 20) == 8
    assert sizer.size("shape", 3, 3) == 3


def test_where_batching_pays_it_fills_the_batch() -> None:
    # A step's fixed cost dominates (a GPU): 8 samples cost 1.4 x one.
    sizer = taught({1: 1.0, 8: 1.4})
    assert sizer.size("shape", 1, 8) == 8
    assert sizer.size("shape", 1, 5) == 5  # between measured sizes: interpolated, still better the larger


def test_where_batching_does_not_pay_it_runs_one_at_a_time() -> None:
    # Compute-bound (a CPU at 512 px): 8 samples cost more than 8 single calls.
    sizer = taught({1: 1.0, 8: 8.6})
    assert sizer.size("shape", 1, 8) == 1
    # A request of several images is never split: its own size is the least a batch takes.
    assert sizer.size("shape", 3, 8) == 3


def test_it_picks_the_size_with_the_most_images_per_second() -> None:
    # Throughput peaks at 4 (8 spills out of a cache, say): 4/1.6 = 2.5 images/s against 8/4.0 = 2.0.
    sizer = taught({1: 1.0, 2: 1.1, 4: 1.6, 8: 4.0})
    assert sizer.size("shape", 1, 8) == 4
    # Of two sizes within 3% of each other, the smaller: the same throughput, less waiting.
    even = taught({1: 1.0, 2: 2.0, 4: 3.95})
    assert even.size("shape", 1, 4) == 1


def test_a_larger_size_than_any_measured_gets_tried() -> None:
    sizer = taught({1: 1.0, 2: 1.2})
    assert sizer.size("shape", 1, 8) == 8  # its cost is unknown, so it is assumed no dearer than 2's


def test_shapes_learn_apart() -> None:
    sizer = taught({1: 1.0, 8: 8.6})
    assert sizer.size("other shape", 1, 8) == 8


def test_now_and_then_a_neighbour_of_the_best_size_is_measured_again() -> None:
    sizer = taught({1: 1.0, 2: 1.1, 4: 1.6, 8: 4.0}, explore_every=4)
    sizes = [sizer.size("shape", 1, 8) for _ in range(16)]
    # The best (4) but every fourth batch, which tries the sizes beside it: one up, then one down.
    assert sizes == [4, 4, 4, 8, 4, 4, 4, 2, 4, 4, 4, 8, 4, 4, 4, 2]


def test_costs_follow_the_latest_calls() -> None:
    sizer = taught({1: 1.0, 8: 8.6})
    for _ in range(3):  # the machine got a GPU's worth of headroom: batches of 8 now cost 2 s
        sizer.observe("shape", 8, 2.0)
    assert sizer.learned()["shape"][8] == 2.0
    assert sizer.size("shape", 1, 8) == 8


def test_a_fill_policy_ignores_costs_and_an_unknown_policy_is_refused() -> None:
    sizer = BatchSizer(8, policy="fill")
    sizer.observe("shape", 1, 1.0)
    sizer.observe("shape", 1, 1.0)
    sizer.observe("shape", 8, 80.0)
    assert sizer.size("shape", 1, 8) == 8
    with pytest.raises(ValueError, match="batch policy must be one of learned, fill, not 'biggest'"):
        BatchSizer(8, policy="biggest")


def test_the_shapes_it_remembers_are_bounded_least_recently_used_first() -> None:
    sizer = BatchSizer(8, max_shapes=3)
    for key in ("a", "b", "c", "d"):  # clients choose the shapes: a flood of new ones must not grow it
        for seconds in (9.0, 1.0):
            sizer.observe(key, 1, seconds)
    assert list(sizer.learned()) == ["b", "c", "d"]
    sizer.size("b", 1, 4)  # asked about: the most recently used now
    sizer.observe("e", 1, 9.0)
    assert list(sizer.learned()) == ["d", "b"]  # "c" went; "e" has had only its warm-up call
