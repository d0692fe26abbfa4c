"""CoreClaims: the cores that other runs on this machine have pinned, so that a new run plans around them.

Each run plans its cores from the ones it may use (resources.usable_cores), so two runs on one machine planned the
same cores: both generators on core 0, both learners' thread pools across the same rest, where an OpenMP thread
waits at every barrier for a core that another process holds (docs/benchmarks.md, "Cores shared": 3.7x to 8x
slower). A run that pins writes the cores of its plan to `CLAIM_FILE` in its own directory under
weight_sync.shm_root (the one its weights ring uses, removed with it at the end, by the reaper, or by the run's
next process: nothing is left behind) and holds an flock on it while it runs; the kernel drops the lock when the
process ends, SIGKILL included. A new run plans on the cores that no live run holds, reading and claiming under
an flock on shm_root itself; where none are left it shares them and says how to split the machine.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from async_rlhf.cluster.resources import CorePlan, plan_cores, usable_cores
from async_rlhf.config.run import RunConfig


@dataclass(frozen=True)
class Claim:
    pid: int
    run_dir: str
    cores: list[int]


CLAIM_FILE = "cores.json"


class CoreClaims:
    def __init__(self, shm_root: Path, run_root: Path) -> None:
        self.shm_root = shm_root  # every run's directory is under it: async-rlhf-<run>-<id>
        self.path = run_root / CLAIM_FILE
        self.fd: int | None = None

    def others(self) -> list[Claim]:
        """The claims of the runs alive now in other processes (a run of this process that ended without its
        shutdown still holds its lock); the claim of a run that is gone is removed."""
        paths = sorted(self.shm_root.glob(f"async-rlhf-*/{CLAIM_FILE}")) if self.shm_root.is_dir() else []
        claims = (_live_claim(path) for path in paths if path != self.path)
        return [claim for claim in claims if claim is not None and claim.pid != os.getpid()]

    @contextmanager
    def planning(self) -> Iterator[None]:
        """Held while a run reads the claims and makes its own, so that no two runs plan at once."""
        self.shm_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.shm_root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(self, cores: list[int], run_dir: Path) -> None:
        """Hold `cores` for this run until `release` or its end. Written under a temporary name and renamed once
        locked, so that a reader never takes a file that is not locked yet for a dead run's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid(), "run_dir": str(run_dir), "cores": cores}).encode())
        os.rename(partial, self.path)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _live_claim(path: Path) -> Claim | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # removed meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # its run holds it: alive
        return _read(fd)
    os.close(fd)
    try:
        path.unlink()  # its run is gone
    except OSError:  # another user's, or removed meanwhile
        pass
    return None


def _read(fd: int) -> Claim | None:
    try:
        data = json.loads(os.read(fd, 1 << 16))
        return Claim(int(data["pid"]), str(data["run_dir"]), [int(c) for c in data["cores"]])
    except (ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def plan_beside_others(cfg: RunConfig, claims: CoreClaims, run_dir: Path, gpus: bool, say: Callable[[str], None],
                       available: list[int] | None = None) -> CorePlan:
    """This run's cores (resources.plan_cores) on the ones no other live run has pinned, then claimed. A run on
    GPUs, with pin_cores off or on a Ray cluster (its roles may be on other nodes) plans as before and claims
    nothing."""
    cores = sorted(available if available is not None else usable_cores())
    if gpus or cfg.resources.pin_cores == "off" or cfg.ray.address is not None:
        return plan_cores(cfg, cores, gpus)
    with claims.planning():  # two runs started together: the second plans once the first has claimed
        others = [claim for claim in claims.others() if set(claim.cores) & set(cores)]
        taken = {core for claim in others for core in claim.cores}
        free = [core for core in cores if core not in taken]
        claims.claim(free or cores, run_dir)
    if others:
        say(_beside(others, taken, free, cores))
    return plan_cores(cfg, free or cores)


def _beside(others: list[Claim], taken: set[int], free: list[int], cores: list[int]) -> str:
    runs = "; ".join(f"pid {claim.pid}, {claim.run_dir}" for claim in others)
    held = f"{_cores(sorted(taken))} {'is' if len(taken) == 1 else 'are'} pinned by another run ({runs})"
    if free:
        return f"{held}: this run plans on {_cores(free)}"
    return f"note: {held}, and no core is left: this run shares them and both are slower; {_split_hint(cores)}"


def _split_hint(cores: list[int]) -> str:
    """How to give two runs their own cores, with those this one could use: a half each, or one after the other."""
    if len(cores) < 2:
        return "run them one after the other"
    half = len(cores) // 2
    first, second = _spans(cores[:half]), _spans(cores[half:])
    return (f"give each run its own cores, e.g. `taskset -c {first} async-rlhf train ...` and "
            f"`taskset -c {second} async-rlhf train ...`")


def _cores(cores: list[int]) -> str:
    """'cores 0-3,6' for [0, 1, 2, 3, 6]; 'core 2' for [2]."""
    return ("core " if len(cores) == 1 else "cores ") + _spans(cores)


def _spans(cores: list[int]) -> str:
    """'0-3,6' for [0, 1, 2, 3, 6], as taskset -c takes a list."""
    spans: list[list[int]] = []
    for core in cores:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
