"""The dataset columns the run's reward functions take: carried by its prompts (load_task) and checked before any
worker starts, by `train` and `check-config` alike. No Ray or torch here: `check-config` imports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.rollout import CONVERSATION, NO_COLUMNS, RewardColumns
from reward_models.user_scorer import (
    TRL_ARGUMENTS,
    AnyReward,
    ScorerSpec,
    batched_parts,
    columns_taken,
    resolve_scorer,
)

if TYPE_CHECKING:
    from async_rlhf.tasks.builtin import Task


@dataclass(frozen=True)
class ServedColumns:
    """The dataset columns the function behind `reward.remote` takes, as `async-rlhf serve-reward` says in its
    /healthz answer (`columns`): without them the run's prompts did not carry what its function names, and every
    item failed. A server that says nothing (another implementation of the protocol) takes none."""

    taken: RewardColumns = NO_COLUMNS
    required: frozenset[str] = frozenset()

    @classmethod
    def of(cls, scorer: AnyReward) -> "ServedColumns":
        parts = batched_parts(scorer)
        return cls(columns_taken([scorer]), frozenset().union(*(p.required - set(TRL_ARGUMENTS) for p in parts)))

    def answer(self) -> dict[str, Any]:
        """What /healthz says under `columns`."""
        return {"taken": sorted(self.taken.names), "every": self.taken.every, "required": sorted(self.required)}

    @classmethod
    def read(cls, health: Any) -> "ServedColumns":
        """From a /healthz answer; a malformed or missing `columns` is none (the protocol does not require it)."""
        said = health.get("columns") if isinstance(health, dict) else None
        if not isinstance(said, dict) or not all(_names(said.get(k, [])) for k in ("taken", "required")):
            return NO_SERVED
        taken = RewardColumns(frozenset(said.get("taken", [])), said.get("every") is True)
        return cls(taken, frozenset(said.get("required", [])))


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


NO_SERVED = ServedColumns()


def reward_roles(cfg: RunConfig) -> list[tuple[str, AnyReward]]:
    """The rewards the run scores with, by config key (a learned or remote train reward is no function here)."""
    roles: list[tuple[str, ScorerSpec]] = [("reward.gold", cfg.reward.gold)]
    roles += [] if cfg.reward.train_replaced else [("reward.train", cfg.reward.train_scorer)]
    return [(key, resolve_scorer(spec, key)) for key, spec in roles]


def reward_columns(cfg: RunConfig, served: ServedColumns = NO_SERVED) -> RewardColumns:
    """The dataset columns the run's reward functions take, and the reward server's (`served`): its prompts then
    carry them (load_task)."""
    own = columns_taken(scorer for _, scorer in reward_roles(cfg))
    return RewardColumns(own.names | served.taken.names, own.every or served.taken.every)


def check_reward_columns(cfg: RunConfig, task: Task, served: ServedColumns = NO_SERVED) -> None:
    """A reward function in TRL's form that requires a column the prompts do not carry would fail every batch, and
    stop the run reward.max_failed_steps steps later. Train and eval prompts are both scored (the proxy reward in
    evaluations), so both must carry it; so must the ones the reward server's function requires (`served`)."""
    evals = task.eval_prompts()[:1]
    keys = set(task.train_prompt(0).meta).intersection(*(p.meta for p in evals)) - {CONVERSATION}
    if missing := sorted(served.required - keys):
        raise ConfigError(f"config error: reward.remote.url: the reward server's function takes {', '.join(missing)}, "
                          f"which the prompts do not carry (their data: {', '.join(sorted(keys))}); give the dataset "
                          "that column (train and eval files alike), or serve a function that does without it")
    for key, scorer in reward_roles(cfg):
        for part in batched_parts(scorer):
            if missing := part.missing(keys):
                raise ConfigError(f"config error: {key}: '{part.path}' takes {', '.join(missing)}, which the prompts "
                                  f"do not carry (their data: {', '.join(sorted(keys))}); give the dataset that "
                                  "column (train and eval files alike), or the parameter a default")
