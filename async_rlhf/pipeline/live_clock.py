"""The driver's clock for silences and deadlines: `time.monotonic` less the time this process was frozen.

A driver stopped (Ctrl-Z then `fg`, SIGSTOP, a debugger) or paused with its container (`docker pause`) finds on
waking that every silence it times grew by the freeze, though its actors were silent for none of it: Ray's
processes have process groups of their own, so Ctrl-Z stops the driver only, and their answers reach it only once
it runs again. Timed on `time.monotonic`, a quickstart stopped 15 s under a 10 s stall timeout killed its healthy
generator and learner on waking, and one stopped in a checkpoint ended the run ("generation did not finish within
learner.stall_timeout_s"). Every silence, bound and deadline the driver judges is read on this clock instead.

One detector per process, started by the first reading: a freeze is a fact about the process, as its clock is.
"""
from __future__ import annotations

import os
import threading
import time

TICK_S = 0.25  # how often the detector wakes
ALLOWED_S = 1.0  # lateness that is a busy machine, not a freeze: not counted


class ProcessFreezes:
    """Seconds this process was not running. A daemon thread wakes every `tick_s`; lateness past `allowed_s` is
    frozen time. A reading counts a wake-up overdue at that moment too: after a freeze the loop's hang check may run
    before the thread does (by hand, it did, and killed the generator frozen with it). The count is continuous, so
    the clock below never steps back: past the allowance it stands still until the thread runs again."""

    def __init__(self, tick_s: float = TICK_S, allowed_s: float = ALLOWED_S) -> None:
        self.tick_s = tick_s
        self.allowed_s = allowed_s
        self.lock = threading.Lock()
        self.counted_s = 0.0
        self.last_tick = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="process-freezes", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.tick_s):
            with self.lock:
                now = time.monotonic()
                self.counted_s += self._overdue(now)
                self.last_tick = now

    def _overdue(self, now: float) -> float:
        return max(0.0, now - self.last_tick - self.tick_s - self.allowed_s)

    @property
    def total_s(self) -> float:
        with self.lock:
            return self.counted_s + self._overdue(time.monotonic())

    def now(self) -> float:
        """time.monotonic less the seconds frozen so far."""
        with self.lock:
            now = time.monotonic()
            return now - self.counted_s - self._overdue(now)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2 * self.tick_s)


class _Detector:
    """The process's one ProcessFreezes, made at the first reading (never closed: a daemon thread)."""

    freezes: ProcessFreezes | None = None
    lock = threading.Lock()

    @classmethod
    def get(cls) -> ProcessFreezes:
        with cls.lock:
            if cls.freezes is None:
                cls.freezes = ProcessFreezes()
            return cls.freezes

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's thread did not come along (its clock would stand still from the fork on),
        and a lock held at the fork stays held."""
        cls.freezes, cls.lock = None, threading.Lock()


os.register_at_fork(after_in_child=_Detector.forget)


def now() -> float:
    """Seconds on this process's live clock: differences are time it ran (or waited while running)."""
    return _Detector.get().now()


class Deadline:
    """A time limit on the live clock: a freeze of this process does not use it up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = now() + seconds

    def renew(self) -> None:
        """The whole limit again, from now."""
        self.at = now() + self.seconds

    def left(self) -> float:
        return self.at - now()

    def passed(self) -> bool:
        return self.left() <= 0
