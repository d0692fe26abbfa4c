"""RunDirLock: one process per run directory.

Two processes in one run directory overwrite each other's files, and a `--resume` of a run that is still
going removes the live run's shared-memory weights (`claim_weights_location`), which kills it. A second
`async-rlhf train` into a directory whose first run is still starting, or a resume of a live run, is easy to
do by accident. So a run holds an exclusive flock on RUN_DIR/.lock for as long as it runs; the kernel drops it
when the process ends, however it ends (SIGKILL included), so a dead run never blocks its own resume.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from async_rlhf.config.base import ConfigError

LOCK_FILE = ".lock"


class RunDirLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.fd: int | None = None

    def acquire(self) -> None:
        """Hold the directory, or a ConfigError naming the process that does (exit 2, before anything starts)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"config error: run directory '{self.run_dir}' is in use by another process (pid "
                              f"{holder}); wait for that run to end or stop it, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    @staticmethod
    def held(run_dir: Path) -> bool:
        """Whether a process runs in `run_dir` now (`async-rlhf status` of a run that has ended)."""
        try:
            fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
        except OSError:  # no lock file: no run ever started here
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it the shared lock just taken
        return False

    def reacquire(self) -> None:
        """The run directory was made again (RunDirKeeper): hold its new lock file (the old one went with it)."""
        self.release()
        self.acquire()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the file stays: removing it would race with a process about to lock it
            self.fd = None
