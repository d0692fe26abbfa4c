"""Blocking waits on Ray calls outside the loop (a checkpoint's drain, a failover, an evaluation awaited) that still
kill what hangs: the loop runs its hang checks every iteration, and a wait that did not would sit out a hung
actor for the whole `learner.stall_timeout_s`."""
from __future__ import annotations

import time
from typing import Any, Callable

import ray

POLL_S = 1.0  # how often a blocking wait runs its hang checks


def wait_all(refs: list[Any], timeout_s: float, between: Callable[[], None]) -> list[Any]:
    """Wait for every call in `refs` to end, running `between` every POLL_S meanwhile (the hang checks: a killed
    actor's call fails, which ends it); returns the calls still running after `timeout_s` (none: all ended)."""
    deadline = time.monotonic() + timeout_s
    while refs and (running := ray.wait(refs, num_returns=len(refs), timeout=POLL_S)[1]):
        if time.monotonic() > deadline:
            return running
        between()
    return []
