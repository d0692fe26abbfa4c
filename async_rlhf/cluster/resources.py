"""Which cores each role runs on.

On a small machine the generator and the learner slow each other down badly when they share
cores (measured: ~39% / 22% slower), but barely at all when each process is pinned to its own
core (~6%). So an asynchronous run pins one core per generator and gives the rest to the learner.
Where that leaves the learner no core (as many generators as cores, or more) and in a synchronous run
(max_staleness=0), the generators split the cores between them and the learner shares them: with every
core when it trains alone (synchronous), with one thread beside the generators (asynchronous).
On GPUs nothing is pinned: the roles compute on their GPUs, and the driver's cores say nothing
about the cores of the nodes the roles run on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from async_rlhf.config.run import RunConfig


@dataclass(frozen=True)
class CorePlan:
    generator_cores: list[list[int]]  # one list per generator: it pins itself there, one thread per core
    learner_cores: list[int]
    pinned: bool  # every role has cores of its own (an async run with a core per generator and more to spare)
    learner_threads: int  # torch's intra-op threads in the learner


def usable_cores(cgroups: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> list[int]:
    """The cores this process may run on, cut to its cgroup's CPU quota: a container started with `--cpus 2` on a
    64-core host sees 64 cores and may use two, and 64 threads per role would wait on one another."""
    cores = sorted(os.sched_getaffinity(0))
    quota = cpu_quota(cgroups, membership)
    return cores if quota is None else cores[:max(1, math.ceil(quota))]


def cpu_quota(cgroups: Path, membership: Path) -> float | None:
    """CPUs the cgroups of this process allow (the smallest quota from its own cgroup up to the root: cgroup v2's
    cpu.max, v1's cpu.cfs_quota_us over cpu.cfs_period_us); None when none is set or none can be read."""
    quotas = []
    for line in _read(membership).splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        base = cgroups if v2 else cgroups / ("cpu" if (cgroups / "cpu").is_dir() else controllers)
        for folder in [base / path.strip("/"), *(base / path.strip("/")).parents]:
            quotas.append(_quota(folder, v2))
            if folder == base:
                break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _quota(folder: Path, v2: bool) -> float | None:
    if v2:
        fields = _read(folder / "cpu.max").split()
        return float(fields[0]) / float(fields[1]) if len(fields) == 2 and fields[0] != "max" else None
    quota, period = _read(folder / "cpu.cfs_quota_us").strip(), _read(folder / "cpu.cfs_period_us").strip()
    return int(quota) / int(period) if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return ""


def plan_cores(cfg: RunConfig, available: list[int] | None = None, gpus: bool = False) -> CorePlan:
    cores = sorted(available if available is not None else usable_cores())
    gens = cfg.generation.num_generators
    if gpus:
        return CorePlan([[] for _ in range(gens)], cores, pinned=False, learner_threads=len(cores))
    if cfg.resources.pin_cores == "off":
        return CorePlan([list(cores) for _ in range(gens)], cores, pinned=False, learner_threads=len(cores))
    overlap = cfg.queue.max_staleness > 0
    if overlap and len(cores) >= gens + 1:
        return CorePlan([[c] for c in cores[:gens]], cores[gens:], pinned=True, learner_threads=len(cores) - gens)
    # The generators always sample side by side (and, asynchronously, the learner trains beside them), so no
    # thread pool may span another's cores: an OpenMP thread bound to a core that another process holds waits
    # for it at every barrier. Two generators on all of 2 cores were 3.7x slower than one (synchronous) and 8x
    # (asynchronous, the learner's two threads too); each on a core of its own, faster than one
    # (docs/benchmarks.md, "Cores shared"). The learner shares the cores: alone (synchronous) it uses them all,
    # beside the generators one thread.
    return CorePlan(split_cores(cores, gens), cores, pinned=False, learner_threads=1 if overlap else len(cores))


def split_cores(cores: list[int], parts: int) -> list[list[int]]:
    """`cores` in `parts` disjoint runs as even as possible; with more parts than cores, one core each, in turn."""
    if parts > len(cores):
        return [[cores[i % len(cores)]] for i in range(parts)]
    size, extra = divmod(len(cores), parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return [cores[starts[i]:starts[i + 1]] for i in range(parts)]


@dataclass(frozen=True)
class CoreLoan:
    """The learner may train on `every` core while the generators idle, on `own` while one samples
    (resources.balance_cores; the generators say when they sample on the BusyBoard at `board`)."""

    own: list[int]
    every: list[int]
    board: str


def core_loan(cfg: RunConfig, plan: CorePlan, board: str) -> CoreLoan | None:
    """Only a pinned plan with one learner rank has cores to lend (GPU runs and shared cores do not)."""
    if not (plan.pinned and cfg.resources.balance_cores and cfg.learner.num_ranks == 1
            and cfg.weight_sync.transport == "shm"):  # the board lives in the shm ring's directory
        return None
    every = sorted({c for cores in plan.generator_cores for c in cores} | set(plan.learner_cores))
    return CoreLoan(list(plan.learner_cores), every, board)


def pin_process(cores: list[int] | None, threads: int | None) -> None:
    """Pin every thread of this process to `cores` and size torch's intra-op pool.

    os.sched_setaffinity(0, ...) only moves the calling thread; threads that already exist (Ray's,
    an OpenMP pool created at import) keep their mask, so each task under /proc/self/task is moved.
    """
    if cores:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that exited meanwhile
        os.sched_setaffinity(0, cores)
    n = threads or (len(cores) if cores else None)
    if n:
        import torch  # only the processes that pin need torch

        torch.set_num_threads(n)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """avx512_bf16 or amx_bf16 among the CPU's flags: bfloat16 matmuls run in hardware (else emulated)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def bf16_note(cfg: RunConfig, gpus: bool, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """One line for the terminal when bfloat16 compute (learner.autocast, generation.dtype) will be emulated."""
    asked = [name for name, on in (("learner.autocast", cfg.learner.autocast == "bfloat16"),
                                   ("generation.dtype", cfg.generation.dtype == "bfloat16")) if on]
    if not asked or gpus or cpu_has_native_bf16(cpuinfo):
        return None
    return (f"note: bfloat16 ({', '.join(asked)}) on a CPU without native bfloat16 (no avx512_bf16 or amx_bf16 in "
            f"/proc/cpuinfo) is emulated and slower; set learner.autocast=none generation.dtype=auto")
