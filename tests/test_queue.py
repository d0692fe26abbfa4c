"""RolloutQueue and the generation gate: staleness exactly at the bound, the off-by-one cases."""
from __future__ import annotations

import heapq
from dataclasses import replace

import pytest

from async_rlhf.pipeline.queue import (
    GateInputs,
    QueueFullError,
    RolloutQueue,
    StalenessMode,
    chunk_version,
    fixed_version,
    generation_allowed,
    take_limit,
    target_step,
)
from tests.helpers import make_group


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_take_keeps_exactly_the_bound_and_drops_one_more(bound: int) -> None:
    q = RolloutQueue(capacity=10, max_staleness=bound)
    learner_version = 5
    at_bound = make_group(learner_version - bound, prompt_id=1)
    beyond = make_group(learner_version - bound - 1, prompt_id=2)
    q.put(beyond)
    q.put(at_bound)
    batch = q.take(1, learner_version)
    assert batch == [at_bound]
    assert q.counters.dropped_stale == 1
    assert q.counters.staleness == {bound: 1}
    assert q.counters.max_staleness_seen == bound


def test_staleness_counts_time_spent_in_the_queue() -> None:
    q = RolloutQueue(capacity=4, max_staleness=1)
    q.put(make_group(version=3))
    assert q.take(1, learner_version=5) is None  # fresh when queued (3 vs 3), too old at train time
    assert q.counters.dropped_stale == 1 and len(q) == 0


def test_take_waits_for_a_full_batch_and_is_fifo() -> None:
    q = RolloutQueue(capacity=4, max_staleness=0)
    groups = [make_group(0, prompt_id=i) for i in range(3)]
    for g in groups[:1]:
        q.put(g)
    assert q.take(2, 0) is None and len(q) == 1
    q.put(groups[1])
    assert q.take(2, 0) == groups[:2]
    assert q.counters.consumed == 2 and q.counters.produced == 2


def test_a_group_that_arrives_after_a_newer_one_still_trains_first() -> None:
    # One generator, bound 1: the chunk sampled with version 0 (for step 1) is queued after the one sampled with
    # version 1 (for step 2). Taken in arrival order, step 1 would train the newer chunk and step 2 drop the older.
    q = RolloutQueue(capacity=4, max_staleness=1)
    older, newer = make_group(0, prompt_id=1), make_group(1, prompt_id=2)
    q.put(newer)
    q.put(older)
    assert q.take(1, learner_version=1) == [older]
    assert q.take(1, learner_version=2) == [newer]
    assert q.counters.dropped_stale == 0 and q.counters.staleness == {1: 2}


def test_capacity_is_enforced_and_failures_counted() -> None:
    q = RolloutQueue(capacity=1, max_staleness=0)
    q.put(make_group(0, rewards=[1.0, None, None]))
    assert q.counters.failed_reward == 2
    with pytest.raises(QueueFullError):
        q.put(make_group(0))
    with pytest.raises(ValueError):
        RolloutQueue(capacity=1, max_staleness=-1)


def gate(**kw) -> GateInputs:
    base = dict(steps_taken=0, outstanding=0, published_version=0, chunk=4, prompts_per_step=4,
                max_staleness=1, total_steps=100, capacity=100)
    return GateInputs(**{**base, **kw})


def test_gate_target_step_and_bound() -> None:
    assert target_step(gate(steps_taken=3, outstanding=8)) == 5
    # N=0: only the step that the current weights will train.
    assert generation_allowed(gate(max_staleness=0))
    assert not generation_allowed(gate(max_staleness=0, outstanding=4))
    assert not generation_allowed(gate(max_staleness=0, steps_taken=1))  # learner busy with step 0
    assert generation_allowed(gate(max_staleness=0, steps_taken=1, published_version=1))
    # N=1: one step ahead, not two.
    assert generation_allowed(gate(outstanding=4))
    assert not generation_allowed(gate(outstanding=8))
    # run length and capacity
    assert not generation_allowed(gate(total_steps=1, outstanding=4))
    assert not generation_allowed(gate(capacity=6, outstanding=4))


