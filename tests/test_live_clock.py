"""The live clock (async_rlhf/pipeline/live_clock.py): a process stopped (Ctrl-Z then fg, SIGSTOP, a paused
container) does not count the freeze as anyone's silence. Real processes, really stopped and continued."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.helpers import ROOT

FREEZE_CHILD = """
import sys
from async_rlhf.pipeline.live_clock import ProcessFreezes
freezes = ProcessFreezes(tick_s=0.1, allowed_s=0.5)
print("ready", flush=True)
sys.stdin.readline()  # the parent stops and continues this process meanwhile, then writes a line
print(f"frozen {freezes.total_s:.2f}", flush=True)  # at once: the thread need not have run since
freezes.close()
"""

WAIT_CHILD = """
import os, time
import ray
from async_rlhf.pipeline.waits import wait_all
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
class Worker:
    def pid(self):
        return os.getpid()

    def work(self, seconds):
        time.sleep(seconds)
        return "answered"

worker = Worker.remote()
print(ray.get(worker.pid.remote()), flush=True)
call = worker.work.remote(1.0)
print("timed out" if wait_all([call], 5.0, lambda: None) else ray.get(call), flush=True)
"""


def frozen_seconds(stop_s: float) -> float:
    """ProcessFreezes' count in a child process that the test stops for `stop_s` (0: not stopped)."""
    child = subprocess.Popen([sys.executable, "-c", FREEZE_CHILD], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    if stop_s:
        child.send_signal(signal.SIGSTOP)
        time.sleep(stop_s)
        child.send_signal(signal.SIGCONT)
    child.stdin.write("go\n")
    child.stdin.flush()
    out = child.stdout.readline().split()
    child.wait(timeout=30)
    return float(out[1])


def test_process_freezes_counts_the_time_the_process_was_stopped() -> None:
    assert frozen_seconds(0) < 1.0  # 0 unless the machine held a thread back for over half a second
    assert 1.5 <= frozen_seconds(2.5) <= 3.5  # less the allowance (0.6 s)


def test_a_wait_on_an_actor_frozen_with_the_driver_does_not_time_out() -> None:
    # The driver and the actor stopped 8 s in the middle of a 1 s call that the driver waits on for at most 5 s (as a
    # checkpoint's drain waits on generations), the actor continued 1 s after the driver. Before: the wait's deadline
    # ran through the freeze, and a run stopped with Ctrl-Z in a checkpoint ended on `fg` ("generation did not
    # finish within learner.stall_timeout_s while taking a checkpoint").
    child = subprocess.Popen([sys.executable, "-c", WAIT_CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        worker = int(child.stdout.readline())
        time.sleep(0.3)
        for pid in (child.pid, worker):
            subprocess.run(["kill", "-STOP", str(pid)], check=True)
        time.sleep(8)
        for pid in (child.pid, worker):
            subprocess.run(["kill", "-CONT", str(pid)], check=True)
            time.sleep(1)
        assert child.stdout.readline().strip() == "answered"
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_forked_child_has_a_clock_of_its_own() -> None:
    # The parent's detector thread does not survive a fork: inherited, the child's clock would stand still.
    import os

    from async_rlhf.pipeline import live_clock

    live_clock.now()  # the parent's detector runs
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: 2 s of its live clock must pass as 2 s
        start = live_clock.now()
        time.sleep(2.0)
        os.write(write, f"{live_clock.now() - start:.2f}".encode())
        os._exit(0)
    os.close(write)
    advanced = float(os.read(read, 64))
    os.waitpid(pid, 0)
    assert 1.9 <= advanced <= 3.0
