"""RunControl: commands from the HTTP API to the controller loop, applied only at safe points.

The API runs in another thread; it never touches the run's components. It posts a command here
and the loop applies it between events (a checkpoint only while the learner is idle), so a bad or
badly timed request cannot corrupt the run.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future


class RunControl:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.paused = False
        self.stop_requested = False
        self._checkpoints: list[Future] = []
        self._max_staleness: int | None = None

    def pause(self) -> None:
        with self._lock:
            self.paused = True

    def resume(self) -> None:
        with self._lock:
            self.paused = False

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

    def take_checkpoint_requests(self) -> list[Future]:
        with self._lock:
            taken, self._checkpoints = self._checkpoints, []
        return taken

    def take_max_staleness(self) -> int | None:
        with self._lock:
            value, self._max_staleness = self._max_staleness, None
        return value
