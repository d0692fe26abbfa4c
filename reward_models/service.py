"""RewardService: scores rollout groups with named scorers, in a Ray actor.

A scorer that raises, returns a non-finite value or runs past the batch deadline marks the
completion `failed` / `timed_out` with the reason; it never becomes a reward of 0.
"""
from __future__ import annotations

import math
import time

from async_rlhf.rollout import Completion, RolloutGroup
from reward_models.rules import SCORERS, Scorer


class RewardService:
    def __init__(self, scorers: dict[str, str], timeout_s: float = 30.0) -> None:
        """`scorers` maps a role ("train", "gold") to a registered scorer name."""
        unknown = sorted(set(scorers.values()) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; valid: {', '.join(sorted(SCORERS))}")
        self.scorers: dict[str, Scorer] = {role: SCORERS[name] for role, name in scorers.items()}
        self.timeout_s = timeout_s
        self.counts = {"scored": 0, "failed": 0, "timed_out": 0}
        self.busy_s = 0.0

    def score(self, groups: list[RolloutGroup], role: str = "train") -> list[RolloutGroup]:
        scorer = self.scorers[role]
        start = time.perf_counter()
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
        return {"ok": True, "roles": sorted(self.scorers), "busy_s": round(self.busy_s, 3), **self.counts}
