"""LearnerSteps: the learner's side of the loop, from a batch taken off the queue to its weights published.

A step is dispatched as two calls on the learner actor (train, then save the new weights where the broker
stages them); the loop waits on the save. Its record goes to metrics.jsonl before any check that may stop
the run, so a skipped or unrewarded step stays on record.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import ray

from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.timeline import Timeline, record_learner_step
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.gap_watch import GapWatch
from async_rlhf.pipeline.queue import GateInputs, RolloutQueue, take_limit
from async_rlhf.pipeline.state import Components, LearnerJob, LoopState, RunStats
from async_rlhf.pipeline.summary import step_record
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.view import RunView
from async_rlhf.weights.broker import WeightSyncBroker


class LearnerSteps:
    def __init__(self, cfg: RunConfig, parts: Components, state: LoopState, stats: RunStats, queue: RolloutQueue,
                 broker: WeightSyncBroker, timing: Timing, timeline: Timeline, recorder: RunRecorder,
                 view: RunView) -> None:
        self.cfg = cfg
        self.parts = parts
        self.state = state
        self.stats = stats
        self.queue = queue
        self.broker = broker
        self.timing = timing
        self.timeline = timeline
        self.recorder = recorder
        self.view = view
        self.gap_watch = GapWatch(cfg)

    def dispatch(self, gate_inputs: Callable[[], GateInputs]) -> None:
        """The next batch to the learner, if it is idle and the queue holds one it may train on."""
        st = self.state
        if st.learner_job is not None or st.steps_taken >= self.cfg.learner.steps:
            return
        dropped_before = self.queue.counters.dropped_stale
        batch = self.queue.take(self.cfg.generation.prompts_per_step, st.steps_taken, take_limit(gate_inputs()))
        st.outstanding -= self.queue.counters.dropped_stale - dropped_before  # none after the loop's drop_stale
        if batch is None:
            return
        st.outstanding -= len(batch)
        st.steps_taken += 1
        self.timing.add("learner_wait_s", time.perf_counter() - st.learner_idle_since)
        version = self.broker.latest_version + 1
        learner = self.parts.learner
        train_ref = learner.train_step.remote(batch)
        save_ref = learner.save_weights.remote(self.broker.staging_location(version))
        st.learner_job = LearnerJob(train_ref, save_ref, batch, version, live_clock.now())

    def finish(self) -> tuple[LearnerJob, dict, dict]:
        """The step in flight is done: its weights published, its times counted; (job, metrics, record)."""
        job, st = self.state.learner_job, self.state
        if job is None:
            raise RuntimeError("finish() called with no learner step in flight")
        metrics: dict = ray.get(job.train_ref)
        ray.get(job.save_ref)
        elapsed = live_clock.now() - job.dispatched_at
        queued = self._queued_s(metrics.pop("started_at"), elapsed)
        self.broker.publish(job.version)
        st.learner_job = None
        st.learner_idle_since = time.perf_counter()
        st.last_progress = live_clock.now()
        self.timing.add("learn_busy_s", metrics["step_s"])
        self.timing.add("learn_wide_s", metrics.get("wide_s", 0.0))
        self.timing.add("learner_queued_s", queued)
        self.timing.add("publish_s", max(0.0, elapsed - queued - metrics["step_s"]))
        record_learner_step(self.timeline, time.time() - elapsed + queued, metrics["step_s"], job.version)
        return job, metrics, self._record(job, metrics)

    @staticmethod
    def _queued_s(started_at: float, elapsed: float) -> float:
        """Seconds from the step's dispatch to its start on the learner: calls sent to the learner before it
        (an evaluation's KL pass) ran first. Clipped to [0, elapsed] (wall clocks of two processes)."""
        dispatched_at = time.time() - elapsed
        return min(max(0.0, started_at - dispatched_at), elapsed)

    def _record(self, job: LearnerJob, metrics: dict) -> dict:
        record = step_record(self.view, job.batch, job.version, metrics)
        self.stats.last_step = record
        self.stats.gap_tally.add(metrics)
        if (note := self.gap_watch.check(metrics)) is not None:
            print(f"[async-rlhf] {note}", file=sys.stderr, flush=True)
        self.recorder.log_step(record)
        return record