def simulate(bound: int, gen_s: float | tuple[float, ...], learn_s: float, steps: int = 12, gens: int = 1,
             new_bound_at: tuple[int, int] | None = None, mode: StalenessMode = "bound", depth: int = 1
             ) -> tuple[list[int], int, float]:
    """Discrete-event run of the controller's loop (drop stale, gate, take) with fixed job times.

    `gen_s` may give each generator its own time; `new_bound_at=(step, N)` changes the bound once
    `step` batches were taken, as over HTTP; `mode` is queue.staleness_mode; `depth` is
    generation.chunks_in_flight (a queued chunk starts when the generator's previous one ends).
    Returns the staleness of every consumed group, the number dropped, and the finish time.
    """
    ppstep, chunk = 4, 4 // gens
    times = gen_s if isinstance(gen_s, tuple) else (gen_s,) * gens
    q = RolloutQueue(capacity=(bound + 1) * ppstep, max_staleness=bound)
    published = steps_taken = outstanding = 0
    # (time, seq, kind, payload): a generation's payload is (version, generator), a learner step's None.
    events: list[tuple[float, int, str, tuple[int, int] | None]] = []
    queued = [0] * gens  # chunks queued on each generator
    free_at = [0.0] * gens  # when its last queued chunk ends
    learner_busy, now, seq, seen = False, 0.0, 0, []
    while steps_taken < steps or learner_busy:
        if new_bound_at and steps_taken >= new_bound_at[0]:
            q.max_staleness = bound = new_bound_at[1]
        outstanding -= q.drop_stale(steps_taken)  # the next batch trains at version == steps_taken
        def inputs() -> GateInputs:  # reads the loop's current state on purpose (B023)
            return GateInputs(
                steps_taken, outstanding, published, chunk, ppstep, bound, steps, q.capacity, mode)  # noqa: B023

        while (open_ := [i for i in range(gens) if queued[i] < depth]) and generation_allowed(g := inputs()):
            gen = min(open_, key=lambda i: (queued[i], i))  # breadth first, as GeneratorPool.dispatch
            queued[gen] += 1
            outstanding += chunk
            seq += 1
            free_at[gen] = max(now, free_at[gen]) + times[gen]
            heapq.heappush(events, (free_at[gen], seq, "gen", (chunk_version(g), gen)))
        if not learner_busy and steps_taken < steps:
            batch = q.take(ppstep, steps_taken, take_limit(inputs()))
            if batch:
                seen += [published - g.policy_version for g in batch]
                outstanding -= ppstep
                steps_taken += 1
                learner_busy = True
                seq += 1
                heapq.heappush(events, (now + learn_s, seq, "learn", None))
        now, _, kind, payload = heapq.heappop(events)
        if kind == "gen":
            assert payload is not None
            version, gen = payload
            queued[gen] -= 1
            for i in range(chunk):
                q.put(make_group(version, prompt_id=i))
        else:
            learner_busy, published = False, published + 1
    return seen, q.counters.dropped_stale, now


def test_synchronous_run_trains_only_fresh_samples_and_does_not_overlap() -> None:
    seen, dropped, finish = simulate(bound=0, gen_s=1.0, learn_s=1.0, steps=10)
    assert set(seen) == {0} and dropped == 0 and len(seen) == 40
    assert finish == pytest.approx(20.0)  # generate, train, generate, train ...


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_async_run_reaches_but_never_exceeds_the_bound(bound: int) -> None:
    # A fast generator runs ahead as far as the gate lets it: staleness settles at the bound.
    seen, dropped, _ = simulate(bound=bound, gen_s=0.1, learn_s=1.0, steps=12)
    assert max(seen) == bound and dropped == 0
    assert seen[-4:] == [bound] * 4


def test_one_step_off_policy_overlaps_equal_phases() -> None:
    seen, dropped, finish = simulate(bound=1, gen_s=1.0, learn_s=1.0, steps=10)
    assert max(seen) == 1 and dropped == 0
    assert finish == pytest.approx(11.0)  # the paper's ideal: generation hidden behind learning


def test_several_generators_share_a_step() -> None:
    seen, dropped, _ = simulate(bound=1, gen_s=0.5, learn_s=1.0, steps=8, gens=2)
    assert len(seen) == 32 and max(seen) <= 1 and dropped == 0


def test_lowering_the_bound_mid_run_drops_old_samples_and_keeps_going() -> None:
    # A fast generator is 2 versions ahead when the bound drops from 2 to 0: its queued samples
    # are dropped, fresh ones are generated, and the run still completes every step.
    seen, dropped, _ = simulate(bound=2, gen_s=0.1, learn_s=1.0, steps=12, new_bound_at=(6, 0))
    assert len(seen) == 12 * 4 and dropped > 0
    assert seen[-4 * 5:] == [0] * 20  # after the switch settles, only fresh samples are trained


