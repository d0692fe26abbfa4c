"""The driver's waits on the learner, bounded: a learner alive to Ray but answering nothing (a collective that
never completes, a stopped process) would otherwise hold the run in a `ray.get` until Ray's own keepalive gives
up, minutes later (a checkpoint's save waited 420 s so). The bound is `learner.stall_timeout_s`, the time the run
allows the learner between steps; past it the wait raises `LearnerHung`, which the loop's failover treats as a
death (pipeline/failover.py): killed and replaced from the newest checkpoint where it can be, else the run ends.
"""
from __future__ import annotations

from typing import Any

import ray

from async_rlhf.failures import ray_logs, what_died


class LearnerHung(RuntimeError):
    """The learner answered nothing to one call for learner.stall_timeout_s. (Not a TimeoutError: waits that
    time out on their own, as asyncio.wait_for does, would take it for theirs.)"""


def learner_answer(ref: Any, doing: str, timeout_s: float) -> Any:
    """`ray.get(ref)`, or LearnerHung once the learner has been `doing` it (e.g. "saving a checkpoint") for
    `timeout_s`."""
    try:  # a freeze of this process (Ctrl-Z) does not use Ray's timeout up: 5 s waited through an 8 s freeze
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise learner_hung(doing, timeout_s, timeout_s) from None


def learner_hung(doing: str, waited_s: float, stall_s: float) -> LearnerHung:
    """The learner silent for `waited_s` while `doing` something (`stall_s`: learner.stall_timeout_s)."""
    return LearnerHung(f"the learner answered nothing for {waited_s:g}s while {doing} (learner.stall_timeout_s="
                       f"{stall_s:g}; its log is under {ray_logs()})")


def learner_failure(exc: BaseException) -> str:
    """What ended a learner, for a line: a hang in the run's own words, a death as failures.what_died has it."""
    return str(exc) if isinstance(exc, LearnerHung) else what_died(exc)
