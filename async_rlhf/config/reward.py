"""The `reward:` section: rule scorers by role, or a remote or learned reward model for the train role."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import Strict, environment_checks
from async_rlhf.config.pretrained_names import checkpoint_path
from async_rlhf.user_code import is_import_path, split_import_path
from reward_models.user_scorer import ScorerSpec, describe, resolve_scorer


class RemoteRewardConfig(Strict):
    """An HTTP reward model for the train role (protocol: docs/reward_protocol.md)."""

    url: str = Field(pattern=r"^https?://", description="base URL, e.g. http://127.0.0.1:8500")

    @field_validator("url")
    @classmethod
    def _readable(cls, url: str) -> str:
        """Host and port must parse; the message never repeats the URL (it may hold a password)."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  # raises on a port that is not a number, e.g. a password cut at "/", "?", "#"
        except ValueError:
            raise ValueError("reward.remote.url: its host or port cannot be read; percent-encode any '/', '?', "
                             "'#' or '@' in a user name or password") from None
        if not parts.hostname:
            raise ValueError("reward.remote.url: no host; e.g. http://127.0.0.1:8500")
        return url
    timeout_s: float = Field(10.0, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="on timeouts, connection errors, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first back-off; doubles per retry, with jitter")
    deadline_s: float = Field(60.0, gt=0, description="per batch, retries included; then failed / timed out")
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                  description="environment variable holding a bearer token the server wants "
                                              "(Authorization: Bearer ...); the token itself is never in a config")

    @model_validator(mode="after")
    def _token_set(self, info: ValidationInfo) -> "RemoteRewardConfig":
        if self.token_env and environment_checks(info) and not os.environ.get(self.token_env):
            raise ValueError(f"reward.remote.token_env: ${self.token_env} is not set (or empty); export the reward "
                             f"server's token as {self.token_env}, or drop reward.remote.token_env")
        return self


class LearnedRewardConfig(Strict):
    """A learned reward model for the train role: an HF sequence-classification checkpoint with a scalar
    head (e.g. from `async-rlhf train-rm`), served batched inside the reward actor."""

    path: Path = Field(description="reward model directory (config.json, weights, tokenizer)")
    batch_size: int = Field(16, ge=1, description="pairs per forward pass")
    max_length: int = Field(512, ge=8, description="tokens of prompt + response; longer ones lose the prompt's start")
    threads: int = Field(1, ge=1, description="torch threads of the reward actor (it shares the cores)")

    @field_validator("path")
    @classmethod
    def _dir(cls, path: Path, info: ValidationInfo) -> Path:
        from reward_models.learned import check_reward_model_dir

        path = checkpoint_path("reward.learned.path", path, environment_checks(info))  # a Hub id: its snapshot
        if environment_checks(info):  # --portable: the model is on the machine the config is for
            check_reward_model_dir("reward.learned.path", path)
        return path


class RewardConfig(Strict):
    """Scorers by role; each scores one task (checked against task.name in RunConfig)."""

    train: str | list[str] = Field(
        "sort_partial", description="reward the learner optimises (proxy): a registered scorer, or "
                                    "'pkg.module:function' of your own (reward_models/user_scorer.py); a list of "
                                    "them is their weighted sum (reward.train_weights)")
    train_weights: list[float] | None = Field(
        None, description="reward.train as a list: the weight of each (TRL's reward_weights); default 1 each")
    gold: str = Field("sort_exact", description="evaluation-only reward (gold), named as one train reward is")
    timeout_s: float = Field(30.0, gt=0)
    remote: RemoteRewardConfig | None = Field(
        None, description="when set, the train reward comes from this HTTP reward model instead of reward.train"
    )
    learned: LearnedRewardConfig | None = Field(
        None, description="when set, the train reward comes from this learned reward model instead of reward.train"
    )
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead reward actor (it holds no state); the batches it was "
                             "scoring are scored again"
    )
    max_failed_steps: int = Field(
        3, ge=1, description="learner steps in a row whose batch has no usable train reward: then the run writes a "
                             "checkpoint and stops (exit 1) naming the first reason, instead of training on nothing"
    )
    score_in_generator: bool = Field(
        True, description="a rule train reward (no reward.remote / reward.learned) is scored inside the generator's "
                          "call, with the reward actor's failure handling, instead of one more Ray round trip per "
                          "batch on the generator's critical path; false: every batch goes to the reward actor"
    )

    @field_validator("train", "gold")
    @classmethod
    def _scorer(cls, names: str | list[str], info: ValidationInfo) -> str | list[str]:
        """Registered scorers, or functions imported here to check them (under --portable only their form: the
        modules are on the machine the config is for)."""
        key = f"reward.{info.field_name}"
        if isinstance(names, list) and not names:
            raise ValueError(f"{key}: an empty list; name one reward or more")
        for name in [names] if isinstance(names, str) else names:
            if environment_checks(info) or not is_import_path(name):
                resolve_scorer(name, key)  # UserCodeError: one line, "reward.train: ..."
            else:
                split_import_path(name, key)
        return names

    @model_validator(mode="after")
    def _one_weight_each(self) -> "RewardConfig":
        if self.train_weights is not None and len(self.train_weights) != len(self.train_names):
            raise ValueError(f"reward.train_weights has {len(self.train_weights)} weight(s) for "
                             f"{len(self.train_names)} train reward(s); give one per name in reward.train")
        return self

    @property
    def train_names(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)

    @property
    def train_scorer(self) -> ScorerSpec:
        """What RewardService scores the train role with: a name, or (name, weight) pairs to sum."""
        if isinstance(self.train, str) and self.train_weights is None:
            return self.train
        names = self.train_names
        return list(zip(names, self.train_weights or [1.0] * len(names)))

    @property
    def train_description(self) -> str:
        """How an error line names the train reward."""
        return describe(self.train_scorer)

    @model_validator(mode="after")
    def _one_train_source(self) -> "RewardConfig":
        if self.remote is not None and self.learned is not None:
            raise ValueError("reward.remote and reward.learned both replace the train reward; set only one "
                             "(serve the learned model with `async-rlhf serve-reward` to use it remotely)")
        return self

    @property
    def train_replaced(self) -> bool:
        """The train role is scored by a model (remote or learned), not by the reward.train rule."""
        return self.remote is not None or self.learned is not None

    @property
    def in_generator(self) -> bool:
        """Train rewards are scored inside the generators' calls (a rule, cheap and stateless)."""
        return self.score_in_generator and not self.train_replaced