# ---- fixed delay (queue.staleness_mode=fixed) ----------------------------------------------

def fixed(**kw) -> GateInputs:
    """N=2, 16 prompts a step in chunks of 8 (two generators), default capacity (N+1)*16 = 48."""
    base = {"max_staleness": 2, "chunk": 8, "prompts_per_step": 16, "capacity": 48, "total_steps": 6,
            "staleness_mode": "fixed"}
    return gate(**{**base, **kw})


def test_fixed_version_is_n_behind_the_step_and_never_below_the_first() -> None:
    assert [fixed_version(t, 2) for t in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [fixed_version(t, 2, first_version=4) for t in range(4, 8)] == [4, 4, 4, 5]  # resumed at step 4
    assert [fixed_version(t, 0) for t in range(3)] == [0, 1, 2]  # N=0: synchronous


def test_fixed_gate_hand_worked() -> None:
    # Steps 0..2 are sampled with version 0: six chunks go out at once, until the 48 groups of capacity.
    for outstanding, step in [(0, 0), (8, 0), (16, 1), (24, 1), (32, 2), (40, 2)]:
        g = fixed(outstanding=outstanding)
        assert target_step(g) == step and generation_allowed(g) and chunk_version(g) == 0
    assert not generation_allowed(fixed(outstanding=48))  # capacity
    # Step 0 taken (learner busy, version 0 the newest): step 3 needs version 1, so it waits ...
    assert not generation_allowed(fixed(steps_taken=1, outstanding=32))
    # ... and goes out with version 1 once published.
    g = fixed(steps_taken=1, outstanding=32, published_version=1)
    assert target_step(g) == 3 and generation_allowed(g) and chunk_version(g) == 1
    g = fixed(steps_taken=2, outstanding=32, published_version=2)
    assert (target_step(g), chunk_version(g)) == (4, 2)
    g = fixed(steps_taken=3, outstanding=32, published_version=3)
    assert (target_step(g), chunk_version(g)) == (5, 3)
    assert not generation_allowed(fixed(steps_taken=4, outstanding=32, published_version=4))  # step 6: run over
    # A lagging generator: step 3's prompts still go out with version 1, although 3 is out.
    g = fixed(steps_taken=3, outstanding=0, published_version=3)
    assert generation_allowed(g) and chunk_version(g) == 1
    assert chunk_version(replace(g, staleness_mode="bound")) == 3  # bound mode: the newest
    # The learner's batch at step t holds version max(0, t - N) or older; bound mode does not limit it.
    assert [take_limit(fixed(steps_taken=t)) for t in range(6)] == [0, 0, 0, 1, 2, 3]
    assert take_limit(gate(steps_taken=5)) is None


def test_take_with_max_version_leaves_a_later_steps_groups_queued() -> None:
    q = RolloutQueue(capacity=4, max_staleness=2)
    early = make_group(1, prompt_id=1)  # sampled for step 3, finished before step 2's
    q.put(early)
    assert q.take(1, learner_version=2, max_version=0) is None
    on_time = make_group(0, prompt_id=2)
    q.put(on_time)
    assert q.take(1, learner_version=2, max_version=0) == [on_time]
    assert q.items() == [early] and q.counters.staleness == {2: 1}


@pytest.mark.parametrize("gen_s", [0.1, 3.0])
def test_fixed_delay_trains_exactly_n_versions_old(gen_s: float) -> None:
    # Fast or slow generator alike: step t trains on version max(0, t - N).
    seen, dropped, _ = simulate(bound=2, gen_s=gen_s, learn_s=1.0, steps=8, mode="fixed")
    per_step = [set(seen[i * 4:(i + 1) * 4]) for i in range(8)]
    assert per_step == [{0}, {1}] + [{2}] * 6 and dropped == 0


def test_bound_mode_with_a_slow_generator_stays_below_the_bound() -> None:
    # Why fixed mode exists: generation slower than learning never lets staleness reach N.
    seen, _, _ = simulate(bound=2, gen_s=3.0, learn_s=1.0, steps=8)
    assert max(seen) < 2


def test_bound_mode_with_unequal_generators_trains_the_older_version_first() -> None:
    # A slow generator's chunk lands after newer ones; taken oldest version first it still trains within N=2
    # (taken in arrival order, 26 of these 120 groups were dropped and generated again).
    for depth, most_dropped in ((1, 0), (2, 2)):
        seen, dropped, _ = simulate(bound=2, gen_s=(0.3, 1.7), learn_s=1.0, steps=30, gens=2, depth=depth)
        assert len(seen) == 120 and max(seen) <= 2 and dropped <= most_dropped


def test_fixed_delay_with_unequal_generators_keeps_each_step_on_its_version() -> None:
    # Chunks finish out of order; the take waits for the step's own version, nothing is dropped.
    seen, dropped, _ = simulate(bound=2, gen_s=(0.3, 1.7), learn_s=1.0, steps=10, gens=2, mode="fixed")
    assert len(seen) == 40 and dropped == 0
    assert [set(seen[i * 4:(i + 1) * 4]) for i in range(10)] == [{0}, {1}] + [{2}] * 8


# ---- two chunks in flight per generator (generation.chunks_in_flight=2) ---------------------

def test_gate_with_a_second_chunk_queued_hand_worked() -> None:
    # One generator, 4 prompts a step in one chunk, N=1. Learner busy with step 0 (steps_taken=1),
    # version 0 the newest; the generator samples step 1's chunk (outstanding 4).
    g = gate(steps_taken=1, outstanding=4)
    assert target_step(g) == 2 and not generation_allowed(g)  # step 2 with version 0: 2 behind, over N=1
    g = gate(steps_taken=1, outstanding=4, published_version=1)  # step 0 published version 1
    assert generation_allowed(g) and chunk_version(g) == 1  # queued behind step 1's chunk, 1 behind step 2
    assert not generation_allowed(gate(steps_taken=1, outstanding=8, published_version=1))  # a third: step 3
    # N=0: the chunk of the step being sampled closes the gate; no second one, for any number of generators.
    assert not generation_allowed(gate(max_staleness=0, outstanding=4))
    two = gate(max_staleness=0, chunk=2)  # two generators, a step in two chunks of 2
    assert generation_allowed(two) and generation_allowed(replace(two, outstanding=2))
    assert not generation_allowed(replace(two, outstanding=4))
    # Fixed delay, N=2, two generators: each may queue a second chunk only for a step whose version is out.
    assert [target_step(fixed(outstanding=o)) for o in (0, 8, 16, 24, 32, 40)] == [0, 0, 1, 1, 2, 2]
    g = fixed(steps_taken=1, outstanding=32)  # step 3 needs version 1
    assert not generation_allowed(g)
    assert chunk_version(replace(g, published_version=1)) == 1


def test_two_in_flight_keeps_a_synchronous_run_synchronous() -> None:
    for gens in (1, 2):
        assert simulate(bound=0, gen_s=1.0, learn_s=1.0, steps=10, gens=gens, depth=2) == \
            simulate(bound=0, gen_s=1.0, learn_s=1.0, steps=10, gens=gens, depth=1)
    seen, dropped, finish = simulate(bound=0, gen_s=1.0, learn_s=1.0, steps=10, depth=2)
    assert set(seen) == {0} and dropped == 0 and finish == pytest.approx(20.0)


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_two_in_flight_reach_but_never_exceed_the_bound(bound: int) -> None:
    seen, dropped, _ = simulate(bound=bound, gen_s=0.1, learn_s=1.0, steps=12, depth=2)
    assert max(seen) == bound and dropped == 0 and len(seen) == 48


def test_two_in_flight_fixed_delay_trains_exactly_n_versions_old() -> None:
    seen, dropped, _ = simulate(bound=2, gen_s=(0.3, 1.7), learn_s=1.0, steps=10, gens=2, mode="fixed", depth=2)
    assert len(seen) == 40 and dropped == 0
    assert [set(seen[i * 4:(i + 1) * 4]) for i in range(10)] == [{0}, {1}] + [{2}] * 8


def test_two_in_flight_with_slow_generation_never_exceed_the_bound() -> None:
    for gens in (1, 2):
        seen, dropped, _ = simulate(bound=1, gen_s=(1.5, 2.5)[:gens], learn_s=1.0, steps=10, gens=gens, depth=2)
        assert len(seen) == 40 and max(seen) <= 1 and dropped == 0
