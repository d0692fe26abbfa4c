"""A generator that is alive but answers nothing: a wedged engine, a stopped process, a collective that never
completes. Ray restarts a generator that dies, but not one that hangs, so the run waited for
`learner.stall_timeout_s` and then ended. A busy generator silent for longer than `generation.hang_timeout_s`
(default: half of the stall timeout, `RunConfig.hang_timeout_s`), and than `HANG_FACTOR` times the longest
a generate call has worked (its own timings: the driver may look late), with none of its calls done, is killed
instead: Ray restarts it and its prompts go out again, exactly as after a crash (pipeline/generators.py), within
`generation.max_restarts`.
"""
from __future__ import annotations

import sys
from typing import Any, Protocol, Sequence

import ray

from async_rlhf.cluster import actor_table
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, ray_logs
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.startup import RESTART_BOUND
from async_rlhf.pipeline.state import GeneratorSlot
from async_rlhf.pipeline.waits import AnswerWatch

HANG_FACTOR = 10.0  # an evaluation queued ahead of a chunk, or a bigger batch, takes a few times a chunk, not 10


class Generators(Protocol):
    """What the check reads of the pool (pipeline/generators.py GeneratorPool, which owns the check)."""

    slots: list[GeneratorSlot]
    cfg: RunConfig
    longest_call_s: float  # the longest a generate call has worked, by its own timings
    longest_sampling_s: float  # the same without VinePPO's MC rollouts, which an evaluation's calls have none of


