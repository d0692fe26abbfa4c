"""Reaper: cleans up after a run's driver however it ended, SIGKILL and the OOM killer included.

A driver that exits normally cleans up itself (Controller.shutdown). One that is killed cannot, and two
things outlived it (found by hand, `kill -9` of `async-rlhf train` mid-run):
- the shared-memory ring of published weights under `weight_sync.shm_root` (/dev/shm): RAM, slots x the
  policy's size, held until reboot unless the same run is resumed;
- Ray's dashboard and runtime-env agents. Ray's kernel fate-sharing kills the processes the driver started
  (GCS, raylet, ...) and the workers follow the raylet, but the agents, children of the raylet, try to report
  its death through the dead GCS first and linger for a minute or more.
So each run starts this small process (`python -m async_rlhf.cluster.reaper`: the standard library only, in
its own session so a terminal's Ctrl-C does not reach it) that holds the read end of a pipe whose write end
only the driver has. When the driver is gone, however it went, the read returns; the reaper then kills the
raylet's children it was given, each only if it is still the same process (its start time in
/proc/PID/stat), and removes the run's paths. They are named when the reaper starts, right after ray.init
(the agents start with the raylet); the actors' workers, started later, die with the raylet, but not at once:
a learner still publishing a version made a new slot file in the ring while it was being removed, and the
ring stayed (a CI failure). So after a killed driver the paths are removed again while any process still has a
file under them open or mapped, until they have stayed gone for `QUIET_S` (at most `LIMIT_S`); one that holds
them and was started after the driver died is the run's next start (`--resume` at once), and they are left to
it. After a normal end (the driver writes `END` before closing the pipe) there is nothing left to wait for: one
pass.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

END = b"end"  # what the driver writes when it ended the run itself
QUIET_S = 2.0  # the paths stayed gone and nothing holds a file under them for this long: done
LIMIT_S = 60.0  # Ray's workers follow their raylet within seconds; this bounds a reaper that waits on a stranger


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..., start time at [19]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def pids() -> list[str]:
    return [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def children(parent: int) -> list[str]:
    """`PID:START` of each process whose parent is `parent` (START: its start time, so that a pid reused
    by another process after it exited is not taken for it)."""
    found = []
    for pid in pids():
        try:
            fields = stat_fields(pid)
        except (OSError, IndexError):  # exited while the table was read
            continue
        if int(fields[1]) == parent:
            found.append(f"{pid}:{fields[19]}")
    return found


def kill_named(named: str) -> None:
    """SIGKILL each `PID:START` that is still that process."""
    for entry in filter(None, named.split(",")):
        pid, start = entry.split(":")
        try:
            if stat_fields(pid)[19] == start:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, IndexError):
            pass


def holds(pid: str, prefixes: tuple[str, ...]) -> bool:
    """Whether process `pid` has a file under one of `prefixes` mapped (a deleted one too) or open."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            if any(prefix in line for line in maps for prefix in prefixes):
                return True
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes):
                return True
        except OSError:
            continue
    return False


def holders(paths: list[str]) -> set[str]:
    """The other processes that hold a file under one of `paths`."""
    prefixes, me = tuple(os.path.join(path, "") for path in paths), str(os.getpid())
    return {pid for pid in pids() if pid != me and holds(pid, prefixes)}


def remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def remove_until_let_go(paths: list[str], quiet_s: float = QUIET_S, limit_s: float = LIMIT_S) -> None:
    """Remove `paths` again and again until they have stayed gone, with no process holding them, for `quiet_s`. A
    process started after the driver died that holds them is the run's next start (`--resume` at once): they are
    its from then on, and are left alone."""
    died, deadline, quiet_since = boot_ticks(), time.monotonic() + limit_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        remove(paths)
        time.sleep(0.2)
        now = holders(paths)
        if any(started_after(pid, died) for pid in now):
            return
        if now or any(os.path.lexists(path) for path in paths):
            quiet_since = time.monotonic()


def boot_ticks() -> int:
    """Now, in the clock ticks since boot in which /proc/PID/stat gives a process's start time."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def started_after(pid: str, ticks: int) -> bool:
    try:
        return int(stat_fields(pid)[19]) > ticks
    except (OSError, IndexError, ValueError):  # exited meanwhile
        return False


def reap(named: str, paths: list[str]) -> None:
    """The reaper process's work, once the driver has closed its pipe or died."""
    said = sys.stdin.buffer.read()
    kill_named(named)
    if said == END:
        remove(paths)
    else:
        remove_until_let_go(paths)


class Reaper:
    """The reaper process of one run (the module docstring says why)."""

    def __init__(self, paths: list[Path], raylet_pid: int | None) -> None:
        named = ",".join(children(raylet_pid)) if raylet_pid else ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, named, *map(str, paths)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        """The driver's own end of the run: the reaper does its pass now (finding nothing left) and exits."""
        pipe: IO[bytes] | None = self.process.stdin
        if pipe is not None:
            try:
                pipe.write(END)
                pipe.close()
            except OSError:  # the reaper is gone (killed by hand): nothing to tell it
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a crowded machine: let it finish on its own
            pass


if __name__ == "__main__":
    reap(sys.argv[1], sys.argv[2:])
