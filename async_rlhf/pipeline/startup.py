"""Start-up: where the time from `async-rlhf train` to the first learner step goes (`setup_*` in summary.json).

The clock counts from the process's own start (the kernel's record of it), so the interpreter and the
imports before any of our code runs are counted too. Phases on the path to the first step are laps, one
after the other, so they add up to `setup_to_first_step_s`:
  process (interpreter, imports, config) -> policy (policy checkpoint and task) -> ray (ray.init) ->
  actors (learner, generators, reward actor, started side by side) -> eval (the initial evaluation; the
  first batches generate meanwhile) -> first_step (the loop, up to its first learner step).
`async-rlhf train` starts a local Ray during `process` (start_ray_while_importing), so `ray` is then ~0.
What runs beside that path is reported apart and is not part of the sum: each actor's own start
(`setup_learner_s`, `setup_generators_s`, `setup_reward_s`: creation to first answer).
A controller run inside a longer-lived process (a test, a benchmark) counts that process's age in `process`.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.cluster.local_ray import held_stop_signals, init_local_ray, require_gcs
from async_rlhf.cluster.placement import free_resources
from async_rlhf.cluster.resources import usable_cores
from async_rlhf.config.base import ConfigError
from async_rlhf.config.redaction import redact_url
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, first_line, ray_logs
from async_rlhf.pipeline import live_clock
from reward_models.columns import NO_SERVED, ServedColumns

LAPS = ("process", "policy", "ray", "actors", "eval", "first_step")
PLACEMENT_CHECK_S = 10.0  # how often a start-up still waiting on its actors asks whether the cluster placed them
RESTART_FACTOR = 5.0  # a restarted actor may take this many times its role's first start here: a replacement
# learner took 2.1x its first start (9.3 s vs 4.4 s, a fresh worker process beside a live run; 2 cores)
RESTART_BOUND = f"learner.stall_timeout_s, or {RESTART_FACTOR:g}x its first start in this run"  # for messages


def restart_limit_s(stall_timeout_s: float, first_start_s: float) -> float:
    """How long a restarted learner, generator or reward actor may take to answer: learner.stall_timeout_s, or
    RESTART_FACTOR times its role's first start in this run where that is longer (a restart is a start:
    DeepSpeed's or vLLM's, ~10 s on 2 cores beside a busy run, and a user's stall timeout may be shorter)."""
    return max(stall_timeout_s, RESTART_FACTOR * first_start_s)


def process_age_s() -> float:
    """Seconds since this process started: boot-time clock now minus the process's start in boot-time ticks
    (/proc/self/stat field 22), both exact to a tick, unlike psutil's create_time (whole-second boot time)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # the command name may hold spaces: split after it
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: the clock starts now
        return 0.0


@dataclass
class StartupClock:
    """Laps on the path to the first learner step and spans beside it, in wall-clock seconds."""

    origin: float  # time.time() of the process start
    laps: dict[str, float] = field(default_factory=dict)
    beside: dict[str, float] = field(default_factory=dict)
    last: float = field(init=False)  # time.time() when the previous lap ended

    def __post_init__(self) -> None:
        self.last = self.origin

    @classmethod
    def since_process_start(cls) -> "StartupClock":
        return cls(origin=time.time() - process_age_s())

    def lap(self, name: str) -> None:
        """The phase `name` ends now; it began where the previous one ended."""
        now = time.time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def note(self, name: str, started: float) -> None:
        """A span beside the path: from `started` (on the live clock, as the silences it bounds) to now."""
        self.beside[name] = live_clock.now() - started

    def after_first_step(self, progress: Callable[[dict], None]) -> Callable[[dict], None]:
        """`progress`, also ending the first_step lap at the first learner step it is told of."""
        def wrapped(record: dict) -> None:
            if "first_step" not in self.laps:
                self.lap("first_step")
            progress(record)
        return wrapped

    def summary(self) -> dict[str, float | None]:
        """summary.json's `setup_<phase>_s` keys and their sum (None while no step has finished)."""
        out: dict[str, float | None] = {f"setup_{n}_s": round(self.laps.get(n, 0.0), 3) for n in LAPS}
        out.update({f"setup_{n}_s": round(s, 3) for n, s in self.beside.items()})
        done = "first_step" in self.laps
        out["setup_to_first_step_s"] = round(sum(self.laps.values()), 3) if done else None
        return out


@dataclass
class PlacementWatch:
    """A run's actors that a shared cluster cannot place yet (other jobs hold its CPUs or GPUs) waited without
    a word, for good. They are named once, and the run stops if they still wait after `limit_s`, as a placement
    group that cannot be placed does (placement.reserve)."""

    unplaced: Callable[[], list[str]]  # names of the actors still without a worker (placement.unplaced)
    limit_s: float
    said: bool = False

    def check(self, waited_s: float) -> None:
        require_gcs("the run's actors cannot start")  # a GCS lost here left the run waiting until Ray's abort
        names = self.unplaced()
        if names and waited_s > self.limit_s:
            raise RunError(f"the Ray cluster did not place {', '.join(names)} within {self.limit_s:g}s "
                           f"(learner.stall_timeout_s; {free_resources()}: other jobs hold the rest); stop those or "
                           "add nodes, then start the run again")
        if names and not self.said:
            print(f"[async-rlhf] waiting for the Ray cluster to place {', '.join(names)} ({free_resources()}: "
                  f"other jobs hold the rest); the run stops if they wait past {self.limit_s:g}s", flush=True)
            self.said = True


