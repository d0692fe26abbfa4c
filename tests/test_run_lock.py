"""RunDirLock (outputs/run_lock.py): one process per run directory, released however the holder ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_rlhf.config.base import ConfigError
from async_rlhf.outputs.run_lock import LOCK_FILE, RunDirLock

HOLDER = ("import sys, time; from pathlib import Path; from async_rlhf.outputs.run_lock import RunDirLock\n"
          "RunDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)\n")


def in_use(run_dir: Path, pid: int) -> str:
    return (f"config error: run directory '{run_dir}' is in use by another process (pid {pid}); wait for that run "
            "to end or stop it, or choose another --run-dir")


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    first, second = RunDirLock(tmp_path), RunDirLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError) as refused:
        second.acquire()
    assert str(refused.value) == in_use(tmp_path, os.getpid())
    first.release()
    second.acquire()
    second.release()
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_holder_killed_outright_leaves_the_directory_free(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            RunDirLock(tmp_path).acquire()
        assert str(refused.value) == in_use(tmp_path, proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    lock = RunDirLock(tmp_path)
    while True:  # the kernel drops a dead process's flock at once; the loop only guards a slow reap
        try:
            lock.acquire()
            break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lock.release()
