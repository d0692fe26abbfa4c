"""Blocking waits on Ray calls outside the loop (a checkpoint's drain, a failover, an evaluation awaited) that still
kill what hangs: the loop runs its hang checks every iteration, and a wait that did not would sit out a hung
actor for the whole `learner.stall_timeout_s`."""
from __future__ import annotations

import sys
from typing import Any, Callable

import ray

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


def say_silent_at_end(who: str, limit_s: float) -> None:
    """The note for an actor that did not answer the run's last count of restarts (the run is done: not fatal)."""
    print(f"[async-rlhf] note: {who} did not answer at the run's end within {limit_s:.0f}s (stopped, hung or dead; "
          f"its log is under {ray_logs()}): its restarts are counted up to its last answer",
          file=sys.stderr, flush=True)


def _result(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:  # the actor died in the call, or Ray gave up on it
        return None
