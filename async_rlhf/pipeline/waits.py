"""Blocking waits on Ray calls outside the loop (a checkpoint's drain, a failover, an evaluation awaited) that still
kill what hangs: the loop runs its hang checks every iteration, and a wait that did not would sit out a hung
actor for the whole `learner.stall_timeout_s`."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import ray

from async_rlhf.cluster import actor_table
from async_rlhf.failures import ray_logs
from async_rlhf.pipeline.live_clock import Deadline

POLL_S = 1.0  # how often a blocking wait runs its hang checks


class AnswerWatch:
    """An actor's calls in flight as its hang check sees them. A call found done is an answer (the actor spoke)
    the first time a check sees it, never again: a blocking wait (a checkpoint's drain of an evaluation) leaves
    done calls unhandled, and taken for news at every check they hid the actor's silence after them (by hand, a
    reward actor stopped between an evaluation's scoring calls was never killed, and the drain ended the run)."""

    def __init__(self) -> None:
        self.seen: set[Any] = set()
        # live_clock time of the check's kill, until the actor's death is seen: Ray kills a stopped process only after
        # asking it to exit for seconds, and a second check meanwhile said (and sent) the kill again
        self.killed_at: float | None = None

    def kill_pending(self, now: float, bound_s: float) -> bool:
        """Killed less than `bound_s` (a restart's bound) ago: a kill not taken by then is sent again."""
        return self.killed_at is not None and now - self.killed_at < bound_s

    def look(self, refs: list[Any]) -> tuple[bool, bool]:
        """(news: a call ended since the last look; pending: a call still runs)."""
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        news = bool(done - self.seen)
        self.seen = done
        return news, len(done) < len(refs)


def wait_all(refs: list[Any], timeout_s: float, between: Callable[[], None]) -> list[Any]:
    """Wait for every call in `refs` to end, running `between` every POLL_S meanwhile (the hang checks: a killed
    actor's call fails, which ends it); returns the calls still running after `timeout_s` (none: all ended)."""
    deadline = Deadline(timeout_s)
    while refs and (running := ray.wait(refs, num_returns=len(refs), timeout=POLL_S)[1]):
        if deadline.passed():
            return running
        between()
    return []


def answers_within(refs: list[Any], timeout_s: float) -> list[Any]:
    """Each call's result where it ended well within `timeout_s`, else None (still running after it, or failed)."""
    done = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
    return [_result(ref) if ref in done else None for ref in refs]


def pids_at_end(actors: dict[str, Any], method: str, limit_s: float) -> dict[str, int | None]:
    """Each actor's process at the run's end (name -> handle; None, and a note, where it has none): read from Ray's
    actor table, which answers for a stopped or hung actor at once (asked, one held the finished run until Ray gave
    up on it, 6 min), waiting up to `limit_s` for one still restarting. A process killed in the last moment, before
    its raylet told the table (milliseconds), is not counted. Where the table is not found, each actor's `method`
    is asked for its pid, within `limit_s`."""
    records = _settled(list(actors.values()), limit_s)
    if records is None:
        answers = answers_within([getattr(handle, method).remote() for handle in actors.values()], limit_s)
        pids = {name: answer and answer["pid"] for name, answer in zip(actors, answers)}
        why = f"did not answer within {limit_s:.0f}s of the run's end (stopped, hung or dead)"
    else:
        pids = {name: r.pid if r.state == "ALIVE" else None for name, r in zip(actors, records)}
        why = f"was dead, or still restarting {limit_s:.0f}s after the run's end"
    for name in (name for name, pid in pids.items() if pid is None):
        print(f"[async-rlhf] note: {name} {why} (its log is under {ray_logs()}): its restarts are counted up to its "
              "last answer", file=sys.stderr, flush=True)
    return pids


def _settled(handles: list[Any], limit_s: float) -> list[actor_table.ActorRecord] | None:
    """Each actor's record once it is not starting or restarting (one still starting after `limit_s` keeps its
    state); None where Ray has no table to read, or a record without an actor's process."""
    lookup = actor_table.table()
    deadline = Deadline(limit_s)
    while lookup is not None:
        found = [actor_table.record(lookup, handle) for handle in handles]
        records = [r for r in found if r is not None and (r.state != "ALIVE" or r.pid > 0)]
        if len(records) < len(handles):
            return None
        if deadline.passed() or not any(r.state in actor_table.STARTING for r in records):
            return records
        time.sleep(0.2)
    return None


def _result(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:  # the actor died in the call, or Ray gave up on it
        return None
