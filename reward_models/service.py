"""RewardService: scores rollout groups with named scorers, in a Ray actor.

A scorer that raises, returns a non-finite value or runs past the batch deadline marks the
completion `failed` / `timed_out` with the reason; it never becomes a reward of 0.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import NamedTuple

from async_rlhf.cluster.gc_pause import paused_gc
from async_rlhf.rollout import Completion, Prompt, RolloutGroup
from reward_models.learned import LearnedRewardModel
from reward_models.remote import RemoteRewardClient
from reward_models.scoring_marks import ScoringMarks
from reward_models.trl_context import NO_RUN, ScoringCall, ScoringRun
from reward_models.user_scorer import (
    NONE_APPLIES,
    USER_RAISES,
    AnyReward,
    BatchedReward,
    CombinedReward,
    ConcurrentReward,
    ScorerSpec,
    awaited,
    describe,
    resolve_scorer,
    runs_user_code,
)

NO_ANSWER = "TypeError: the scorer returned NoneType None, not a number"  # in a sum of several: that one does not apply


class Outcome(NamedTuple):
    """One completion's score: (reward, None) or (None, why it failed); a sum's parts by name where it scored."""

    reward: float | None
    error: str | None
    parts: dict[str, float] | None = None  # each part's own value (before its weight); one that did not apply left out


class TrainReward(NamedTuple):
    """A train reward scored inside a generator's own call (reward.score_in_generator)."""

    scorer: ScorerSpec
    timeout_s: float = 30.0
    run: ScoringRun = NO_RUN


class RewardService:
    @paused_gc()  # a learned reward model's load, a user's scorer's imports (gc_pause.py)
    def __init__(self, scorers: dict[str, ScorerSpec], timeout_s: float = 30.0, remote: dict | None = None,
                 learned: dict | None = None, marks: ScoringMarks | None = None, run: ScoringRun = NO_RUN) -> None:
        """`scorers` maps a role ("train", "gold") to a registered scorer name or a user's "pkg.module:function"
        (reward_models/user_scorer.py), imported here, in this actor, or (name, weight) pairs to sum; with `remote`
        (RemoteRewardConfig fields) the train role is scored by that HTTP reward model instead, with
        `learned` (LearnedRewardConfig fields) by that reward model, loaded here, in this actor. `marks` name the
        scorer running when this process dies (scoring_marks.py); `run` is what TRL's `trainer_state` tells a
        function of the run (trl_context.py)."""
        self.scorers = {role: resolve_scorer(name, f"reward.{role}") for role, name in scorers.items()}
        # Only functions of the user's can end the process they run in: a registered rule is never named so.
        self.described = {role: f"reward.{role} {describe(spec)}" for role, spec in scorers.items()
                          if runs_user_code(spec)}
        self.marks = marks or ScoringMarks(None, "")
        self.run = run
        self.timeout_s = timeout_s
        self.counts = {"scored": 0, "failed": 0, "timed_out": 0}
        self.busy_s = 0.0
        self._threads: dict[str, threading.Thread] = {}  # by role: its scorer's thread of the last batch
        self.remote = RemoteRewardClient(**remote) if remote else None
        self.learned = LearnedRewardModel(**learned) if learned else None

    def _score_remote(self, client: RemoteRewardClient, groups: list[RolloutGroup]) -> None:
        pairs = [(g, c) for g in groups for c in g.completions]
        items = [{"prompt": g.prompt.text, "response": c.text, "meta": g.prompt.meta} for g, c in pairs]
        for (_, completion), outcome in zip(pairs, client.score(items)):
            completion.reward, completion.reward_status = outcome.score, outcome.status
            completion.reward_error = outcome.error
            self.counts["scored" if outcome.status == "ok" else outcome.status] += 1

    def _score_learned(self, model: LearnedRewardModel, groups: list[RolloutGroup]) -> None:
        pairs = [(g, c) for g in groups for c in g.completions]
        try:
            values = model.score_texts([g.prompt.text for g, _ in pairs], [c.text for _, c in pairs])
            error = None
        except Exception as exc:  # e.g. out of memory: every item of the batch failed, none becomes 0
            values, error = [math.nan] * len(pairs), f"{type(exc).__name__}: {exc}"
        for (_, completion), value in zip(pairs, values):
            ok = math.isfinite(value)
            completion.reward, completion.reward_status = (value, "ok") if ok else (None, "failed")
            completion.reward_error = None if ok else error or f"reward model returned non-finite value {value}"
            self.counts["scored" if ok else "failed"] += 1

    def score(self, groups: list[RolloutGroup], role: str = "train") -> list[RolloutGroup]:
        start = time.perf_counter()
        if role == "train" and (self.remote is not None or self.learned is not None):
            if self.remote is not None:
                self._score_remote(self.remote, groups)
            elif self.learned is not None:
                self._score_learned(self.learned, groups)
            self.busy_s += time.perf_counter() - start
            return groups
        call = ScoringCall(self.run, max((g.policy_version for g in groups), default=0))
        outcomes = self._in_time(role, groups, start + self.timeout_s, call)
        logged = call.means() or None
        for group in groups:
            group.reward_logged = logged
        for index, completion in enumerate(_completions(groups)):
            if index < len(outcomes):
                completion.reward, completion.reward_error, completion.reward_parts = outcomes[index]
                completion.reward_status = "ok" if completion.reward_error is None else "failed"
            else:
                completion.reward, completion.reward_status = None, "timed_out"
                completion.reward_error = f"reward batch exceeded reward.timeout_s={self.timeout_s}"
            self.counts["scored" if completion.reward_status == "ok" else completion.reward_status] += 1
        self.busy_s += time.perf_counter() - start
        return groups

    def _in_time(self, role: str, groups: list[RolloutGroup], deadline: float, call: ScoringCall) -> list[Outcome]:
        """The completions' (reward, None) or (None, reason) in order, as many as were scored by the deadline,
        in a thread of their own: a scorer that never returns (a user's function on a network call without a
        timeout) times its batch out instead of hanging the generator or the reward actor. A role's scorer still
        busy past an earlier batch's deadline is waited for first; it never runs twice at once."""
        done: list[Outcome] = []
        busy = self._threads.get(role)
        if busy is not None:
            busy.join(max(0.0, deadline - time.perf_counter()))
        if busy is None or not busy.is_alive():
            items = [(group.prompt, completion) for group in groups for completion in group.completions]
            thread = threading.Thread(target=self._score_marked, args=(role, items, deadline, done, call),
                                      daemon=True)
            self._threads[role] = thread
            thread.start()
            thread.join(max(0.0, deadline - time.perf_counter()))
        return list(done)  # what a scorer still running adds from now on is never read

    def _score_marked(self, role: str, items: list[tuple[Prompt, Completion]], deadline: float,
                      done: list[Outcome], call: ScoringCall) -> None:
        if role not in self.described:
            _score_until(self.scorers[role], items, deadline, done, call)
            return
        with self.marks.held(role, self.described[role]):
            _score_until(self.scorers[role], items, deadline, done, call)

    def health(self) -> dict:
        remote: dict[str, object] = {"remote": dict(self.remote.counts)} if self.remote else {}
        remote |= {"learned": str(self.learned.path)} if self.learned else {}
        return {"ok": True, "pid": os.getpid(), "roles": sorted(self.scorers), "busy_s": round(self.busy_s, 3),
                **self.counts, **remote}


