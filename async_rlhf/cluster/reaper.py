"""Reaper: cleans up after a run's driver however it ended, SIGKILL and the OOM killer included.

A driver that exits normally cleans up itself (Controller.shutdown). One that is killed cannot, and two
things outlived it (found by hand, `kill -9` of `async-rlhf train` mid-run):
- the shared-memory ring of published weights under `weight_sync.shm_root` (/dev/shm): RAM, slots x the
  policy's size, held until reboot unless the same run is resumed;
- Ray's dashboard and runtime-env agents. Ray's kernel fate-sharing kills the processes the driver started
  (GCS, raylet, ...) and the workers follow the raylet, but the agents, children of the raylet, try to report
  its death through the dead GCS first and linger for a minute or more.
So each run starts this small process (the standard library only, in its own session so a terminal's Ctrl-C
does not reach it) that holds the read end of a pipe whose write end only the driver has. When the driver is
gone, however it went, the read returns; the reaper then removes the run's paths and kills the raylet's
children it was given, each only if it is still the same process (its start time in /proc/PID/stat). They
are named when the reaper starts, right after ray.init (the agents start with the raylet); the actors'
workers, started later, die with the raylet. After a normal end there is nothing left for it to do.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

# Run as `python -c REAPER PID:START,... PATH...`: waits for EOF on stdin, then cleans up.
REAPER = r"""
import os, shutil, signal, sys
sys.stdin.buffer.read()
for path in sys.argv[2:]:
    shutil.rmtree(path, ignore_errors=True)
for named in filter(None, sys.argv[1].split(",")):
    pid, start = named.split(":")
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[19] == start:
                os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..., start time at [19]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(parent: int) -> list[str]:
    """`PID:START` of each process whose parent is `parent` (START: its start time, so that a pid reused
    by another process after it exited is not taken for it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = stat_fields(entry.name) if entry.name.isdigit() else []
        except (OSError, IndexError):  # exited while the table was read
            continue
        if fields and int(fields[1]) == parent:
            found.append(f"{entry.name}:{fields[19]}")
    return found


class Reaper:
    """The reaper process of one run (the module docstring says why)."""

    def __init__(self, paths: list[Path], raylet_pid: int | None) -> None:
        named = ",".join(children(raylet_pid)) if raylet_pid else ""
        self.process = subprocess.Popen(
            [sys.executable, "-c", REAPER, named, *map(str, paths)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        """The driver's own end of the run: the reaper does its pass now (finding nothing left) and exits."""
        pipe: IO[bytes] | None = self.process.stdin
        if pipe is not None:
            pipe.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a crowded machine: let it finish on its own
            pass
