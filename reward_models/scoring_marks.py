"""ScoringMarks: which reward a worker was running when its process died.

A reward function of your own runs inside the generators (reward.score_in_generator) and the reward actor. One
that ends its process (os._exit, a crash in native code) showed only as "generator 0 died" or "the reward actor
died", three restarts and then the run's end, with nothing naming the function (found by hand: a train reward
calling os._exit). While a role's scorer runs a function of the user's (a registered rule cannot end its
process), its process keeps a file naming it in a directory of its own under the run's scratch directory (one
file per role, removed when the scorer returns). After a death the driver reads
what the dead process left (`left`), says it, and removes it.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ScoringMarks:
    """The marks of one worker (`who`: "generator-0", "reward") under `root` (None: kept nowhere)."""

    def __init__(self, root: str | None, who: str) -> None:
        self.dir = Path(root) / f"scoring-{who}" if root else None

    @contextmanager
    def held(self, role: str, what: str) -> Iterator[None]:
        """`what` is marked as running in this process for the block's duration."""
        path = self._mark(role, what)
        try:
            yield
        finally:
            if path is not None:
                path.unlink(missing_ok=True)

    def _mark(self, role: str, what: str) -> Path | None:
        if self.dir is None:
            return None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / role).write_text(what)
        except OSError:  # a mark only names a culprit: scoring goes on without it (a full /dev/shm)
            return None
        return self.dir / role

    def left(self) -> str | None:
        """What the worker's dead process was running (e.g. "reward.train 'mod:fn'"), or None; then forgotten,
        so that a later death is not blamed on it."""
        if self.dir is None or not self.dir.is_dir():
            return None
        try:
            found = sorted(path.read_text() for path in self.dir.iterdir())
        except OSError:
            found = []
        shutil.rmtree(self.dir, ignore_errors=True)
        return " and ".join(found) or None


def while_scoring(what: str | None) -> str:
    """The clause a death's line gets where the process was running a reward: "" where it was not."""
    if what is None:
        return ""
    return (f" while running {what} (a reward function that ends its process, with os._exit or a crash in "
            "native code, kills the worker it runs in)")
