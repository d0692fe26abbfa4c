"""GenerationResult: what a generator's call answers, apart from the actor so that reading one imports no torch or
vLLM (the driver's loop, and stand-in generators in the tests, which start in a fresh worker each)."""
from __future__ import annotations

from dataclasses import dataclass

from async_rlhf.rollout import RolloutGroup
from learners.advantages.monte_carlo import MCBatch


@dataclass
class GenerationResult:
    groups: list[RolloutGroup]
    generator_id: int
    policy_version: int
    gen_s: float  # time inside vLLM
    sync_s: float  # time loading new weights before generating
    started_at: float
    tokens: int
    mc: MCBatch | None = None  # VinePPO's rollouts, when the call was given an MCRequest
    reward_s: float | None = None  # set when the train reward was scored in this call (reward.in_generator)