@dataclass(frozen=True)
class FirstCall:
    """An actor's first call at start-up (`ref`), from `name` as a user knows it; its processes are `handles`."""

    name: str
    ref: Any
    handles: list[Any]


START_SILENCE_FLOOR_S = 60.0  # starts vary with the machine's load (a generator took 18.6 s beside another run)
# With no yardstick started either (the learner and the generators both silent): a loaded 2-core machine starts a
# vLLM engine in minutes (bench/), so such a start is waited on longer before it is taken for a hang.
START_ALONE_FLOOR_S = 180.0
YARDSTICKS = {"learner": ("generators",), "generators": ("learner",), "reward": ("learner", "generators")}
# the roles whose start a silent role's is judged by: the learner and the generators both load the policy; a rule
# reward answers at once and says nothing of them


@dataclass
class StartSilence:
    """An actor placed and silent at start-up (a deadlock in its start, a stopped process) was waited on for good.
    One still silent restart_limit_s(stall, its yardsticks' slowest start), and `floor_s`, after they answered
    (YARDSTICKS) is killed: Ray starts a generator or the reward actor again and its first call runs there; a
    learner (no Ray restarts) dies, and the builder starts a new one (ComponentBuilder, `spare`). Where none of its
    yardsticks has answered either, it is killed `stall_s`, and `alone_floor_s`, after the start."""

    stall_s: float
    floor_s: float = START_SILENCE_FLOOR_S
    alone_floor_s: float = START_ALONE_FLOOR_S
    killed_at: float = 0.0  # live_clock time of the last kill: the restarted actors' start counts from there

    def check(self, clock: StartupClock, started: float, calls: dict[str, list[FirstCall]], pending: list[Any]) -> None:
        """Every role is judged on the same clock before any is killed: a kill restarts the survivors' clock, and
        the learner and the generators both silent were then killed one limit apart."""
        killed = [self._judge(clock, started, role, [call for call in named if call.ref in pending])
                  for role, named in calls.items()]
        if any(killed):
            self.killed_at = live_clock.now()

    def _judge(self, clock: StartupClock, started: float, role: str, silent: list[FirstCall]) -> bool:
        """Kill `role`'s silent actors if they are past their limit; True if it did."""
        if not silent:
            return False
        since, limit, why = self._limit(clock, started, role)
        waited = live_clock.now() - max(since, self.killed_at)
        if waited <= limit:
            return False
        print(f"[async-rlhf] {', '.join(call.name for call in silent)} answered nothing {waited:.0f}s {why}; its log "
              f"is under {ray_logs()}): killing it to start it again", file=sys.stderr, flush=True)
        for handle in (h for call in silent for h in call.handles):
            ray.kill(handle, no_restart=False)
        return True

    def _limit(self, clock: StartupClock, started: float, role: str) -> tuple[float, float, str]:
        """When `role`'s wait counts from, how long it may be, and why, as the kill's line says it."""
        answered = [clock.beside[other] for other in YARDSTICKS.get(role, ()) if other in clock.beside]
        if not answered:
            limit = max(self.stall_s, self.alone_floor_s)
            return started, limit, (f"after its start, and no role its start is judged by had started either (limit "
                                    f"{limit:.0f}s: learner.stall_timeout_s, at least {self.alone_floor_s:.0f}s")
        limit = max(restart_limit_s(self.stall_s, max(answered)), self.floor_s)
        return started + max(answered), limit, (f"after the other roles had started (limit {limit:.0f}s: "
                                                f"learner.stall_timeout_s, or {RESTART_FACTOR:g}x their start, at "
                                                f"least {self.floor_s:.0f}s")


def await_actors(clock: StartupClock, started: float, calls: dict[str, list[FirstCall]], watch: PlacementWatch,
                 silence: StartSilence, spare: str = "") -> dict[str, list[Any]]:
    """Wait once for the first answer of every actor started at `started` (live_clock; they start side by side), and
    note when each role's last answer came (`setup_<role>_s`). An actor that died raises, as ray.get does, but
    the `spare` role's death is its answer (its caller starts it again); one the cluster cannot place is named
    while the run waits (`watch`); one placed and silent is killed (`silence`)."""
    role_of = {call.ref: role for role, named in calls.items() for call in named}
    pending = list(role_of)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=PLACEMENT_CHECK_S)
        if not ready:
            watch.check(live_clock.now() - started)
            if not watch.unplaced():
                silence.check(clock, started, calls, pending)
            continue
        role = role_of[ready[0]]
        if not any(call.ref in pending for call in calls[role]):
            clock.note(role, started)
    return {role: _answers([call.ref for call in named], role == spare) for role, named in calls.items()}


