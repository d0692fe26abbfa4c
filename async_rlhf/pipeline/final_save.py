"""final/: the trained policy as an HF checkpoint, written by the learner at the end of a run.

Until final/ is written the trained weights live only in the learner's memory (and in the newest checkpoint,
if the run wrote any), so a save that fails for want of space or quota does not end the run: it is said once,
with the room left on that disk, and tried again every `RETRY_S` seconds for `checkpoint.final_wait_s`, while
the user frees space. A stop (SIGTERM, `/control/stop`; Ctrl-C twice) gives up at once, and so does any other
error: the run then fails as before, naming the disk and how to continue.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ray

from async_rlhf.failures import disk_full, room_on_disk, what_died
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.learner_calls import learner_answer

RETRY_S = 10.0
POLL_S = 0.25  # how soon a stop is noticed while waiting


class FinalSave:
    """One run's final/ save: started beside the final evaluation, awaited after it."""

    def __init__(self, learner: Any, path: Path, wait_s: float, control: RunControl, hang_s: float) -> None:
        self.learner = learner  # a Ray actor handle (learners/learner.py Learner)
        self.path = path
        self.wait_s = wait_s
        self.hang_s = hang_s  # one try answered by then, or the learner is hung (learner.stall_timeout_s)
        self.control = control
        self.tries = 0
        self.ref: Any = None

    def start(self) -> None:
        self.tries += 1
        self.ref = self.learner.save_pretrained.remote(str(self.path))

    def wait(self) -> None:
        """Returns once final/ is written; raises the save's error when waiting for space cannot help."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                learner_answer(self.ref, f"saving {self.path}", self.hang_s)
                break
            except ray.exceptions.RayTaskError as exc:
                if not disk_full(exc) or self.control.stop_requested or time.monotonic() >= deadline:
                    raise
                if self.tries == 1:
                    self._say(self._waiting_for_space(exc))
                self._pause(deadline)
            self.start()
        if self.tries > 1:
            self._say(f"final save written to {self.path} (try {self.tries})")

    def _waiting_for_space(self, exc: Exception) -> str:
        return (f"the final save to {self.path} failed: {what_died(exc)}; {room_on_disk(self.path.parent)}. The "
                f"trained policy is still in the learner's memory: free space and it is saved again every "
                f"{RETRY_S:.0f} s for up to {self.wait_s:.0f} s (checkpoint.final_wait_s; SIGTERM or Ctrl-C twice "
                f"gives up)")

    def _pause(self, deadline: float) -> None:
        until = min(time.monotonic() + RETRY_S, deadline)
        while time.monotonic() < until and not self.control.stop_requested:
            time.sleep(POLL_S)

    @staticmethod
    def _say(text: str) -> None:
        print(f"[async-rlhf] {text}", file=sys.stderr, flush=True)
