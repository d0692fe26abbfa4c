"""RewardBook: the reward calls in flight, their answers into the queue, and the reward actor's restarts."""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

import ray

from actors.generation_result import GenerationResult
from async_rlhf.cluster import actor_table
from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.cluster.local_ray import require_gcs
from async_rlhf.config.redaction import redact_url
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, node_crashed, ray_logs
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.generator_hangs import HANG_FACTOR
from async_rlhf.pipeline.queue import RolloutQueue
from async_rlhf.pipeline.startup import RESTART_BOUND
from async_rlhf.pipeline.state import Components, LoopState, RunStats
from async_rlhf.pipeline.vineppo import attach_advantages
from async_rlhf.pipeline.waits import AnswerWatch, pids_at_end
from async_rlhf.rollout import RolloutGroup
from reward_models.scoring_marks import ScoringMarks, while_scoring


class RewardBook:
    def __init__(self, cfg: RunConfig, parts: Components, state: LoopState, stats: RunStats, queue: RolloutQueue,
                 timeline: Timeline) -> None:
        self.cfg = cfg
        self.parts = parts
        self.state = state
        self.stats = stats
        self.queue = queue
        self.timeline = timeline
        self.started: dict[Any, float] = {}  # reward call -> its dispatch (live_clock)
        self.pid = 0  # the reward actor's process; a new one is a restart
        self.restart_limit_s = cfg.learner.stall_timeout_s  # how long its restart may take (set once it started)
        self.heard_at = live_clock.now()  # its last answer, or when it was last idle: its silence runs from here
        self.answers = AnswerWatch()  # its calls found done so far (a blocking wait leaves them unhandled), its kill
        self.longest_call_s = 0.0  # the longest a reward call has taken, dispatch to answer
        self.died_running: str | None = None  # the reward its last dead process was running (scoring_marks.py)
        self.killed_pid = 0  # the process last killed for a restart silent past its bound

    def score(self, result: GenerationResult) -> None:
        """One reward call for responses and MC rollouts: both get the RewardService's failure handling."""
        rollouts = result.mc.rollouts if result.mc is not None else []
        if not self.state.reward_jobs:  # not silent before this call (a check may not have run since it was idle)
            self.heard_at = live_clock.now()
        ref = self.parts.reward.score.remote(result.groups + rollouts)
        self.state.reward_jobs[ref] = result
        self.started[ref] = live_clock.now()

    def on_scored(self, ref: Any) -> None:
        result: GenerationResult = self.state.reward_jobs.pop(ref)
        started = self.started.pop(ref, live_clock.now())
        try:
            scored = ray.get(ref)
        except ACTOR_LOST as exc:
            self.on_died(exc)
            self.regenerate(result)
            return
        self.heard_at = live_clock.now()
        self.longest_call_s = max(self.longest_call_s, self.heard_at - started)
        ended = time.time()
        self.timeline.add("reward", "reward", ended - (self.heard_at - started), ended, result.policy_version)
        self.queue_scored(result, scored)

    def check_hang(self, eval_calls: list[tuple[Any, int]]) -> None:
        """A reward actor alive but answering nothing (a scorer that never returns, a stopped process) held the run
        until the learner's stall ended it. Busy (train batches or `eval_calls`, an evaluation's scoring) and silent
        for the run's hang timeout (generation.hang_timeout_s) and HANG_FACTOR times its longest call since it last
        answered (a call found done, handled or not: AnswerWatch), with a call still running, it is killed instead:
        Ray restarts it and what it was scoring is sent again, as after a crash (`on_died`; an evaluation resends
        itself). On the live clock: a freeze of this process is not the actor's silence."""
        jobs = self.state.reward_jobs.items()
        train = [(ref, sum(len(group.completions) for group in result.groups)) for ref, result in jobs]
        calls, now = [*train, *eval_calls], live_clock.now()
        news, pending = self.answers.look([ref for ref, _ in calls])
        if news or not calls:
            self.heard_at = now
            return
        silent_s = now - self.heard_at
        limit_s = self.hang_limit_s(max(samples for _, samples in calls))
        if silent_s <= limit_s or not pending or self.answers.kill_pending(now, self.restart_limit_s):
            return
        print(f"[async-rlhf] the reward actor has answered nothing for {silent_s:.0f}s with {len(calls)} call(s) in "
              f"flight (generation.hang_timeout_s={self.cfg.hang_timeout_s:g}, {HANG_FACTOR:g}x the longest call so "
              f"far, per training call's size: {limit_s:.0f}s in all): killing it so that Ray restarts it; what it was "
              f"scoring is sent again", file=sys.stderr, flush=True)
        self.heard_at = self.answers.killed_at = now  # its calls now fail as after a crash: said once
        ray.kill(self.parts.reward, no_restart=False)

    def hang_limit_s(self, samples: int = 0) -> float:
        """The hang timeout and 10x its longest call, times the size in training calls of its biggest call in
        flight (`prompts`: an evaluation's), and a remote reward model's own bound on a call (its deadline, then
        one last request's timeout): a slow server is the client's to time out, not a hang."""
        remote = self.cfg.reward.remote
        own = remote.deadline_s + remote.timeout_s if remote is not None else 0.0
        return max(max(self.cfg.hang_timeout_s, HANG_FACTOR * self.longest_call_s) * self.cfg.size_factor(samples), own)

    def queue_scored(self, result: GenerationResult, scored: list[RolloutGroup]) -> None:
        """Scored responses (then MC rollouts) of one generation: values and advantages first for VinePPO."""
        groups = scored[:len(result.groups)]
        if result.mc is not None:  # values and advantages before the groups can be trained on
            rollouts = replace(result.mc, rollouts=scored[len(result.groups):])
            self.stats.mc_cost.add_scored(attach_advantages(groups, rollouts))
        for group in groups:
            for completion in group.completions:
                self.stats.reward_counts[completion.reward_status] += 1
            self.queue.put(group)

    def on_died(self, exc: Exception) -> None:
        """Count a restart once per new process, and generate again every batch still being scored: a call
        sent around the death may never answer, and one that answers late would be too stale to train on.
        A re-issued batch's old call is forgotten, so a late answer is dropped, never queued twice. Past
        reward.max_restarts the health call raises, which ends the run."""
        waited, self.answers.killed_at = live_clock.now(), None
        found = ScoringMarks(self.parts.scratch_dir, "reward").left()  # read by the first call this death failed
        self.died_running = found or self.died_running  # for the run's last line, where Ray gives up on it
        restarted = self.restarted()
        self.state.last_progress += live_clock.now() - waited  # its restart is not the learner's stall (own bound)
        if not restarted:
            return
        print(f"[async-rlhf] the reward actor died ({type(exc).__name__}){while_scoring(found)}; Ray "
              f"restarted it (pid {self.pid}, restart "
              f"{self.stats.reward_restarts}); the batches it was scoring are generated again",
              file=sys.stderr, flush=True)
        for ref in list(self.state.reward_jobs):
            self.started.pop(ref, None)
            self.regenerate(self.state.reward_jobs.pop(ref))

    def is_its_death(self, exc: Exception) -> bool:
        """Whether a RayActorError is the reward actor's: Ray names the dead actor (one it does not name is taken
        as the reward actor's, which costs only a regeneration)."""
        dead = getattr(exc, "actor_id", None)
        return dead is None or dead == self.parts.reward._actor_id.hex()

    def restarted(self, limit_s: float | None = None) -> bool:
        """True, and one restart counted, when the reward actor answers from a new process (within `limit_s`, by
        default its restart's limit)."""
        return self._counted(self._pid(self.restart_limit_s if limit_s is None else limit_s))

    def restarted_by_end(self) -> None:
        """`restarted` at the run's end, within the hang and restart limits (one killed just before may be
        restarting): the run is done and only the count is at stake, so a stopped, hung or dead actor is not fatal."""
        limit = max(self.hang_limit_s(), self.restart_limit_s)
        self._counted(pids_at_end({"the reward actor": self.parts.reward}, "health", limit)["the reward actor"])

    def _counted(self, pid: int | None) -> bool:
        if pid is None or pid == self.pid:
            return False
        self.pid, self.stats.reward_restarts = pid, self.stats.reward_restarts + 1
        return True

    def _pid(self, limit: float) -> int:
        """The reward actor's pid, once it answers: a call sent while Ray restarts it fails at once
        (ActorUnavailableError) and is sent again, for up to `limit` (its restart's: startup.restart_limit_s); one
        still silent then is killed once, and its next start gets `limit` again (`killed_past_bound`)."""
        deadline = live_clock.Deadline(limit)
        while True:
            if deadline.passed():
                if not self.killed_past_bound(limit):
                    break
                deadline.renew()
            try:
                return ray.get(self.parts.reward.health.remote(), timeout=max(deadline.left(), 0.1))["pid"]
            except ray.exceptions.ActorUnavailableError:  # restarting, unless Ray itself is gone
                require_gcs()
                time.sleep(0.2)
            except ray.exceptions.ActorDiedError as exc:  # restarts exhausted, or its node is gone
                if node_crashed(exc):
                    raise
                if self._restarting():  # the call met the process just killed (killed_past_bound)
                    time.sleep(0.2)
                    continue
                raise RunError(f"the reward actor died{while_scoring(self.died_running)} and Ray will not restart it "
                               f"again (reward.max_restarts={self.cfg.reward.max_restarts}); why it died is in its "
                               f"log under {ray_logs()}") from exc
            except ray.exceptions.GetTimeoutError:
                continue
        raise RunError(f"the reward actor did not answer within {limit:g}s of its restart ({RESTART_BOUND}); why is "
                       f"in its log under {ray_logs()}")

    def _restarting(self) -> bool:
        """Ray's table has the reward actor starting again (or alive), not dead for good."""
        found = actor_table.current(self.parts.reward)
        return found is not None and found.state != "DEAD"

    def killed_past_bound(self, limit: float) -> bool:
        """A restart silent past its bound in a process Ray's table names (a start stopped or hung in its
        `__init__`, or alive and not answering), not killed before, with a restart left: killed, so that Ray starts
        it again (as a silent start is at start-up, startup.StartSilence). Before, the run ended there."""
        found = actor_table.kill_stuck_restart(self.parts.reward, self.killed_pid, self.cfg.reward.max_restarts,
                                               f"the reward actor has not answered {limit:.0f}s")
        if found is None:
            return False
        self.killed_pid = found.pid
        self.stats.reward_restarts += found.pid != self.pid  # its start was a restart, never counted: it never answered
        return True

    def regenerate(self, result: GenerationResult) -> None:
        """The batch's prompts go out again, unchanged (still counted in `outstanding`), as for a dead
        generator: sampled anew with current weights, each prompt is still trained exactly once."""
        self.state.reissue.append(([g.prompt for g in result.groups], result.policy_version))

    def forget_in_flight(self) -> None:
        """A rollback: the calls in flight belong to the future being rolled back; a late answer is dropped."""
        self.state.reward_jobs.clear()
        self.started.clear()

    def source(self) -> str:
        reward = self.cfg.reward
        if reward.remote is not None:
            return f"remote reward model {redact_url(reward.remote.url)}"
        return f"learned reward model {reward.learned.path}" if reward.learned else reward.train_description
