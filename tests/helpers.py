"""Small builders shared by tests."""
from __future__ import annotations

from async_rlhf.rollout import Completion, Prompt, RolloutGroup


def make_group(version: int, rewards: list[float | None] = (1.0, 0.0), prompt_id: int = 0) -> RolloutGroup:
    completions = [
        Completion([3, 4], "12", [-0.5, -0.5], "stop", r, "ok" if r is not None else "failed")
        for r in rewards
    ]
    return RolloutGroup(Prompt(prompt_id, "21>", [1, 5, 4, 13]), completions, version, 0, 0.0)
