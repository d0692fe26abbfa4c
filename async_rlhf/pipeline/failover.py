"""Learner failover: a dead learner is replaced in the same process and the run rolls back to its newest
checkpoint, exactly as `train --resume` would continue from it (docs/reliability.md).

Ray, the generators' engines, the reward actor and the HTTP API stay up. What the learner trained after
the checkpoint is forgotten: the generations in flight are awaited and dropped, the broker forgets every
version (the next ones reuse the numbers, under a new lineage, so a generator holding an old version of
the same number loads the new one), and the queue, the prompt position, the counters and the logs go back
to the checkpoint's. Each step is then trained once and each prompt once, as after a resume.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import ray

from async_rlhf.checkpoint.store import Checkpoint
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.failures import RunError, what_died
from async_rlhf.checkpoint.resume import LEARNER_DIR, load_snapshot, publish_weights, restore

if TYPE_CHECKING:
    from async_rlhf.pipeline.controller import Controller

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


def checkpoint_to_restart_from(c: "Controller", exc: BaseException) -> Checkpoint:
    """The newest valid checkpoint, or why the learner cannot be replaced (then `exc` ends the run)."""
    limit = c.cfg.learner.max_restarts
    if c.learner_restarts >= limit:
        note(f"the learner died and learner.max_restarts={limit} restarts are used up")
        raise exc
    ckpt = c.checkpoints.latest_valid(note)
    if ckpt is None:
        raise RunError(f"the learner died at step {c.state.steps_taken} ({what_died(exc)}) and the run has no "
                       f"checkpoint to replace it from; set checkpoint.every (e.g. checkpoint.every=25) so that a dead "
                       f"learner is replaced and the run goes on") from exc
    return ckpt


def quiesce_generation(c: "Controller") -> None:
    """Let every generation in flight end and drop it (it belongs to the future being rolled back); forget
    the reward calls in flight (a late answer is then never queued). Every generator is probed before its
    next batch, so one that died meanwhile is counted and, on pushed transports, rejoins."""
    jobs = [slot.job for slot in c.generators if slot.job is not None]
    _, running = ray.wait(jobs, num_returns=len(jobs), timeout=c.cfg.learner.stall_timeout_s) if jobs else ([], [])
    if running:
        raise RunError(f"the learner died and {len(running)} generation(s) did not finish within "
                       f"learner.stall_timeout_s={c.cfg.learner.stall_timeout_s:g}s; continue with --resume RUN_DIR")
    for slot in c.generators:
        if slot.leased_version is not None:
            c.broker.release(slot.leased_version)
        slot.job, slot.leased_version, slot.prompts = None, None, []
        slot.recovering, slot.not_before = True, 0.0
    c.state.reward_jobs.clear()
    c.reward_started.clear()


def roll_back(c: "Controller", ckpt: Checkpoint) -> int:
    """The new learner loads the checkpoint, its weights are published as the checkpoint's version under a
    new lineage, and the controller's state goes back to the checkpoint's; returns that version."""
    version = ray.get(c.learner.load_state.remote(str(ckpt.path.resolve() / LEARNER_DIR)))
    c.broker.roll_back(version)
    c.first_version = version  # fixed delay: nothing older than the restored weights exists any more
    if c.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # the new learner forms the push group anew
        c.connect_generators()
    publish_weights(c, version)
    restore(c, load_snapshot(ckpt.path))
    return version


def note(message: str) -> None:
    print(f"[async-rlhf] {message}", file=sys.stderr, flush=True)
