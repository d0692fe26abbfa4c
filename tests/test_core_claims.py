"""Runs side by side on one machine plan their cores around each other's (cluster/core_claims.py): claims held by
real processes through flock, dropped by the kernel when a process is SIGKILLed, each in its run's own directory
under shm_root."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from async_rlhf.cluster.core_claims import CLAIM_FILE, Claim, CoreClaims, plan_beside_others
from async_rlhf.config.run import load_config
from tests.helpers import QUICKSTART, ROOT

RUNS = itertools.count()


def claims_of_a_run(shm: Path) -> CoreClaims:
    """A run's claims, in its own directory under `shm` as a run's weights ring is (async-rlhf-<run>-<id>)."""
    return CoreClaims(shm, shm / f"async-rlhf-run-{next(RUNS)}")


def claim_in_another_process(shm: Path, cores: list[int]) -> subprocess.Popen:
    """Another run's claim: a process that holds `cores` until it is killed."""
    code = ("import os, time; from pathlib import Path; from async_rlhf.cluster.core_claims import CoreClaims\n"
            f"shm = Path({str(shm)!r})\n"
            f"CoreClaims(shm, shm / f'async-rlhf-other-{{os.getpid()}}').claim({cores!r}, Path('/runs/other'))\n"
            "print('held', flush=True)\ntime.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def other_run(tmp_path: Path):
    procs: list[subprocess.Popen] = []

    def start(cores: list[int]) -> subprocess.Popen:
        procs.append(claim_in_another_process(tmp_path / "shm", cores))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_live_runs_claim_is_seen_and_a_killed_runs_claim_is_gone(tmp_path: Path, other_run) -> None:
    shm = tmp_path / "shm"
    mine = claims_of_a_run(shm)
    proc = other_run([0, 1])
    assert mine.others() == [Claim(proc.pid, "/runs/other", [0, 1])]
    mine.claim([2], tmp_path / "mine")
    assert [c.pid for c in mine.others()] == [proc.pid]  # never its own
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mine.others() == [] and sorted(shm.glob(f"*/{CLAIM_FILE}")) == [mine.path]  # the dead one's removed
    mine.release()
    assert list(shm.glob(f"*/{CLAIM_FILE}")) == []  # its directory is the run's own, removed with its weights


def test_a_second_run_plans_on_the_cores_the_first_left_and_is_told_when_none_are(tmp_path: Path,
                                                                                    other_run) -> None:
    # Before: both runs planned every core (generators on core 0, learners' thread pools on the rest).
    cfg = load_config(QUICKSTART, ["queue.max_staleness=1"], environment=False)
    said: list[str] = []
    first = other_run([0, 1])
    second = claims_of_a_run(tmp_path / "shm")
    plan = plan_beside_others(cfg, second, tmp_path, False, said.append, [0, 1, 2, 3])
    assert plan.generator_cores == [[2]] and plan.learner_cores == [3] and plan.pinned
    assert said == [f"cores 0-1 are pinned by another run (pid {first.pid}, /runs/other): this run plans on cores 2-3"]
    assert [c.pid for c in claims_of_a_run(tmp_path / "shm").others()] == [first.pid]  # this process's: not another
    second.release()
    said.clear()
    other_run([2, 3])
    third = claims_of_a_run(tmp_path / "shm")
    plan = plan_beside_others(cfg, third, tmp_path, False, said.append, [0, 1, 2, 3])
    assert plan.generator_cores == [[0]] and plan.learner_cores == [1, 2, 3]  # none left: shared, as before
    assert said[0].startswith("note: cores 0-3 are pinned by another run") and said[0].endswith(
        "give each run its own cores, e.g. `taskset -c 0-1 async-rlhf train ...` and `taskset -c 2-3 async-rlhf "
        "train ...`")  # this machine's cores, a half each
    third.release()
    said.clear()
    fourth = claims_of_a_run(tmp_path / "shm")
    plan_beside_others(cfg, fourth, tmp_path, False, said.append, [2])  # a run given one core, all of it taken
    assert said[0].endswith("this run shares them and both are slower; run them one after the other")
    fourth.release()


def test_a_run_that_pins_nothing_claims_nothing(tmp_path: Path, other_run) -> None:
    cfg = load_config(QUICKSTART, ["resources.pin_cores=off"], environment=False)
    said: list[str] = []
    other_run([0])
    claims = claims_of_a_run(tmp_path / "shm")
    plan = plan_beside_others(cfg, claims, tmp_path, False, said.append, [0, 1])
    assert plan.learner_cores == [0, 1] and said == [] and not claims.path.exists()
