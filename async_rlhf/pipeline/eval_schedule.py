"""EvalSchedule: when the gold evaluation runs (version 0, every eval.every steps, the end) and on what.

Evaluations run on generator 0 between its batches; a generator or reward actor that dies meanwhile is
waited for and the evaluation made once more.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import Components
from async_rlhf.pipeline.timing import Timing
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

    def start_initial(self) -> Any:
        """Version 0's evaluation, sent first to generator 0 (the first batches go out behind it)."""
        return self.parts.require_evaluator().sample(self.pool.slots[0].handle, None)

    def finish_initial(self, sampled: Any) -> None:
        self.recorder.log_eval(self.evaluate(None, sampled))  # no step sent yet: its KL is version 0's

    def after_step(self, version: int) -> None:
        every = self.cfg.eval.every
        if not every or version % every or version >= self.cfg.learner.steps:
            return
        slot = self.pool.slots[0]
        self.pool.finish(slot)  # weights swap only between batches
        started = time.time()
        with self.timing.span("eval_s"):
            self.recorder.log_eval(self.evaluate(self.broker.lease(version)))
        self.timeline.add("eval", f"generator{slot.generator_id}", started, time.time(), version)
        self.broker.release(version)

    def final(self) -> dict:
        """The newest weights' evaluation (the starting weights' when stopped before the first step), logged."""
        latest = self.broker.latest()
        final_ref = self.broker.lease(latest.version) if latest else None
        with self.timing.span("eval_s"):
            final = self.evaluate(final_ref)
        if final_ref:
            self.broker.release(final_ref.version)
        self.recorder.log_eval(final)
        return final

    def evaluate(self, weights: WeightRef | None, sampled: Any = None) -> dict:
        """Gold evaluation on generator 0 (`sampled`: its generate call, if already sent); if it or the reward
        actor died meanwhile, once more after the restart."""
        slot, evaluator = self.pool.slots[0], self.parts.require_evaluator()
        try:
            sampled = evaluator.sample(slot.handle, weights) if sampled is None else sampled
            return evaluator.finish(sampled, self.parts.learner)
        except ray.exceptions.RayActorError as exc:  # the generator or the reward actor: wait for both
            self.pool.await_restart(slot)
            self.rewards.on_died(exc)
            return evaluator.evaluate(slot.handle, weights, self.parts.learner)
