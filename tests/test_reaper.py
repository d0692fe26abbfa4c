"""Reaper (cluster/reaper.py) on its own: when the process that started it closes its pipe (or dies), it removes
the paths and kills the named children that are still the same processes. The run-level case, a driver
SIGKILLed mid-run, is tests/test_driver_exit.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from async_rlhf.cluster.reaper import Reaper, children, stat_fields

# Stands in for a raylet: a process with one child (its "agent"). Not this test process, whose own children
# include the Ray that other tests share.
PARENT = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
# Stands in for a worker of a killed driver that lives on a moment (a learner publishing a version, a generator
# making its scratch directory): it makes files in the ring, the ring itself if it is gone, and keeps them open.
WORKER = """
import os, sys, time
ring, end = sys.argv[1], time.monotonic() + 1.5
while time.monotonic() < end:
    os.makedirs(ring, exist_ok=True)
    os.open(os.path.join(ring, f"slot-{time.monotonic_ns()}.bin"), os.O_CREAT | os.O_RDWR)
    time.sleep(0.05)
"""
# Stands in for the run's next start (`--resume` at once): it makes the ring and keeps a file in it open.
NEXT_START = """
import os, sys, time
while True:
    try:
        os.makedirs(sys.argv[1], exist_ok=True)
        fd = os.open(os.path.join(sys.argv[1], "cores.json"), os.O_CREAT | os.O_RDWR)
        break
    except FileNotFoundError:  # removed between the two
        continue
print("holding", flush=True)
time.sleep(60)
"""


@pytest.fixture
def raylet() -> Iterator[subprocess.Popen]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    deadline = time.monotonic() + 30
    while not children(parent.pid):
        assert time.monotonic() < deadline, "the stand-in raylet started no child"
        time.sleep(0.02)
    yield parent
    os.killpg(parent.pid, signal.SIGKILL)  # its process group: it and its child
    parent.wait()


def alive(named: str) -> bool:
    pid, start = named.split(":")
    try:
        return stat_fields(pid)[19] == start and stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def test_the_reaper_removes_the_paths_and_kills_the_children_named_at_its_start(raylet: subprocess.Popen,
                                                                                 tmp_path: Path) -> None:
    ring = tmp_path / "async-rlhf-ring"
    (ring / "slot-0").mkdir(parents=True)
    [agent] = children(raylet.pid)
    reaper = Reaper([ring], raylet_pid=raylet.pid)
    time.sleep(0.2)
    assert alive(agent) and ring.exists()  # nothing happens while the pipe is open
    reaper.close()
    assert not alive(agent) and not ring.exists() and raylet.poll() is None  # the raylet is not its to kill


def test_a_child_is_named_with_its_start_time(raylet: subprocess.Popen) -> None:
    [agent] = children(raylet.pid)
    pid = int(agent.split(":")[0])
    assert agent == f"{pid}:{stat_fields(pid)[19]}"  # a pid reused later has another start time


def test_without_a_raylet_only_the_paths_go(raylet: subprocess.Popen, tmp_path: Path) -> None:
    [agent] = children(raylet.pid)
    reaper = Reaper([tmp_path / "ring"], raylet_pid=None)
    reaper.close()
    assert reaper.process.returncode == 0 and alive(agent)


def test_after_a_killed_driver_the_paths_go_once_no_process_makes_or_holds_files_in_them(tmp_path: Path) -> None:
    ring = tmp_path / "async-rlhf-ring"
    ring.mkdir()
    reaper = Reaper([ring], raylet_pid=None)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(ring)])
    deadline = time.monotonic() + 30
    while not any(ring.iterdir()):
        assert time.monotonic() < deadline and worker.poll() is None, "the stand-in worker made no file"
        time.sleep(0.02)
    assert reaper.process.stdin is not None
    reaper.process.stdin.close()  # the pipe closed with nothing said: the driver was killed
    assert worker.wait(timeout=30) == 0
    assert reaper.process.wait(timeout=30) == 0 and not ring.exists()


def test_a_process_that_holds_the_paths_only_after_the_driver_died_is_the_next_start_and_they_are_left_to_it(
        tmp_path: Path) -> None:
    ring = tmp_path / "async-rlhf-ring"
    (ring / "slot-0").mkdir(parents=True)
    reaper = Reaper([ring], raylet_pid=None)
    assert reaper.process.stdin is not None
    reaper.process.stdin.close()  # killed, with none of its processes holding the ring
    deadline = time.monotonic() + 30
    while ring.exists():  # the reaper's first pass: it has seen the driver die
        assert time.monotonic() < deadline, "the reaper removed nothing"
        time.sleep(0.02)
    time.sleep(0.05)  # past the clock tick of the death (process start times count 10 ms ticks)
    next_start = subprocess.Popen([sys.executable, "-c", NEXT_START, str(ring)], stdout=subprocess.PIPE, text=True)
    try:
        assert next_start.stdout is not None and next_start.stdout.readline() == "holding\n"
        assert reaper.process.wait(timeout=30) == 0 and next_start.poll() is None  # not waited out: it is not the run's
    finally:
        next_start.kill()
        next_start.wait()
