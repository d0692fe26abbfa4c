"""Evaluator: gold reward (and the proxy, and KL to the reference) of the policy on the held-out set."""
from __future__ import annotations

from typing import Any

import ray

from async_rlhf.broker import WeightRef
from async_rlhf.rollout import Prompt, RolloutGroup


def _mean_reward(groups: list[RolloutGroup]) -> float | None:
    values = [c.reward for g in groups for c in g.scored]
    return sum(values) / len(values) if values else None


class Evaluator:
    def __init__(self, prompts: list[Prompt], reward: Any, temperature: float) -> None:
        self.prompts = prompts
        self.reward = reward  # RewardService actor handle
        self.temperature = temperature

    def evaluate(self, generator: Any, weights: WeightRef | None, learner: Any) -> dict:
        """Sample one completion per eval prompt with `weights` and score it with both rewards."""
        result = ray.get(generator.generate.remote(self.prompts, weights, n=1, temperature=self.temperature))
        gold = ray.get(self.reward.score.remote(result.groups, "gold"))
        proxy = ray.get(self.reward.score.remote(result.groups, "train"))
        kl = ray.get(learner.kl_to_reference.remote(proxy))
        return {
            "version": result.policy_version,
            "gold_reward": _mean_reward(gold),
            "proxy_reward": _mean_reward(proxy),
            "kl": kl,
            "prompts": len(self.prompts),
            "temperature": self.temperature,
        }
