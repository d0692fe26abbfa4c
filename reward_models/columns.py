"""The dataset columns the run's reward functions take: carried by its prompts (load_task) and checked before any
worker starts, by `train` and `check-config` alike. No Ray or torch here: `check-config` imports it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.rollout import CONVERSATION, RewardColumns
from reward_models.user_scorer import AnyReward, ScorerSpec, batched_parts, columns_taken, resolve_scorer

if TYPE_CHECKING:
    from async_rlhf.tasks.builtin import Task


def reward_roles(cfg: RunConfig) -> list[tuple[str, AnyReward]]:
    """The rewards the run scores with, by config key (a learned or remote train reward is no function here)."""
    roles: list[tuple[str, ScorerSpec]] = [("reward.gold", cfg.reward.gold)]
    roles += [] if cfg.reward.train_replaced else [("reward.train", cfg.reward.train_scorer)]
    return [(key, resolve_scorer(spec, key)) for key, spec in roles]


def reward_columns(cfg: RunConfig) -> RewardColumns:
    """The dataset columns the run's reward functions take, which its prompts then carry (load_task)."""
    return columns_taken(scorer for _, scorer in reward_roles(cfg))


def check_reward_columns(cfg: RunConfig, task: Task) -> None:
    """A reward function in TRL's form that requires a column the prompts do not carry would fail every batch, and
    stop the run reward.max_failed_steps steps later. Train and eval prompts are both scored (the proxy reward in
    evaluations), so both must carry it."""
    evals = task.eval_prompts()[:1]
    keys = set(task.train_prompt(0).meta).intersection(*(p.meta for p in evals)) - {CONVERSATION}
    for key, scorer in reward_roles(cfg):
        for part in batched_parts(scorer):
            if missing := part.missing(keys):
                raise ConfigError(f"config error: {key}: '{part.path}' takes {', '.join(missing)}, which the prompts "
                                  f"do not carry (their data: {', '.join(sorted(keys))}); give the dataset that "
                                  "column (train and eval files alike), or the parameter a default")
