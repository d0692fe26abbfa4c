"""RunControl: commands from the HTTP API to the controller loop, applied only at safe points.

The API runs in another thread; it never touches the run's components. It posts a command here
and the loop applies it between events (a checkpoint only while the learner is idle), so a bad or
badly timed request cannot corrupt the run.

What a request changes is said on the run's terminal, once per change: a run paused for an hour, or whose
staleness bound was changed, showed nothing of it in its output, and its log could not tell why steps stopped.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable


def say(text: str) -> None:
    print(f"[async-rlhf] {text}", flush=True)


class RunControl:
    def __init__(self, notice: Callable[[str], None] = say) -> None:
        self.notice = notice  # a request's effect, on the run's terminal
        self._lock = threading.Lock()
        self.paused = False
        self.stop_requested = False
        self._checkpoints: list[Future] = []
        self._max_staleness: int | None = None

    def pause(self) -> None:
        with self._lock:
            changed, self.paused = not self.paused, True
        if changed:
            self.notice("paused (POST /control/pause): no new generation or learner step until POST "
                        "/control/resume")

    def resume(self) -> None:
        with self._lock:
            changed, self.paused = self.paused, False
        if changed:
            self.notice("resumed (POST /control/resume)")

    def request_stop(self) -> None:
        """POST /control/stop: the run winds down as at its last step (final evaluation, summary, final/)."""
        if not self.stop_requested:
            self.notice("stop requested (POST /control/stop): the step in flight finishes, then the final "
                        "evaluation and save")
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            self.paused = False  # a paused run must still be able to wind down

    def terminate(self) -> Future:
        """SIGTERM / preemption: checkpoint at the next safe point, then stop as usual."""
        future = self.request_checkpoint()
        self.stop()
        return future

    def request_checkpoint(self) -> Future:
        """A future resolved with the checkpoint's path once the loop has written it."""
        future: Future = Future()
        with self._lock:
            self._checkpoints.append(future)
        return future

    def request_max_staleness(self, value: int) -> None:
        with self._lock:
            self._max_staleness = value
        self.notice(f"max_staleness set to {value} (PUT /control/max_staleness), from the next batch on")

    def take_checkpoint_requests(self) -> list[Future]:
        with self._lock:
            taken, self._checkpoints = self._checkpoints, []
        return taken

    def take_max_staleness(self) -> int | None:
        with self._lock:
            value, self._max_staleness = self._max_staleness, None
        return value
