"""EvalInFlight: one evaluation running beside training, a stage at a time, without waiting.

Its stages are the Evaluator's: the sample (generator 0's generate call, queued behind that generator's
batch), the reward calls (gold, proxy, references), then the KL call (learner). The controller puts the
stage's calls in its `ray.wait` set; when one answers it calls `advance`, which sends the next stage once
every call of this one has answered. Nothing here blocks but `wait`, used where the run must have the
record (checkpoints, the initial and final evaluations).
"""
from __future__ import annotations

import time
from typing import Any, Literal

import ray

from actors.generator import GenerationResult
from async_rlhf.failures import RunError
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.state import Components
from async_rlhf.rollout import RolloutGroup
from async_rlhf.weights.broker import WeightRef

Stage = Literal["sample", "score", "kl", "done"]


class EvalInFlight:
    def __init__(self, evaluator: Evaluator, parts: Components, weights: WeightRef | None,
                 sampled: tuple[Any, float], episodes: int = 0) -> None:
        self.evaluator = evaluator
        self.parts = parts  # the learner is read when the KL call is sent: a failover may have replaced it
        self.weights = weights  # leased for the evaluation's whole life (released by whoever leased it)
        self.sampled, self.started = sampled
        self.episodes = episodes  # samples trained when it started (the evaluated weights' training)
        self.stage: Stage = "sample"
        self.refs: list[Any] = [self.sampled]  # the calls of the current stage
        self.waiting: list[Any] = [self.sampled]  # those of them not answered yet (the loop's wait set)
        self.result: GenerationResult | None = None
        self.scored: list[list[RolloutGroup]] = []
        self.kl: float | None = None  # the last stage's answer
        self.ended = 0.0  # when the last stage answered (time.time()): the record's end
        self.blocked_s = 0.0  # the loop's time spent on this evaluation (sending, waiting, a retry)
        self.attempts = 1

    @property
    def version(self) -> int:
        return self.weights.version if self.weights is not None else 0

    def resend(self, generator: Any) -> None:
        """After an actor died: the whole evaluation once more, from the sample."""
        self.sampled, self.started = self.evaluator.sample(generator, self.weights)
        self._send("sample", [self.sampled])
        self.attempts += 1

    def _send(self, stage: Stage, refs: list[Any]) -> None:
        self.stage, self.refs, self.waiting = stage, refs, list(refs)

    def advance(self) -> None:
        """The next stage once every call of this one has answered; a failed call raises its error here
        (`stage` then says whose: the generator's, the reward actor's or the learner's)."""
        if self.waiting:  # an answered call leaves the wait set, else the loop's ray.wait would spin on it
            _, self.waiting = ray.wait(self.waiting, num_returns=len(self.waiting), timeout=0)
        if self.waiting or self.done:
            return
        if self.stage == "sample":
            self._score(ray.get(self.sampled))
        elif self.stage == "score":
            self._kl(ray.get(self.refs))
        else:
            self._finish(ray.get(self.refs[0]))

    def _score(self, result: GenerationResult) -> None:
        self.result = result
        self._send("score", self.evaluator.score(result))

    def _kl(self, scored: list[list[RolloutGroup]]) -> None:
        self.scored = scored
        self._send("kl", [self.evaluator.kl(self.parts.learner, scored[1])])

    def _finish(self, kl: float) -> None:
        self.kl = kl
        self._send("done", [])
        self.ended = time.time()

    @property
    def done(self) -> bool:
        return self.stage == "done"

    def record(self) -> dict:
        """eval.jsonl's record. EvalSchedule makes them oldest first, whatever order the evaluations finished
        in (a retried one can finish after a later one): a record's paired win-rate reads version 0's gold
        per prompt, which version 0's own record keeps."""
        assert self.result is not None and self.kl is not None  # set by the sample and kl stages
        return {**self.evaluator.record(self.result, self.scored, self.kl, self.started, self.ended),
                "episodes": self.episodes}

    def wait(self, timeout_s: float) -> None:
        """Block until this stage has answered and advance (`advance` raises a failed call's error)."""
        running = self.waiting and ray.wait(self.waiting, num_returns=len(self.waiting), timeout=timeout_s)[1]
        if running:
            raise RunError(f"the evaluation of version {self.version} did not finish its {self.stage} stage "
                           f"within learner.stall_timeout_s={timeout_s:g}s")
        self.advance()