def _answers(refs: list[Any], spare: bool) -> list[Any]:
    """`ray.get(refs)`; for a spare role an actor's death is returned as its answer."""
    try:
        return ray.get(refs)
    except ACTOR_LOST as exc:
        if not spare:
            raise
        return [exc]


class RestartTimedOut(RunError):
    """A restarted actor placed but not up within its restart's bound: hung or stopped in its start."""


def await_restarted(ref: Any, name: str, limit_s: float, watch: PlacementWatch) -> None:
    """A restarted actor's first answer (`ref`): once placed, it has `limit_s` (restart_limit_s), then
    RestartTimedOut; a cluster not placing it is `watch`'s to bound, as at start-up. An actor that died raises."""
    started = live_clock.now()
    while not ray.wait([ref], timeout=min(PLACEMENT_CHECK_S, limit_s / 3))[0]:
        waited = live_clock.now() - started
        watch.check(waited)
        if waited > limit_s and not watch.unplaced():
            raise RestartTimedOut(f"{name} did not start within {round(limit_s, 1):g}s ({RESTART_BOUND}); why is in "
                                  f"its log under {ray_logs()}")
    ray.get(ref)


def ray_init_kwargs(cfg: RunConfig, cores: int) -> dict[str, Any]:
    """ray.init's arguments for a run: a local Ray gets a CPU per role at least (cores pinned or not); Ray says
    nothing at INFO level ("Started a local Ray instance", "Connected to Ray cluster": the run says its own)."""
    # "local": with ray.address unset Ray joined the cluster that $RAY_ADDRESS or a `ray start` on this machine
    # named, and failed there ("num_cpus and num_gpus must not be provided"); unset means a Ray of the run's own.
    kwargs: dict[str, Any] = {"address": cfg.ray.address or "local", "include_dashboard": False,
                              "log_to_driver": False, "logging_level": logging.WARNING}
    if cfg.ray.address is None:  # a cluster's resources are what its `ray start` commands declared
        roles = cfg.generation.num_generators + cfg.learner.num_ranks
        kwargs["num_cpus"] = cfg.resources.num_cpus or max(cores, roles)
        # Ray adds 15 to its workers' niceness (headroom for its raylet), so any process at the user's priority
        # took ~28x their CPU: beside 6 busy loops on 2 cores the quickstart's first step came after 303 s, not
        # 40 s. The run's workers get the priority it was started with (`nice` included); a cluster keeps its own.
        kwargs["_system_config"] = {"worker_niceness": 0}
    return kwargs


def start_ray_while_importing(cfg: RunConfig, module: str) -> bool:
    """Start a local Ray while `module` is imported in another thread: both take seconds (Ray in its own
    processes, the import in this one), so the run's start-up pays for the longer only. True if Ray was
    started here (the caller owns it). A cluster (ray.address) is only connected to, by the controller.
    If ray.init fails here (its GCS killed in its first seconds: Ray's own waits on it take ~30 s), that is said
    on one line and the controller's own ray.init tries again, reporting the error as always."""
    importer = threading.Thread(target=_import_quietly, args=(module,), daemon=True)
    with held_stop_signals():  # for good in the importer: else a signal could go to it, and run inside ray.init
        importer.start()
    started = False
    if cfg.ray.address is None and not ray.is_initialized():
        try:
            init_local_ray(**ray_init_kwargs(cfg, len(usable_cores())))
            started = True
        except Exception as exc:  # a second failure is reported by the controller's own attempt (the docstring)
            print(f"[async-rlhf] Ray did not start ({first_line(exc)}); starting it again", file=sys.stderr,
                  flush=True)
    importer.join()
    return started


def _import_quietly(module: str) -> None:
    """An error is left for the caller's own import of `module`, which raises it again in its thread."""
    try:
        importlib.import_module(module)
    except BaseException:  # raised again by the caller's import
        pass


def check_reward_server(cfg: RunConfig, log: Callable[[str], None]) -> ServedColumns:
    """A remote reward model that does not answer at all is said before any worker starts (it used to be
    found by the first reward calls, after start-up, and end the run reward.max_failed_steps steps later).
    One still starting up gets up to reward.remote.deadline_s. Before the prompts are read: the dataset columns
    its function takes, as its /healthz says, are carried by them."""
    from reward_models.remote import bearer, wait_for_server

    remote = cfg.reward.remote
    if remote is None:
        return NO_SERVED
    url = redact_url(remote.url)
    def waiting(first: str) -> None:
        log(f"waiting up to {remote.deadline_s:g}s for the reward server at {url} ({first})")

    why, health = wait_for_server(remote.url, remote.timeout_s, remote.deadline_s, waiting, bearer(remote.token_env))
    if why is not None:
        raise ConfigError(f"config error: reward.remote.url: {url} did not answer within {remote.deadline_s:g}s "
                          f"({why}); start the reward server first (async-rlhf serve-reward, "
                          "docs/reward_protocol.md), or fix the URL")
    return ServedColumns.read(health)
