"""The data that flows between generators, the reward service, the queue and the learner.

Plain dataclasses: they cross Ray process boundaries by pickling, and every field is a
builtin so that a group can also be written to JSON for debugging or checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

FinishReason = Literal["stop", "length", "abort"]
RewardStatus = Literal["pending", "ok", "failed", "timed_out"]
EVAL_ID_OFFSET = 1_000_000_000  # eval prompt ids live apart from train ids (every task's train index < this)
CONVERSATION = "prompt"  # Prompt.meta key of a prompt that came as a conversation: its turns (TRL's column name)
RESERVED_META = ("row", "epoch", "reference", CONVERSATION)  # Prompt.meta keys the tasks set themselves


class RewardColumns(NamedTuple):
    """The dataset columns the run's reward functions take (their parameters' names), which the prompts carry in
    `meta` as TRL passes them: `every` where one takes **kwargs, as TRL passes every column."""

    names: frozenset[str] = frozenset()
    every: bool = False

    def wants(self, column: str, prompt_column: str | None) -> bool:
        """Whether a prompt carries `column`; the prompt's own column only where named (it is `prompts` already)."""
        return column not in RESERVED_META and (column in self.names or (self.every and column != prompt_column))


NO_COLUMNS = RewardColumns()  # rewards that take no dataset column (rules, `fn(prompt, text)`)


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    text: str
    logprobs: list[float]  # behaviour-policy logprob of each sampled token
    finish_reason: FinishReason
    reward: float | None = None  # None until scored; never filled with a made-up value
    reward_status: RewardStatus = "pending"
    reward_error: str | None = None
    reward_parts: dict[str, float] | None = None  # a sum of several rewards: each one's value, by name
    # VinePPO (async_rlhf/pipeline/vineppo.py), set only when the loss needs Monte Carlo values: exclusive
    # token ends of the reasoning steps (by the generator) and one advantage per token (by the
    # controller, once the MC rollouts are scored; None when a state's value is unknown).
    step_ends: list[int] | None = None
    advantages: list[float] | None = None


@dataclass
class Prompt:
    """A prompt from the task's stream; `meta` carries what the reward needs (e.g. the answer)."""

    prompt_id: int
    text: str
    token_ids: list[int]
    meta: dict = field(default_factory=dict)


@dataclass
class RolloutGroup:
    """K completions of one prompt, all sampled from one policy version."""

    prompt: Prompt
    completions: list[Completion]
    policy_version: int
    generator_id: int
    created_at: float  # time.time() when generation finished
    enqueued_at: float | None = None
    gen_s: float = 0.0  # wall time of the generation batch this group came from
    reward_logged: dict[str, float] | None = None  # what the train reward's functions logged (TRL's log_metric)

    @property
    def scored(self) -> list[Completion]:
        """Completions whose reward is usable for training."""
        return [c for c in self.completions if c.reward_status == "ok"]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


def scored_reward(completion: Completion) -> float:
    """The reward of a completion from `RolloutGroup.scored` (a sort key that type-checks: status "ok" has one)."""
    if completion.reward is None:
        raise ValueError(f"completion has status {completion.reward_status!r} and no reward")
    return completion.reward
