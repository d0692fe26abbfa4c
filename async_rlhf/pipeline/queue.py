"""RolloutQueue: the bounded, staleness-aware buffer between the reward service and the learner.

Staleness of a group = the learner version that trains on it - the policy version that sampled
it. It is judged at `take`, the moment the learner receives the batch, so time spent waiting in
the queue counts. Groups older than `max_staleness` are dropped there and counted.

The generation gate at the end decides when a chunk of prompts may go out and, with
queue.staleness_mode=fixed, which weights sample it (docs/architecture.md, "Fixed delay").
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Literal

from async_rlhf.rollout import RolloutGroup

StalenessMode = Literal["bound", "fixed"]


class QueueFullError(RuntimeError):
    """Raised by `put` when the queue is at capacity: the producer's gate let too much through."""


@dataclass
class QueueCounters:
    produced: int = 0  # groups put
    consumed: int = 0  # groups handed to the learner
    dropped_stale: int = 0  # groups dropped for exceeding max_staleness
    failed_reward: int = 0  # completions whose reward failed or timed out (never trained on)
    staleness: Counter = field(default_factory=Counter)  # staleness -> groups consumed
    max_staleness_seen: int = 0


class RolloutQueue:
    def __init__(self, capacity: int, max_staleness: int, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1 or max_staleness < 0:
            raise ValueError(f"capacity must be >= 1 and max_staleness >= 0 (got {capacity}, {max_staleness})")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.counters = QueueCounters()
        self._items: deque[RolloutGroup] = deque()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._items)

    @property
    def free(self) -> int:
        return self.capacity - len(self._items)

    def put(self, group: RolloutGroup) -> None:
        if not self.free:
            raise QueueFullError(f"rollout queue is full ({self.capacity} groups)")
        group.enqueued_at = self._clock()
        self.counters.produced += 1
        self.counters.failed_reward += sum(c.reward_status in ("failed", "timed_out") for c in group.completions)
        self._items.append(group)

    def drop_stale(self, learner_version: int) -> int:
        """Remove every queued group that would exceed the bound if trained at `learner_version`."""
        keep = [g for g in self._items if learner_version - g.policy_version <= self.max_staleness]
        dropped = len(self._items) - len(keep)
        self._items = deque(keep)
        self.counters.dropped_stale += dropped
        return dropped

    def take(self, n: int, learner_version: int, max_version: int | None = None) -> list[RolloutGroup] | None:
        """Hand `n` groups to the learner at `learner_version`, oldest version first (FIFO within a version),
        or None if too few are fresh.

        Oldest version first, not arrival order: a group that arrived after a newer one (scored out of order,
        a slower generator) would otherwise train a step later than the gate counted on and could go stale.
        `max_version` (fixed delay) takes only groups sampled with that version or older: a newer group that
        finished early belongs to a later step and waits for it.
        """
        self.drop_stale(learner_version)
        fits = (g for g in self._items if max_version is None or g.policy_version <= max_version)
        ready = sorted(fits, key=lambda g: g.policy_version)  # stable: FIFO within a version
        if len(ready) < n:
            return None
        batch = ready[:n]
        taken = {id(g) for g in batch}
        self._items = deque(g for g in self._items if id(g) not in taken)
        for group in batch:
            staleness = learner_version - group.policy_version
            self.counters.staleness[staleness] += 1
            self.counters.max_staleness_seen = max(self.counters.max_staleness_seen, staleness)
        self.counters.consumed += n
        return batch

    def items(self) -> list[RolloutGroup]:
        """The queued groups, oldest first (for checkpoints)."""
        return list(self._items)

    def restore(self, groups: list[RolloutGroup], counters: QueueCounters) -> None:
        """Back to a checkpointed state: the same groups, with their versions, and the same counts."""
        self._items = deque(groups)
        self.counters = counters

    def oldest_age(self) -> float:
        items = self._items  # read once: the loop swaps in a new deque while the HTTP thread asks (an IndexError)
        enqueued = items[0].enqueued_at if items else None
        return 0.0 if enqueued is None else self._clock() - enqueued

    def snapshot(self) -> dict:
        c = self.counters
        return {
            "depth": len(self._items),
            "capacity": self.capacity,
            "max_staleness": self.max_staleness,
            "produced": c.produced,
            "consumed": c.consumed,
            "dropped_stale": c.dropped_stale,
            "failed_reward": c.failed_reward,
            "staleness_histogram": {str(k): v for k, v in sorted(c.staleness.items())},
            "max_staleness_seen": c.max_staleness_seen,
            "oldest_age_s": round(self.oldest_age(), 3),
        }


@dataclass(frozen=True)
class GateInputs:
    steps_taken: int  # batches already handed to the learner
    outstanding: int  # groups issued to generators and not yet taken or dropped
    published_version: int  # newest weights a generator would sample with
    chunk: int  # groups the next generation request would add
    prompts_per_step: int
    max_staleness: int
    total_steps: int
    capacity: int
    staleness_mode: StalenessMode = "bound"
    first_version: int = 0  # oldest version the run can sample with: 0, or the version a resume restored


def fixed_version(step: int, max_staleness: int, first_version: int = 0) -> int:
    """Fixed delay: the weights that sample the prompts trained at `step` (version == step), N behind
    it; before step N (or N steps after a resume) the oldest version there is."""
    return max(first_version, step - max_staleness)


def target_step(g: GateInputs) -> int:
    """The learner step that will train on the next chunk, if nothing ahead of it is dropped."""
    return g.steps_taken + g.outstanding // g.prompts_per_step


def generation_allowed(g: GateInputs) -> bool:
    """May a generator start sampling the next chunk now?

    The chunk will be trained at step `target_step` (learner version == that step), having been
    sampled with `published_version`; it is issued only if that staleness is within the bound,
    so generators that are `max_staleness` versions ahead wait for new weights.
    """
    step = target_step(g)
    if step >= g.total_steps or g.outstanding + g.chunk > g.capacity:
        return False
    if g.staleness_mode == "fixed":  # the version it needs is out; newer ones may be too
        return fixed_version(step, g.max_staleness, g.first_version) <= g.published_version
    return step - g.published_version <= g.max_staleness


def chunk_version(g: GateInputs) -> int:
    """The weights version the next chunk is sampled with: the newest (bound) or N behind its step (fixed)."""
    if g.staleness_mode == "bound":
        return g.published_version
    return min(g.published_version, fixed_version(target_step(g), g.max_staleness, g.first_version))


def take_limit(g: GateInputs) -> int | None:
    """The newest version the next batch (step `steps_taken`) may hold: any in bound mode; with a fixed
    delay that step's own version, so a later step's chunk that finished first waits for its step."""
    return fixed_version(g.steps_taken, g.max_staleness, g.first_version) if g.staleness_mode == "fixed" else None
