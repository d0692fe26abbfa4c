"""VinePPO's Monte Carlo bookkeeping in the pipeline (the estimator itself: learners/advantages/monte_carlo.py).

What the controller does around the estimator: the step delimiters of a task's tokenizer (for its
`MCRequest`), the values and advantages attached to a batch once the RewardService has scored the MC
rollouts (`attach_advantages`), and the driver's cost counters (`MCCost`). The sampling itself is in
actors/generator.py, the clipped loss in learners/losses/vineppo.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from async_rlhf.rollout import RolloutGroup
from learners.advantages.monte_carlo import MCBatch, state_values, step_advantages, token_advantages


def step_delimiter_ids(tokenizer: Any, step_end_chars: str) -> tuple[int, ...]:
    """Ids of the tokens whose text ends with one of `step_end_chars` (a task's `step_end_chars`).

    A character-level tokenizer gives exactly the newline's id; a BPE vocabulary also gives merged
    tokens such as ".\n". A token with the character in its middle cannot end a step: the splitter
    cuts between tokens.
    """
    if not step_end_chars:
        return ()
    ends = tuple(step_end_chars)
    return tuple(sorted(i for i in tokenizer.get_vocab().values() if tokenizer.decode([i]).endswith(ends)))


def attach_advantages(groups: Sequence[RolloutGroup], batch: MCBatch) -> dict[str, int]:
    """Set `Completion.advantages` of every response with an ok reward and a value for each state.

    A response whose states are not all valued keeps `advantages=None` (the vineppo selector skips
    it). Returns the counts `mc_failed_reward` (continuations whose reward failed or timed out) and
    `mc_unvalued` (scored responses left without advantages).
    """
    responses = [c for g in groups for c in g.completions]
    if len(responses) != len(batch.index):
        raise ValueError(f"{len(responses)} responses but MC states for {len(batch.index)}")
    values = state_values(batch.rollouts)
    unvalued = 0
    for completion, row in zip(responses, batch.index):
        if completion.reward_status != "ok" or completion.step_ends is None:
            continue
        row_values = [values[j] for j in row]
        if any(v is None for v in row_values):
            unvalued += 1
            continue
        steps = step_advantages(row_values, completion.reward)  # type: ignore[arg-type]
        completion.advantages = token_advantages(completion.step_ends, steps)
    failed = batch.num_rollouts - sum(len(g.scored) for g in batch.rollouts)
    return {"mc_failed_reward": failed, "mc_unvalued": unvalued}


@dataclass
class MCCost:
    """The driver's running totals of what MC value estimation cost, reported apart from the responses."""

    states: int = 0
    rollouts: int = 0
    tokens: int = 0
    gen_s: float = 0.0
    failed_reward: int = 0
    unvalued: int = 0

    def add_generated(self, batch: MCBatch) -> None:
        self.states += len(batch.rollouts)
        self.rollouts += batch.num_rollouts
        self.tokens += batch.tokens
        self.gen_s += batch.gen_s

    def add_scored(self, counts: dict[str, int]) -> None:
        self.failed_reward += counts["mc_failed_reward"]
        self.unvalued += counts["mc_unvalued"]

    def record(self, response_gen_s: float) -> dict[str, float | int]:
        """Cumulative figures for metrics.jsonl and summary.json; `mc_gen_share` = MC sampling time over
        all sampling time (responses + MC)."""
        total = response_gen_s + self.gen_s
        return {"mc_states": self.states, "mc_rollouts": self.rollouts, "mc_tokens": self.tokens,
                "mc_gen_s": round(self.gen_s, 3), "mc_gen_share": round(self.gen_s / total, 4) if total else 0.0,
                "mc_failed_reward": self.failed_reward, "mc_unvalued": self.unvalued}
