"""The one best/worst picker of preference pairs: the DPO family's selector (learners/losses/registry.py)
and `async-rlhf sample-pairs` (async_rlhf/cli/pairs.py) both take their pairs from here. No torch.

Tie rule: among completions with equal rewards the first in the group's order is taken, both for the
best and for the worst (`max` / `min` keep the first): deterministic, and the samples of a group are
i.i.d., so no order is better than another. A pair needs best - worst > `min_margin` (0: any strict
preference); a group whose rewards all lie within the margin gives none.
"""
from __future__ import annotations

from collections.abc import Sequence

from async_rlhf.rollout import Completion, scored_reward


def best_and_worst(scored: Sequence[Completion], min_margin: float = 0.0) -> tuple[Completion, Completion] | None:
    """(highest, lowest) reward among `scored` (completions whose reward is ok), or None without a preference."""
    if len(scored) < 2:
        return None
    best = max(scored, key=scored_reward)
    worst = min(scored, key=scored_reward)
    return (best, worst) if scored_reward(best) - scored_reward(worst) > min_margin else None
