"""RewardService: scores rollout groups with named scorers, in a Ray actor.

A scorer that raises, returns a non-finite value or runs past the batch deadline marks the
completion `failed` / `timed_out` with the reason; it never becomes a reward of 0.
"""
from __future__ import annotations

import math
import os
import time

from async_rlhf.rollout import Completion, RolloutGroup
from reward_models.learned import LearnedRewardModel
from reward_models.remote import RemoteRewardClient
from reward_models.rules import SCORERS, Scorer


class RewardService:
    def __init__(self, scorers: dict[str, str], timeout_s: float = 30.0, remote: dict | None = None,
                 learned: dict | None = None) -> None:
        """`scorers` maps a role ("train", "gold") to a registered scorer name; with `remote`
        (RemoteRewardConfig fields) the train role is scored by that HTTP reward model instead, with
        `learned` (LearnedRewardConfig fields) by that reward model, loaded here, in this actor."""
        unknown = sorted(set(scorers.values()) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; valid: {', '.join(sorted(SCORERS))}")
        self.scorers: dict[str, Scorer] = {role: SCORERS[name] for role, name in scorers.items()}
        self.timeout_s = timeout_s
        self.counts = {"scored": 0, "failed": 0, "timed_out": 0}
        self.busy_s = 0.0
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
        scorer = self.scorers[role]
        deadline = start + self.timeout_s
        for group in groups:
            for completion in group.completions:
                self._score_one(scorer, group, completion, deadline)
        self.busy_s += time.perf_counter() - start
        return groups

    def _score_one(self, scorer: Scorer, group: RolloutGroup, completion: Completion, deadline: float) -> None:
        if time.perf_counter() > deadline:
            completion.reward, completion.reward_status = None, "timed_out"
            completion.reward_error = f"reward batch exceeded reward.timeout_s={self.timeout_s}"
        else:
            try:
                value = float(scorer(group.prompt, completion.text))
                if not math.isfinite(value):
                    raise ValueError(f"scorer returned non-finite value {value}")
                completion.reward, completion.reward_status, completion.reward_error = value, "ok", None
            except Exception as exc:  # a scorer bug must not kill the run, nor become a reward
                completion.reward, completion.reward_status = None, "failed"
                completion.reward_error = f"{type(exc).__name__}: {exc}"
        key = "scored" if completion.reward_status == "ok" else completion.reward_status
        self.counts[key] += 1

    def health(self) -> dict:
        remote: dict[str, object] = {"remote": dict(self.remote.counts)} if self.remote else {}
        remote |= {"learned": str(self.learned.path)} if self.learned else {}
        return {"ok": True, "pid": os.getpid(), "roles": sorted(self.scorers), "busy_s": round(self.busy_s, 3),
                **self.counts, **remote}
