"""Learner failover: a dead learner is replaced in the same process and the run rolls back to its newest
checkpoint, exactly as `train --resume` would continue from it (docs/reliability.md), or to its start when it
has written none yet (a death before the first checkpoint would otherwise end the run with nothing saved).

Ray, the generators' engines, the reward actor and the HTTP API stay up. What the learner trained after
the checkpoint is forgotten: the generations in flight are awaited and dropped, the broker forgets every
version (the next ones reuse the numbers, under a new lineage, so a generator holding an old version of
the same number loads the new one), and the queue, the prompt position, the counters and the logs go back
to the checkpoint's. Each step is then trained once and each prompt once, as after a resume.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Union

import ray

from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.cluster.local_ray import require_gcs
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, worker_error
from async_rlhf.pipeline.builder import LEARNER_LOST, ComponentBuilder
from async_rlhf.pipeline.eval_schedule import EvalSchedule
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.learner_calls import LearnerHung, learner_answer, learner_failure
from async_rlhf.pipeline.resume import LEARNER_DIR, ControllerSnapshot, load_snapshot, publish_weights
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import Components, LoopState, RunStats
from async_rlhf.weights.broker import WeightSyncBroker
from async_rlhf.weights.nccl import WeightSyncTimeout
from learners.group import kill_learner

PING_TIMEOUT_S = 10.0  # a live but busy learner answers after its step; a dead one fails at once


def learner_alive(learner: Any) -> bool:
    """False when the learner's process (any rank) is gone; a learner that only raised is alive."""
    try:
        ray.get(learner.__ray_ready__.remote(), timeout=PING_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        return True
    except ray.exceptions.RayError:
        return False
    return True


def push_timed_out(exc: BaseException, transport: str) -> bool:
    """A learner whose weight push did not finish (WeightSyncTimeout): most likely a generator died during the
    broadcast, which leaves the learner's NCCL communicator unusable (a collective cannot be cancelled), so the
    learner is replaced like a dead one; a persistent cause ends the run after learner.max_restarts."""
    return transport in PUSHED_TRANSPORTS and isinstance(worker_error(exc), WeightSyncTimeout)


RestartPoint = Union[Checkpoint, ControllerSnapshot]  # a checkpoint, or a fresh run's step 0 as it started


def checkpoint_to_restart_from(checkpoints: CheckpointStore, restarts: int, limit: int, step: int,
                               exc: BaseException, start: ControllerSnapshot | None = None) -> RestartPoint:
    """The newest valid checkpoint, else `start` (a fresh run's step 0, while it has written none), or why the
    learner cannot be replaced (then `exc` ends the run)."""
    if restarts >= limit:
        note(f"the learner died and learner.max_restarts={limit} restarts are used up")
        raise exc
    ckpt = checkpoints.latest_valid(note)
    point = ckpt if ckpt is not None else start
    if point is None:
        raise RunError(f"the learner died at step {step} ({learner_failure(exc)}) and the run has no "
                       f"checkpoint to replace it from; set checkpoint.every (e.g. checkpoint.every=25) so that a dead "
                       f"learner is replaced and the run goes on") from exc
    return point


class LearnerFailover:
    def __init__(self, cfg: RunConfig, checkpoints: CheckpointStore, parts: Components, state: LoopState,
                 stats: RunStats, broker: WeightSyncBroker, pool: GeneratorPool, rewards: RewardBook,
                 evals: EvalSchedule, builder: ComponentBuilder, restore: Callable[[ControllerSnapshot], None]) -> None:
        self.cfg = cfg
        self.checkpoints = checkpoints
        self.parts = parts
        self.state = state
        self.stats = stats
        self.broker = broker
        self.pool = pool
        self.rewards = rewards
        self.evals = evals
        self.builder = builder
        self.restore = restore  # the loop's own state back to a snapshot (pipeline.resume.restore)
        self.start: ControllerSnapshot | None = None  # a fresh run's step 0 (resume.starting_point), set by the loop

    def fail_over(self, exc: BaseException) -> None:
        """A dead learner is replaced from the newest checkpoint and the run rolls back to it; any other
        error, or a death past learner.max_restarts or without a checkpoint, ends the run."""
        require_gcs()  # a learner lost with Ray's GCS cannot be replaced
        if isinstance(exc, LearnerHung):
            self._kill_hung(exc)
        elif learner_alive(self.parts.learner) and not push_timed_out(exc, self.cfg.weight_sync.transport):
            raise exc
        lost = self.state.steps_taken
        point = checkpoint_to_restart_from(self.checkpoints, self.stats.learner_restarts, self.cfg.learner.max_restarts,
                                           lost, exc, self.start)
        self.evals.abandon()  # pending evaluations are of rolled-back versions; none may keep a lease
        self.pool.quiesce()
        self.rewards.forget_in_flight()
        self.stats.learner_restarts += 1  # before its start: a new learner that dies there is counted on top
        version = self._replace_from(point)
        self.state.start_clocks()  # the new learner's: its start and the roll-back were bounded on their own
        origin = point.path.name if isinstance(point, Checkpoint) else "the start (no checkpoint written yet)"
        again = {0: "no step is lost", 1: f"step {lost} is trained again"}.get(
            lost - version, f"steps {version + 1}..{lost} are trained again")
        print(f"[async-rlhf] the learner failed at step {lost} ({learner_failure(exc)}); replaced it from {origin} "
              f"(restart {self.stats.learner_restarts} of learner.max_restarts={self.cfg.learner.max_restarts}); "
              f"{again}", file=sys.stderr, flush=True)

    def _replace_from(self, point: RestartPoint) -> int:
        """A new learner rolled back to `point`; returns its version. One that dies in its start or its roll-back
        (Ray's memory monitor kills the newest worker first, so one started while the node is short of memory
        does) is replaced again within learner.max_restarts, as at start-up (ComponentBuilder.with_learner)."""
        died: BaseException | None = None
        try:
            self.builder.replace_learner()
        except LEARNER_LOST as exc:
            died = exc
        versions: list[int] = []
        self.builder.with_learner(lambda: versions.append(self.roll_back(point)), died)
        return versions[-1]

    def kill_hung(self, idle_s: float) -> bool:
        """A learner with a step in flight that has finished none for learner.stall_timeout_s is hung (a collective
        that never completes, a stopped process): it is killed, so that the loop's next look at its step fails over
        to a new learner, when a checkpoint can replace it and restarts are left. False: the stall ends the run."""
        if self.state.learner_job is None or not self._replaceable():
            return False
        note(f"the learner has finished no step for {idle_s:.0f}s with one in flight (learner.stall_timeout_s="
             f"{self.cfg.learner.stall_timeout_s:g}): killing it, to replace it from the newest checkpoint")
        kill_learner(self.parts.learner)
        return True

    def _kill_hung(self, exc: LearnerHung) -> None:
        """A learner that answered nothing to one of the driver's calls (learner_calls.py) is killed, to be replaced
        as a dead one (fail_over then says so, with `exc`); where it cannot be, `exc` ends the run."""
        if not self._replaceable():
            raise exc
        kill_learner(self.parts.learner)

    def _replaceable(self) -> bool:
        """A restart is left and a valid checkpoint (or the run's start) is there to replace the learner from."""
        if self.stats.learner_restarts >= self.cfg.learner.max_restarts:
            return False
        return self.start is not None or self.checkpoints.latest_valid(lambda _message: None) is not None

    def roll_back(self, point: RestartPoint) -> int:
        """The new learner loads the checkpoint (the run's start: it is that as built), its weights are published as
        the checkpoint's version under a new lineage, and the loop's state goes back to the checkpoint's; returns
        that version."""
        learner, timeout = self.parts.learner, self.cfg.learner.stall_timeout_s
        if isinstance(point, Checkpoint):
            version = learner_answer(learner.load_state.remote(str(point.path.resolve() / LEARNER_DIR)),
                                     "loading the checkpoint", timeout)
            snapshot = load_snapshot(point.path)
        else:
            version, snapshot = point.step, point
        self.broker.roll_back(version)
        # fixed delay: nothing older than the restored weights exists any more
        self.state.reset(first_version=version, learner_idle_since=time.perf_counter())
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # the new learner forms the push group anew
            self.pool.connect()
        publish_weights(learner, self.broker, version, timeout)
        self.restore(snapshot)
        return version


def note(message: str) -> None:
    print(f"[async-rlhf] {message}", file=sys.stderr, flush=True)
