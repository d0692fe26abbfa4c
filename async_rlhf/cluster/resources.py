"""Which cores each role runs on.

On a small machine the generator and the learner slow each other down badly when they share
cores (measured: ~39% / 22% slower), but barely at all when each process is pinned to its own
core (~6%). So an asynchronous run pins one core per generator and gives the rest to the learner;
a synchronous run (max_staleness=0), whose phases never overlap, lets each phase use every core.
On GPUs nothing is pinned: the roles compute on their GPUs, and the driver's cores say nothing
about the cores of the nodes the roles run on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from async_rlhf.config.run import RunConfig


@dataclass(frozen=True)
class CorePlan:
    generator_cores: list[list[int]]  # one list per generator
    learner_cores: list[int]
    pinned: bool

    @property
    def learner_threads(self) -> int:
        return len(self.learner_cores)


def plan_cores(cfg: RunConfig, available: list[int] | None = None, gpus: bool = False) -> CorePlan:
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    gens = cfg.generation.num_generators
    if gpus:
        return CorePlan([[] for _ in range(gens)], list(cores), pinned=False)
    overlap = cfg.queue.max_staleness > 0
    if cfg.resources.pin_cores == "auto" and overlap and len(cores) >= gens + 1:
        return CorePlan([[c] for c in cores[:gens]], cores[gens:], pinned=True)
    return CorePlan([list(cores) for _ in range(gens)], list(cores), pinned=False)


@dataclass
class CoreBalancer:
    """Moves the learner between its own cores and every core by the load measured since the last move.

    Pinning keeps a generator and the learner from slowing each other down, but a learner-bound run then
    trains on one core while the generator's core idles (SmolLM2 on 2 cores: learner busy 96% of the loop,
    the synchronous run faster). So after each window (at least `window_s` of loop and `window_steps`
    steps) the busier role, by more than `margin` of the window, gets the generator's cores too (the
    learner) or gets them back (the generators). vLLM's threads stay bound to their cores; only the
    learner's affinity and torch threads change.
    """

    own: list[int]  # the learner's cores in the pinned plan
    every: list[int]  # all cores of the run
    window_s: float = 2.0
    window_steps: int = 2
    margin: float = 0.25
    wide: bool = False
    moves: int = 0
    _mark: tuple[float, float, float, int] = field(default=(0.0, 0.0, 0.0, 0))

    def observe(self, loop_s: float, learn_s: float, gen_s: float, steps: int, generators: int) -> list[int] | None:
        """After a learner step (cumulative totals): the learner's new cores when it should move, else None."""
        span, steps_in = loop_s - self._mark[0], steps - self._mark[3]
        if span < self.window_s or steps_in < self.window_steps:
            return None
        learner = (learn_s - self._mark[1]) / span
        gens = (gen_s - self._mark[2]) / (span * generators)
        self._mark = (loop_s, learn_s, gen_s, steps)
        if (learner - gens > self.margin) != self.wide and abs(learner - gens) > self.margin:
            self.wide, self.moves = not self.wide, self.moves + 1
            return self.cores
        return None

    @property
    def cores(self) -> list[int]:
        return self.every if self.wide else self.own


def core_balancer(cfg: RunConfig, plan: CorePlan) -> CoreBalancer | None:
    """Only a pinned plan with one learner rank has cores to move (GPU runs and shared cores do not)."""
    if not (plan.pinned and cfg.resources.balance_cores and cfg.learner.num_ranks == 1):
        return None
    every = sorted({c for cores in plan.generator_cores for c in cores} | set(plan.learner_cores))
    return CoreBalancer(list(plan.learner_cores), every)


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