def reward_number(value: object) -> float:
    """A scorer's answer as a finite float; anything else raises, naming what it was (a user's function may
    return None, a string or a list)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise TypeError(f"the scorer returned {type(value).__name__} {shown}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"scorer returned non-finite value {number}")
    return number


def _completions(groups: list[RolloutGroup]) -> list[Completion]:
    return [completion for group in groups for completion in group.completions]


def _score_until(scorer: AnyReward, items: list[tuple[Prompt, Completion]], deadline: float, done: list[Outcome],
                 call: ScoringCall) -> None:
    """Score the items in order into `done` until the deadline passes (a batched reward: in one call; a sum: part
    by part, then summed). A scorer bug must not kill the run, nor become a reward: it fails the items it was
    called for."""
    if isinstance(scorer, CombinedReward):
        parts: list[list[Outcome]] = [[] for _ in scorer.parts]
        for (_, part, _), outcomes in zip(scorer.parts, parts):
            _score_until(part, items, deadline, outcomes, call)
        done.extend(_summed(scorer, parts))
        return
    if isinstance(scorer, (BatchedReward, ConcurrentReward)):
        done.extend(_score_batch(scorer, items, call))
        return
    for prompt, completion in items:
        if time.perf_counter() > deadline:
            return
        try:
            value = awaited(scorer(prompt, completion.text))  # a callable whose __call__ is async, too
        except USER_RAISES as exc:
            done.append(_failed(exc))
            continue
        done.append(_checked(value))


def _score_batch(scorer: BatchedReward | ConcurrentReward, items: list[tuple[Prompt, Completion]],
                 call: ScoringCall) -> list[Outcome]:
    """A batch in one call: a raise fails every item with its reason; each value is checked on its own."""
    completions = [completion for _, completion in items]
    try:
        values = scorer([prompt for prompt, _ in items], [c.text for c in completions],
                        [c.token_ids for c in completions], call)
    except USER_RAISES as exc:
        return [_failed(exc)] * len(items)
    return [_checked(value) for value in values]


def _summed(scorer: CombinedReward, parts: list[list[Outcome]]) -> list[Outcome]:
    """Each item's weighted sum over the parts that scored it, a part's None meaning "does not apply" (TRL's
    nansum), with each part's value; the first failed part's reason, named, where one failed, or where none
    applies."""
    summed: list[Outcome] = []
    for outcomes in zip(*parts):  # as many as the part that got furthest before the deadline
        named = [(name, outcome.error) for (name, _, _), outcome in zip(scorer.parts, outcomes)]
        failed = [(name, error) for name, error in named if error not in (None, NO_ANSWER)]
        if failed or all(error == NO_ANSWER for _, error in named):
            name, error = (failed or named)[0]
            summed.append(Outcome(None, f"{name}: {error}" if failed else NONE_APPLIES))
            continue
        scored = [(name, weight, outcome.reward) for (name, _, weight), outcome in zip(scorer.parts, outcomes)
                  if outcome.reward is not None]
        summed.append(Outcome(sum(weight * value for _, weight, value in scored), None,
                              {name: value for name, _, value in scored}))
    return summed


def _checked(value: object) -> Outcome:
    if value is None:
        return Outcome(None, NO_ANSWER)
    if isinstance(value, BaseException):  # a ConcurrentReward's completion that raised
        return _failed(value)
    try:
        return Outcome(reward_number(value), None)
    except Exception as exc:  # float() of an odd object (a tensor of two numbers) may raise anything
        return _failed(exc)


def _failed(exc: BaseException) -> Outcome:
    if isinstance(exc, SystemExit):
        return Outcome(None, f"SystemExit: the function called sys.exit({exc.code!r}); return a number instead")
    return Outcome(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
