"""RunDirKeeper: a run directory removed while its run goes on is made again, and the run goes on.

An `rm -rf` of the wrong directory, or a clean-up job, removed a live run's directory: the run failed at its next
log line ("FileNotFoundError: ... eval.jsonl") and its training was lost, the checkpoints with the directory. Now
the next write finds the directory gone (or replaced: its inode is not the run's), makes it again as the run made
it at the start (each owner of a file in it registers a `remake`: the config, the lock, the weights marker, the
API's files, the starting policy's scores; the logs start over, empty but for its evaluation) and says so once;
the checkpoints and the final policy then land there as usual. What was written before the removal is gone.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable


class RunDirKeeper:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.identity: tuple[int, int] | None = None  # (device, inode) of the directory the run made; None: not yet
        self.remakes: list[Callable[[], None]] = []  # each owner's files written again, in registration order

    def settle(self) -> None:
        """The directory is the run's as it is now (`ensure` keeps this one)."""
        stat = os.stat(self.run_dir)
        self.identity = (stat.st_dev, stat.st_ino)

    def ensure(self) -> None:
        """Before a write into the run directory: make it again if it was removed or replaced."""
        if self.identity is None or self._intact():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.settle()
        for remake in self.remakes:
            remake()
        print(f"[async-rlhf] the run directory {self.run_dir} was removed while the run was writing to it: made it "
              f"again, and the run goes on; its logs start over from here (what was written before is lost with the "
              f"directory)", file=sys.stderr, flush=True)

    def _intact(self) -> bool:
        try:
            stat = os.stat(self.run_dir)
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self.identity
