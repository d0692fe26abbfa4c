"""paused_gc: the collector off while a role starts, its cycles freed at the end, the collector as it was."""
from __future__ import annotations

import gc
import weakref

import pytest

from async_rlhf.cluster.gc_pause import paused_gc


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_no_collection_inside_and_the_cycles_made_there_are_freed_on_the_way_out() -> None:
    assert gc.isenabled()
    collections = gc.get_stats()[0]["collections"]
    with paused_gc():
        assert not gc.isenabled()
        cycle = weakref.ref(Node())  # unreachable at once, alive until a collection
        for _ in range(50_000):  # far past the young generation's threshold (700 allocations)
            Node()
        assert cycle() is not None and gc.get_stats()[0]["collections"] == collections
    assert gc.isenabled() and cycle() is None


def test_a_pause_inside_another_leaves_the_collector_to_the_outer_one() -> None:
    with paused_gc():
        with paused_gc():
            cycle = weakref.ref(Node())
        assert not gc.isenabled() and cycle() is not None
    assert gc.isenabled() and cycle() is None


def test_a_start_that_fails_still_enables_the_collector() -> None:
    with pytest.raises(RuntimeError, match="engine"), paused_gc():
        raise RuntimeError("engine failed to start")
    assert gc.isenabled()


def test_as_a_decorator_each_call_is_paused() -> None:
    @paused_gc()
    def start() -> bool:
        return gc.isenabled()

    assert start() is False and start() is False and gc.isenabled()


def test_the_collection_on_the_way_out_leaves_the_old_generation_alone() -> None:
    # A test process builds learners in-process one after another: a full collection each time walked its whole
    # heap (0.5-1 s a learner in the suite).
    gc.collect()
    full = gc.get_stats()[2]["collections"]
    with paused_gc():
        cycle = weakref.ref(Node())
    assert cycle() is None and gc.get_stats()[2]["collections"] == full
