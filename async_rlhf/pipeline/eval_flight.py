"""EvalInFlight: one evaluation running beside training, a stage at a time, without waiting.

Its stages are the Evaluator's: the sample (generator 0's generate calls, one per chunk of the eval
prompts), the reward calls (gold, proxy, references), then the KL call (learner). The chunks are sent one
at a time when EvalSchedule finds generator 0 with room (`feed`), so a training batch waits behind at
most one chunk, not behind the whole evaluation. The controller puts the stage's calls in its `ray.wait`
set; when one answers it calls `advance`, which sends the next stage once every chunk or call of this one
has answered. Nothing here blocks but `wait`, used where the run must have the record (checkpoints, the
initial and final evaluations): it sends every chunk not yet sent first.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Literal

import ray

from actors.generation_result import GenerationResult
from async_rlhf.failures import RunError
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.learner_calls import learner_hung
from async_rlhf.pipeline.state import Components
from async_rlhf.pipeline.waits import wait_all
from async_rlhf.rollout import Prompt, RolloutGroup
from async_rlhf.weights.broker import WeightRef

Stage = Literal["sample", "score", "kl", "done"]


def merged(results: list[GenerationResult]) -> GenerationResult:
    """The chunks' results as one call's: groups in prompt order, times and tokens summed."""
    first = results[0]
    return GenerationResult([g for r in results for g in r.groups], first.generator_id, first.policy_version,
                            sum(r.gen_s for r in results), sum(r.sync_s for r in results), first.started_at,
                            sum(r.tokens for r in results))


class EvalInFlight:
    def __init__(self, evaluator: Evaluator, parts: Components, weights: WeightRef | None, generator: Any,
                 chunks: list[list[Prompt]], episodes: int = 0) -> None:
        self.evaluator = evaluator
        self.parts = parts  # the learner is read when the KL call is sent: a failover may have replaced it
        self.weights = weights  # leased for the evaluation's whole life (released by whoever leased it)
        self.generator = generator  # generator 0: Ray restarts it under the same handle
        self.chunks = chunks
        self.unsent: deque[list[Prompt]] = deque(chunks)
        self.started = time.time()  # asked for now: the evaluated weights exist from here
        self.episodes = episodes  # samples trained when it started (the evaluated weights' training)
        self.stage: Stage = "sample"
        self.refs: list[Any] = []  # the calls of the current stage (the sample: every chunk sent so far)
        self.waiting: list[Any] = []  # those of them not answered yet (the loop's wait set)
        self.sizes: dict[Any, int] = {}  # each call's samples, one per prompt (what a hang check allows the call)
        self.results: list[GenerationResult] = []  # each chunk's, in prompt order
        self.result: GenerationResult | None = None
        self.scored: list[list[RolloutGroup]] = []
        self.kl: float | None = None  # the last stage's answer
        self.ended = 0.0  # when the last stage answered (time.time()): the record's end
        self.blocked_s = 0.0  # the loop's time spent on this evaluation (sending, waiting, a retry)
        self.blocked_before_s = 0.0  # the loop's time spent on every evaluation before this one was queued
        self.attempts = 1
        self.mark = 0  # generator 0's GeneratorSlot.batches_sent when this was queued or last sent a chunk

    @property
    def version(self) -> int:
        return self.weights.version if self.weights is not None else 0

    @property
    def wants_generator(self) -> bool:
        """A chunk is left to send and none is sampling (one at a time, so batches wait behind one at most)."""
        return self.stage == "sample" and bool(self.unsent) and not self.waiting

    def feed(self, rest: bool = False) -> None:
        """Send the next chunk to generator 0, or (`rest`) every chunk left as one call: where nothing else
        wants the generator, one call samples them in fewer engine steps."""
        if not self.unsent:
            return
        prompts = [p for chunk in self.unsent for p in chunk] if rest else self.unsent[0]
        if rest:
            self.unsent.clear()
        else:
            self.unsent.popleft()
        ref = self.evaluator.sample(self.generator, prompts, self.weights)
        self.sizes[ref] = len(prompts)
        self.refs.append(ref)
        self.waiting.append(ref)

    def resend(self) -> None:
        """After an actor died: the whole evaluation once more, from the first chunk."""
        self._send("sample", [])
        self.unsent, self.results = deque(self.chunks), []
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
            self._sampled()
        elif self.stage == "score":
            self._kl(ray.get(self.refs))
        else:
            self._finish(ray.get(self.refs[0]))

    def _sampled(self) -> None:
        """Every chunk sent so far has answered: the next one waits for `feed`, or all are in and scored."""
        self.results = list(ray.get(self.refs))
        if not self.unsent:
            self.result = merged(self.results)
            self._send("score", self.evaluator.score(self.result))
            self.sizes.update((ref, len(self.result.groups)) for ref in self.refs)

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

    def wait(self, timeout_s: float, stall_s: float, between: Callable[[], None] = lambda: None) -> None:
        """Block until this stage has answered and advance (`advance` raises a failed call's error); the
        sample's chunks not sent yet are sent first, as one call. `between`: the hang checks (waits.wait_all).
        Past `timeout_s` the KL stage's learner is hung (LearnerHung: the loop replaces it, as a death), the
        other stages' actors are past their own hang checks (RunError). `stall_s`: learner.stall_timeout_s."""
        self.feed(rest=True)
        if not wait_all(self.waiting, timeout_s, between):
            self.advance()
        elif self.stage == "kl":
            raise learner_hung(f"taking version {self.version}'s evaluation KL pass", timeout_s, stall_s)
        else:
            raise RunError(f"the evaluation of version {self.version} did not finish its {self.stage} stage "
                           f"within {timeout_s:g}s (learner.stall_timeout_s={stall_s:g})")
