"""Watchdogs: the checks that stop a run rather than let it hang or "finish" without having trained.

A generator or the reward actor that hangs is killed so that Ray restarts it (pipeline/generator_hangs.py,
pipeline/rewards.py); a learner that hangs with a step in flight is killed and replaced from the newest
checkpoint, where there is one (pipeline/failover.py kill_hung). Otherwise a stalled learner, several non-finite
steps in a row and several steps without a usable reward each end the run with a RunError naming the fix; the
last two first take a checkpoint, so the run can be continued. Steps with no reward signal (every prompt's
completions scored alike) are said once, and the run goes on.
"""
from __future__ import annotations

import sys
from concurrent.futures import Future
from typing import Callable

import ray

from async_rlhf.cluster.local_ray import GCS_LOST, GcsWatch, RayLost
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, ray_logs
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.queue import RolloutQueue
from async_rlhf.pipeline.state import LoopState
from async_rlhf.rollout import Completion, RolloutGroup, scored_reward

TIED_STEPS = 10  # all-alike steps in a row before the notice: a few happen early on a sparse (0/1) reward


class Watchdogs:
    def __init__(self, cfg: RunConfig, state: LoopState, control: RunControl, pool: GeneratorPool,
                 queue: RolloutQueue, take_checkpoints: Callable[[], None], reward_source: Callable[[], str],
                 kill_hung_learner: Callable[[float], bool] = lambda _idle_s: False,
                 check_hangs: Callable[[], None] = lambda: None,
                 evaluating: Callable[[], bool] = lambda: False) -> None:
        self.cfg = cfg
        self.state = state
        self.control = control
        self.pool = pool
        self.queue = queue
        self.take_checkpoints = take_checkpoints  # serves the requests posted so far (learner idle)
        self.reward_source = reward_source
        self.kill_hung_learner = kill_hung_learner  # True: killed, and the loop fails over to a new one
        self.check_hangs = check_hangs  # kills hung generators and a hung reward actor
        self.evaluating = evaluating  # the learner idle while generator 0 samples an evaluation (hang-checked)
        self.gcs: GcsWatch | None = None  # started with the loop's first check
        self.ray_lost: Future | None = None  # the checkpoint taken on the way out once the GCS is lost
        self.tie_said = False  # the no-signal notice is given once per process
        self.some_failed_said = False  # so is the notice of a batch's rewards partly failed

    def check_stall(self) -> None:
        """A run whose learner has finished no step for learner.stall_timeout_s ends with the reason. Time the
        run was paused (HTTP), this process frozen (Ctrl-Z, then fg: the live clock), a generator restarting (its
        own bound: GeneratorHangs) or the learner idle behind an evaluation's sample call (bounded by the same
        check) is not the learner's and does not count."""
        self.check_hangs()
        if self.control.paused or self.pool.recovering() or self.evaluating():
            self.state.last_progress = live_clock.now()
            return
        idle, limit = live_clock.now() - self.state.last_progress, self.cfg.learner.stall_timeout_s
        if idle > limit:
            idle = self._learner_idle_s()
        if idle > limit and self.kill_hung_learner(idle):
            self.state.last_progress = live_clock.now()  # the new learner's clock
            return
        if idle > limit:
            busy = [f"generator {g.generator_id} ({len(g.chunks)} chunk(s))" for g in self.pool.slots if g.busy]
            raise RunError(f"no learner step finished for {idle:.0f}s (learner.stall_timeout_s={limit:g}); in flight: "
                           f"{', '.join(busy) or 'nothing'}, queue depth {len(self.queue)}; see the Ray logs under "
                           f"{ray_logs()}")

    def _learner_idle_s(self) -> float:
        """Seconds since the learner last worked: its last step finished, the one in flight was sent, or (done, not
        yet handled) now. The driver may have been held in a wait meanwhile (a checkpoint's drain of an evaluation
        whose reward actor hung for 30 s): a step sent after it, or finished during it, is no stall; the learner
        killed as hung then was healthy (a GRPO chaos run by hand)."""
        job, now = self.state.learner_job, live_clock.now()
        if job is not None and ray.wait([job.save_ref], timeout=0)[0]:
            self.state.last_progress = now
        elif job is not None:
            self.state.last_progress = max(self.state.last_progress, job.dispatched_at)
        return now - self.state.last_progress

    def check_ray(self) -> None:
        """Ray's GCS lost (a local one killed, a cluster's head node gone): the run stops as for a SIGTERM, the step
        in flight finished and checkpointed, while its workers still answer (GcsWatch)."""
        if self.gcs is None:
            self.gcs = GcsWatch()
        if self.ray_lost is None and self.gcs.lost:
            print("[async-rlhf] Ray's GCS stopped answering: checkpointing, then stopping", file=sys.stderr, flush=True)
            self.ray_lost = self.control.terminate()

    def raise_if_ray_lost(self) -> None:
        """After the loop and its checkpoint: RayLost (the CLI's line gives the --resume command)."""
        if self.ray_lost is not None:
            raise RayLost(f"{GCS_LOST}; checkpoint: {checkpoint_path(self.ray_lost)}")

    def close(self) -> None:
        if self.gcs is not None:
            self.gcs.close()
            self.gcs = None

    def check_finite(self, metrics: dict) -> None:
        """A non-finite step was skipped by the learner; several in a row stop the run, with a checkpoint."""
        st = self.state
        if not metrics.get("nonfinite"):
            st.nonfinite_run = 0
            return
        st.nonfinite_run += 1
        st.nonfinite_total += 1
        limit = self.cfg.learner.max_nonfinite_steps
        if st.nonfinite_run >= limit:
            self.stop_with_checkpoint(f"{st.nonfinite_run} consecutive learner steps had a non-finite loss "
                                      f"(learner.max_nonfinite_steps={limit})",
                                      "Lower learner.lr or loss.beta, or check the rewards")

    def check_rewarded(self, batch: list[RolloutGroup]) -> None:
        """A run whose rewards all fail must not finish as if it had trained: K such steps in a row stop it."""
        items = [c for g in batch for c in g.completions]
        failed = [c for c in items if c.reward_status != "ok"]
        if len(failed) < len(items):
            self.state.unrewarded_run = 0
            self._say_some_failed(len(failed), len(items), failed[0] if failed else None)
            return
        self.state.unrewarded_run += 1
        limit = self.cfg.reward.max_failed_steps
        if self.state.unrewarded_run >= limit:
            self.stop_with_checkpoint(
                f"{self.state.unrewarded_run} learner steps in a row had no usable reward from the train reward "
                f"({self.reward_source()}): {len(failed)} of {len(items)} items of the last batch failed, the first "
                f"because: {failed[0].reward_error or failed[0].reward_status} (reward.max_failed_steps={limit})",
                "Fix the reward model and continue with --resume RUN_DIR")

    def _say_some_failed(self, failed: int, items: int, first: Completion | None) -> None:
        """Some of a batch's train rewards failed (a function of the user's that raises on some inputs): the rest
        trains, and the first such batch says so once."""
        if first is None or self.some_failed_said:
            return
        self.some_failed_said = True
        print(f"[async-rlhf] warning: the train reward ({self.reward_source()}) failed for {failed} of {items} "
              f"completions of a batch, the first because: {first.reward_error or first.reward_status}; they are not "
              "trained on (counted in /queue and summary.json as failed_reward); the run goes on",
              file=sys.stderr, flush=True)

    def check_signal(self, batch: list[RolloutGroup]) -> None:
        """A batch whose every prompt's completions got one same reward has nothing to learn from: online DPO
        makes no update, group baselines give zero advantages. Such steps in a row (a constant reward) were
        silent; they are said once. Not a stop: on a sparse reward a later batch may differ, and a policy that
        has learned the task gets one same (best) reward everywhere."""
        rewards = [[scored_reward(c) for c in g.scored] for g in batch]
        spreads = [max(r) - min(r) for r in rewards if len(r) > 1]
        st = self.state
        if not spreads or any(spreads):
            st.tied_run, st.reward_signal_seen = 0, st.reward_signal_seen or any(spreads)
            return
        st.tied_run += 1
        if st.tied_run >= TIED_STEPS and not self.tie_said:
            self.tie_said = True
            print(f"[async-rlhf] {self._no_signal(next(r[0] for r in rewards if len(r) > 1))}", file=sys.stderr,
                  flush=True)

    def _no_signal(self, value: float) -> str:
        said = (f"{TIED_STEPS} learner steps in a row had no reward signal: each prompt's "
                f"{self.cfg.generation.samples_per_prompt} completions got one same reward (e.g. {value:g}), so "
                f"{self.cfg.loss.name} learns nothing from them")
        if self.state.reward_signal_seen:
            return f"note: {said}; if {value:g} is the best reward, the policy has learned the task (more steps " \
                   "only cost time)"
        return f"warning: {said}. Check that the reward ({self.reward_source()}) tells completions apart, or make " \
               "them differ more (generation.temperature, generation.samples_per_prompt); the run goes on"

    def stop_with_checkpoint(self, what: str, fix: str) -> None:
        future: Future = self.control.request_checkpoint()
        self.take_checkpoints()
        raise RunError(f"{what}; checkpoint: {checkpoint_path(future)}. {fix}")


def checkpoint_path(served: Future) -> str:
    """The path of a checkpoint request the loop has served, or 'none (why)'."""
    if not served.done():
        return "none (the run stopped before it could take one)"
    return served.result()["path"] if served.exception() is None else f"none ({served.exception()})"
