"""EvalSchedule: when the gold evaluation runs (version 0, every eval.every steps, the end) and on what.

Evaluations run on generator 0, beside training: version 0's and the periodic one of version v each lease
their version and go on without waiting. Their prompts are sampled in chunks (`eval.chunk_prompts`), fed to
generator 0 in its idle time (`feed`, each loop iteration after the training batches were dispatched), each
chunk with the evaluated weights. A training batch issued while a chunk samples waits behind that one chunk
only. A generator that is never idle (a generation-bound run) gets the rest of the evaluation as one call
after 2 x `chunks_in_flight` training batches went past it. Later stages are sent as the earlier ones answer
(`eval_flight.EvalInFlight`, advanced by the controller's `ray.wait`). Records are logged in version
order. The loop waits for them only before a checkpoint (which counts the eval.jsonl lines it holds), at
a learner failover (which drops them: they belong to the rolled-back steps) and at the end. A generator
or reward actor that dies meanwhile is waited for and the evaluation made once more. With pushed weights
(nccl, ipc) a generator holds only the newest version, so there the evaluation waits as before.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.eval_flight import EvalInFlight
from async_rlhf.pipeline.evaluation import failed_rewards
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import Components
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.waits import wait_all
from async_rlhf.weights.broker import WeightRef, WeightSyncBroker


class EvalSchedule:
    def __init__(self, cfg: RunConfig, parts: Components, pool: GeneratorPool, rewards: RewardBook,
                 broker: WeightSyncBroker, timing: Timing, recorder: RunRecorder, timeline: Timeline) -> None:
        self.cfg = cfg
        self.parts = parts
        self.pool = pool
        self.rewards = rewards
        self.broker = broker
        self.timing = timing
        self.recorder = recorder
        self.timeline = timeline
        self.pending: deque[EvalInFlight] = deque()  # oldest first: records are logged in this order
        self.said_failed_gold = False
        self.blocked_s = 0.0  # this process's loop time spent on evaluations (the zero of `wall_s` is its too)
        recorder.keeper.remakes.append(self._write_initial_scores)

    def _write_initial_scores(self) -> None:
        """The run directory made again: the starting policy's scores, which a resumed run compares with."""
        if self.parts.evaluator is not None:
            self.parts.evaluator.write_initial()

    # ---- starting evaluations -------------------------------------------------------------
    def start_initial(self) -> None:
        """Version 0's evaluation on generator 0, sent behind the first batches. On shm it leases the published
        starting weights (ComponentBuilder.build) and runs beside the first steps, like a periodic one. Pushed
        weights (nccl, ipc) leave a generator only the newest version: there it is finished before any step."""
        if self.cfg.weight_sync.transport not in PUSHED_TRANSPORTS:
            self.start(0)
            return
        self._send(None)
        self.drain()

    def after_step(self, version: int) -> None:
        every = self.cfg.eval.every
        if not every or version % every:  # the last step's too: a checkpoint there saves it as due (see final)
            return
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # the generator must still hold `version`
            self.pool.finish(self.pool.slots[0])
            self.start(version)
            self.drain()
            return
        self.start(version)

    def final(self) -> dict:
        """The newest weights' evaluation (the starting weights' when stopped before the first step), logged
        after every pending one. The loop is over, so every chunk left goes to generator 0 now, oldest
        evaluation first: the final one samples while the learner runs the pending ones' KL passes."""
        latest = self.broker.latest()
        if latest is None or not self._made(latest.version):  # a periodic one of the newest weights is the final
            self._send(self.broker.lease(latest.version) if latest else None)
        for flight in self.pending:
            with self._blocking(flight):
                self._feed(flight, rest=True)
        self.drain()
        return self.recorder.evals[-1]

    def _made(self, version: int) -> bool:
        """`version`'s evaluation is pending or logged last. The periodic evaluation of the last step was left to the
        final one, so a checkpoint there did not hold it as due: resumed with more steps, a run never evaluated
        that version."""
        logged = self.recorder.evals and self.recorder.evals[-1].get("version") == version
        return bool(logged) or any(flight.version == version for flight in self.pending)

    def start(self, version: int) -> None:
        """Evaluate published `version` beside training (also a checkpoint's evaluation left pending, when the
        run goes back to that checkpoint: `due`)."""
        self._send(self.broker.lease(version))

    def _send(self, weights: WeightRef | None) -> None:
        """Queue the evaluation; `feed` sends its chunks and the loop's `ray.wait` advances it."""
        evaluator, slot = self.parts.require_evaluator(), self.pool.slots[0]
        flight = EvalInFlight(evaluator, self.parts, weights, slot.handle, evaluator.chunks(self.chunk_prompts),
                              self.recorder.episodes)
        flight.mark = slot.batches_sent
        flight.blocked_before_s = self.blocked_s
        self.pending.append(flight)

    @property
    def chunk_prompts(self) -> int:
        """Eval prompts per generate call: as many samples as a training batch of generator 0 (default)."""
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:
            return 0  # drained at once: one call
        return self.cfg.eval.chunk_prompts or self.pool.chunk * self.cfg.generation.samples_per_prompt

    def feed(self) -> None:
        """Generator 0's turn for the oldest evaluation still sampling: its next chunk when the generator is
        idle, or all its chunks left as one call once it has waited past 2 x chunks_in_flight training
        batches (a generator that never idles). One chunk at a time: a batch waits behind one at most."""
        flight = next((f for f in self.pending if f.stage == "sample"), None)
        slot = self.pool.slots[0] if self.pool.slots else None
        if flight is None or slot is None or not flight.wants_generator or not self.pool.usable(slot):
            return
        starved = slot.batches_sent - flight.mark >= 2 * self.pool.depth
        if slot.chunks and not starved:
            return
        with self._blocking(flight):
            self._feed(flight, rest=starved)
        flight.mark = slot.batches_sent

    # ---- the loop's events --------------------------------------------------------------
    def refs(self) -> dict[Any, EvalInFlight]:
        """The calls of every pending evaluation's current stage, for the loop's `ray.wait`."""
        return {ref: flight for flight in self.pending for ref in flight.waiting}

    def _calls(self, stage: str) -> list[tuple[Any, int]]:
        """The pending evaluations' calls in `stage`, generator 0's ("sample") or the reward actor's ("score"),
        with their samples (the hang checks allow for their size)."""
        return [(ref, flight.sizes.get(ref, 0)) for flight in self.pending if flight.stage == stage
                for ref in flight.waiting]

    def on_ready(self, flight: EvalInFlight) -> None:
        with self._blocking(flight):
            self._advance(flight, flight.advance)
        self._log_finished()

    def drain(self, before: int | None = None) -> None:
        """Finish the pending evaluations (of versions below `before`, if given), waiting: before the final
        evaluation and the summary, and before a checkpoint those that it could not redo (`due`)."""
        for flight in list(self.pending):
            if before is not None and flight.version >= before:
                break  # versions only grow along the deque
            with self._blocking(flight):
                self._wait_for(flight)
        self._log_finished()

    def sampling(self) -> bool:
        """Generator 0 holds an evaluation's sample call."""
        return bool(self._calls("sample"))

    def _wait_for(self, flight: EvalInFlight) -> None:
        while not flight.done:
            self._feed(flight, rest=True)
            self._advance(flight, lambda: flight.wait(self._stage_limit_s(flight.stage),
                                                      self.cfg.learner.stall_timeout_s, self.check_hangs))

    def _stage_limit_s(self, stage: str) -> float:
        """A stage awaited may take learner.stall_timeout_s per training call's worth of the evaluation's samples
        (one per prompt; RunConfig.size_factor): the hang checks meanwhile stop a hung generator or reward actor
        sooner. The KL stage is the learner's: the stall timeout per learner step's worth of samples
        (RunConfig.step_factor), past which the learner is taken for hung (a 30 s stall timeout waited 240 s for
        a quickstart's)."""
        stall, samples = self.cfg.learner.stall_timeout_s, self.cfg.task.eval_prompts
        return stall * (self.cfg.step_factor(samples) if stage == "kl" else self.cfg.size_factor(samples))

    def _feed(self, flight: EvalInFlight, rest: bool) -> None:
        """`flight.feed`; generator 0's silence runs from here if it had nothing to do (its hang check)."""
        slot = self.pool.slots[0]
        if flight.unsent and not slot.chunks and not self.sampling():
            slot.answered_at = live_clock.now()
        flight.feed(rest)

    def check_hangs(self) -> None:
        """Kill a generator or the reward actor that hangs, counting the evaluations' calls as theirs (the loop's
        check, and a blocking wait's here: a hung actor would hold it to its end)."""
        self.pool.hangs.check(self._calls("sample"))
        self.rewards.check_hang(self._calls("score"))

    def due(self) -> list[int]:
        """Versions of the evaluations still pending, which a checkpoint of the newest version saves instead of
        waiting for them (`drain(before=newest)` finished the older ones): its weights are the ones a resume
        or rollback publishes again, so they are evaluated then, and eval.jsonl logs each once."""
        return [flight.version for flight in self.pending]

    def abandon(self) -> None:
        """Learner failover: every pending evaluation is of a version the rollback forgets (a checkpoint
        finishes older ones and saves its own as due, which the restore sends again). Their calls are let end
        first: the sample reads leased weights, which the rollback reuses, and no lease may be held through
        it. Then they are dropped, unlogged."""
        wait_all(list(self.refs()), self.cfg.learner.stall_timeout_s, self.check_hangs)
        while self.pending:
            self._release(self.pending.popleft())

    # ---- inside -------------------------------------------------------------------------
    def _advance(self, flight: EvalInFlight, step: Callable[[], None]) -> None:
        """Run `step`; if generator 0 or the reward actor died meanwhile, wait for the one that died (both where
        Ray names neither) and start the evaluation once more, once per restart either may take. The learner's
        death is the loop's (failover). Before, only generator 0 was awaited, whichever had died: a reward actor
        killed as hung while generator 0 was stopped held the run in that wait for good; and a second death in
        one evaluation ended the run."""
        try:
            step()
        except ACTOR_LOST as exc:
            restarts = self.cfg.generation.max_restarts + self.cfg.reward.max_restarts
            if flight.stage == "kl" or flight.attempts > restarts:
                raise
            slot = self.pool.slots[0]
            if getattr(exc, "actor_id", None) in (None, slot.handle._actor_id.hex()):
                self.pool.await_restart(slot)
            if self.rewards.is_its_death(exc):  # generator 0's death leaves the reward calls in flight alone
                self.rewards.on_died(exc)
            flight.resend()

    def _log_finished(self) -> None:
        while self.pending and self.pending[0].done:
            flight = self.pending.popleft()
            record = {**flight.record(), "eval_blocking_s": round(flight.blocked_s, 3),
                      "eval_blocking_before_s": round(flight.blocked_before_s, 3)}
            self.recorder.log_eval(record)
            self._say_failed_gold(flight)
            self.timing.add("eval_s", record["eval_s"])
            self.timing.add("eval_gen_s", record["eval_gen_s"])
            for result in flight.results:  # generator 0's time in each chunk
                self.timeline.add("eval", f"generator{result.generator_id}", result.started_at,
                                  result.started_at + result.sync_s + result.gen_s, flight.version)
            self._release(flight)

    def _say_failed_gold(self, flight: EvalInFlight) -> None:
        """The first evaluation whose gold rewards failed says how many and why, once per run: its gold_reward
        leaves them out, or is null where none is left."""
        failed, total, reason = failed_rewards(flight.scored[0])
        if failed and not self.said_failed_gold:
            self.said_failed_gold = True
            print(f"[async-rlhf] warning: evaluation of version {flight.version}: {failed} of {total} gold rewards "
                  f"failed (reward.gold '{self.cfg.reward.gold}'), the first because: {reason}; gold_reward leaves "
                  "them out (eval.jsonl: gold_failed)", file=sys.stderr, flush=True)

    def _release(self, flight: EvalInFlight) -> None:
        if flight.weights is not None:
            self.broker.release(flight.weights.version)

    @contextmanager
    def _blocking(self, flight: EvalInFlight) -> Iterator[None]:
        """The loop's time spent on `flight` (summary.json `eval_blocking_s`, and the record's)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._charge(flight, time.perf_counter() - start)

    def _charge(self, flight: EvalInFlight, seconds: float) -> None:
        flight.blocked_s += seconds
        self.blocked_s += seconds
        self.timing.add("eval_blocking_s", seconds)
        if self.timing.is_open("loop_s"):  # the part of it inside the training loop (bench: the loop's net time)
            self.timing.add("eval_blocking_loop_s", seconds)