class GeneratorHangs:
    def __init__(self, pool: Generators, timeout_s: float, restart_limit_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.restart_limit_s = restart_limit_s  # the stall clock waits on a restart; set from the generators'
        # first start once they answered (startup.restart_limit_s)
        self.recovering_since: dict[int, float] = {}  # by generator id
        self.answers: dict[int, AnswerWatch] = {}  # by generator id: its calls found done so far
        self.killed_pids: dict[int, int] = {}  # by generator id: the process killed for not answering its probe

    def limit_s(self, samples: int = 0, rollouts: bool = True) -> float:
        """The silence past which a generator with a call of `samples` samples in flight is hung: the timeout
        and HANG_FACTOR times the longest call so far, times the call's size in training calls (an evaluation's
        remaining chunks sent as one call are many training calls long). An evaluation's call (`rollouts`
        False) is measured by the training calls' sampling alone: VinePPO's MC rollouts made them many times
        longer, and a generator hung in an evaluation was given that many times the limit (~64 s under a 5 s
        hang timeout)."""
        longest = self.pool.longest_call_s if rollouts else self.pool.longest_sampling_s
        return max(self.timeout_s, HANG_FACTOR * longest) * self.pool.cfg.size_factor(samples)

    def check(self, eval_calls: Sequence[tuple[Any, int]] = ()) -> None:
        """Kill every busy generator silent past the limit (on the live clock: a freeze of this process is no
        generator's silence). `eval_calls`: generator 0's evaluation calls and their samples (at the final
        evaluation they are all it has)."""
        now, per_prompt = live_clock.now(), self.pool.cfg.generation.samples_per_prompt
        for slot in self.pool.slots:
            trains = [(chunk.ref, len(chunk.prompts) * per_prompt) for chunk in slot.chunks]
            evals = list(eval_calls if slot is self.pool.slots[0] else ())
            calls = trains + evals
            # a call done since the last look is an answer, though unhandled (the driver was busy); idle: silent
            # from its next call on
            news, pending = self.watch(slot).look([r for r, _ in calls])
            if news or not calls:
                slot.answered_at = now
            limit = max([self.limit_s(n) for _, n in trains] + [self.limit_s(n, rollouts=False) for _, n in evals],
                        default=self.limit_s())
            self._check_restart(slot, now, limit, bool(calls))
            if pending and self._judged(slot, now) and now - slot.answered_at > limit:
                self._restart(slot, f"with {len(calls)} call(s) in flight", now - slot.answered_at, limit)

    def watch(self, slot: GeneratorSlot) -> AnswerWatch:
        return self.answers.setdefault(slot.generator_id, AnswerWatch())

    def _judged(self, slot: GeneratorSlot, now: float) -> bool:
        """Neither restarting (its death seen: a kill was taken) nor killed a moment ago."""
        if slot.recovering:
            self.watch(slot).killed_at = None
        return not slot.recovering and not self.watch(slot).kill_pending(now, self.restart_limit_s)

    def _check_restart(self, slot: GeneratorSlot, now: float, limit: float, busy: bool) -> None:
        """A generator restarting holds the learner's stall clock (pipeline/watchdogs.py), so its restart has a
        bound of its own (startup.restart_limit_s). One whose probe goes unanswered past the hang limit while Ray
        has it alive is hung, not restarting, and is killed: after a learner's failover every generator is probed,
        and one stopped then was waited on as if it were restarting until the bound ended the run."""
        if not slot.recovering:
            self.recovering_since.pop(slot.generator_id, None)
            return
        since = self.recovering_since.setdefault(slot.generator_id, now)
        silent_s = now - (max(slot.probe_at, slot.answered_at) if busy else slot.probe_at)
        past_bound = now - since > self.restart_limit_s
        if slot.probe is not None and self.killed_for_its_probe(slot, silent_s, limit) or \
                past_bound and self.killed_past_bound(slot):
            self.recovering_since[slot.generator_id] = now  # its restart has the whole bound
        elif past_bound:
            raise self.not_back(slot)

    @staticmethod
    def send_probe(slot: GeneratorSlot) -> None:
        """An info() call to the generator, and the process Ray had it alive in just before: the one the call goes
        to (a call sent while it restarts fails at once), whose silence the call judges (killed_for_its_probe)."""
        slot.probe_pid = actor_table.alive_pid(slot.handle)
        slot.probe, slot.probe_at = slot.handle.info.remote(), live_clock.now()

    def killed_for_its_probe(self, slot: GeneratorSlot, silent_s: float, limit: float) -> bool:
        """Kill a generator silent to its probe past `limit` while Ray still has it alive in the process the probe
        went to, not killed before (one killed is asked to exit first: seconds)."""
        pid = actor_table.alive_pid(slot.handle) if silent_s > limit else 0
        if not pid or pid != slot.probe_pid or pid == self.killed_pids.get(slot.generator_id):
            return False
        self.killed_pids[slot.generator_id] = pid
        self._restart(slot, "to its probe though Ray has it alive (stopped or hung)", silent_s, limit)
        return True

    def within_restart(self, slot: GeneratorSlot, deadline: live_clock.Deadline) -> bool:
        """True while `deadline` (the restart's bound) has not passed, and once it has if `killed_past_bound` (then
        the deadline starts again)."""
        if not deadline.passed():
            return True
        if self.killed_past_bound(slot):
            deadline.renew()
            return True
        return False

    def killed_past_bound(self, slot: GeneratorSlot) -> bool:
        """A restart not back within its bound while Ray's table has it in a process (a start stopped or hung in
        vLLM's engine build), not killed before, with a restart left: killed, so that Ray starts it again (as a
        silent start is at start-up, startup.StartSilence). Before, the run ended there."""
        found = actor_table.kill_stuck_restart(
            slot.handle, self.killed_pids.get(slot.generator_id, 0), self.pool.cfg.generation.max_restarts,
            f"generator {slot.generator_id} is not back {self.restart_limit_s:.0f}s")
        if found is None:
            return False
        self.killed_pids[slot.generator_id] = found.pid
        slot.restarts += found.pid != slot.pid  # its start was a restart, never counted: it never answered
        slot.probe = None  # the next goes to its next process
        return True

    def not_back(self, slot: GeneratorSlot) -> RunError:
        return RunError(f"generator {slot.generator_id} did not come back within {self.restart_limit_s:g}s of its "
                        f"death ({RESTART_BOUND}); why is in its log under {ray_logs()}")

    def _restart(self, slot: GeneratorSlot, how: str, silent_s: float, limit_s: float) -> None:
        print(f"[async-rlhf] generator {slot.generator_id} has answered nothing for {silent_s:.0f}s {how} "
              f"(generation.hang_timeout_s={self.timeout_s:g}, {HANG_FACTOR:g}x the longest call so far, per training "
              f"call's size: {limit_s:.0f}s in all): killing it so that Ray restarts it; its prompts will be "
              f"re-issued", file=sys.stderr, flush=True)
        slot.answered_at = self.watch(slot).killed_at = live_clock.now()  # its chunks fail as after a crash: said once
        ray.kill(slot.handle, no_restart=False)
