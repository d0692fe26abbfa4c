"""The `loss:` section: which registered loss trains the policy, and its hyper-parameters."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from async_rlhf.config.base import Strict
from learners.loss_traits import LossTraits, builtin_losses


class LossConfig(Strict):
    """The loss and its hyper-parameters; each loss's formula and options are in docs/losses.md."""

    name: str = Field("online_dpo", description="a registered loss; set from import_path when that is given")
    beta: float = Field(
        0.1, gt=0, description="KL-to-reference coefficient: DPO/IPO beta, RLOO's KL penalty, GRPO's k3 weight, "
                               "PPO's per-token KL"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clip range of proximal_rloo, grpo and ppo")
    importance_sampling: Literal["none", "truncated"] = Field(
        "none", description="stale-sample correction: truncated = per-token min(pi/mu, is_cap) weight"
    )
    is_cap: float = Field(2.0, ge=1, description="truncation of the importance weight")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount of GAE over completion tokens")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE's lambda (0 = one-step TD, 1 = Monte Carlo return)")
    value_clip_eps: float = Field(
        0.2, gt=0, description="ppo: the value is clipped to old value +- this in the value loss"
    )
    value_lr: float | None = Field(
        None, gt=0, description="ppo: learning rate of the value model's own AdamW; default learner.lr"
    )
    ppo_epochs: int = Field(
        1, ge=1, le=16, description="ppo: optimizer steps on each batch (> 1 makes both clips bind)"
    )
    import_path: str | None = Field(
        None, description="'pkg.module:function' of your own loss; overrides name with what it registers"
    )

    @model_validator(mode="before")
    @classmethod
    def _import(cls, data: Any) -> Any:
        # Runs before `name` is checked, so that the user's loss is registered by then. import_path
        # overrides name (so `loss.import_path=...` works on top of a YAML that names a loss).
        if not isinstance(data, dict) or not data.get("import_path"):
            return data
        from learners.losses import load_import_path

        spec = load_import_path(str(data["import_path"]))  # LossImportError: one line, "loss.import_path: ..."
        return {**data, "name": spec.name}

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name in builtin_losses():  # no torch: read from the losses' source (learners/loss_traits.py)
            return name
        from learners.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(f"loss.name: unknown loss '{name}'; valid names: {', '.join(sorted(LOSSES))}")
        return name

    @property
    def traits(self) -> LossTraits:
        """What the loss declares: a built-in's read from its source, a loss.import_path one's from the
        registry (its module, imported by `_import`, has imported torch already)."""
        builtin = builtin_losses()
        if self.name in builtin:
            return builtin[self.name]
        from learners.losses import LOSSES

        return LOSSES[self.name]

    @model_validator(mode="after")
    def _importance_sampling(self) -> "LossConfig":
        if self.importance_sampling != "none" and not self.traits.supports_importance_sampling:
            able = ", ".join(sorted(n for n, t in builtin_losses().items() if t.supports_importance_sampling))
            raise ValueError(
                f"loss.importance_sampling: loss '{self.name}' does not support '{self.importance_sampling}'; "
                f"set loss.importance_sampling=none or use one of: {able}"
            )
        if self.ppo_epochs > 1 and not self.traits.supports_epochs:
            able = ", ".join(sorted(n for n, t in builtin_losses().items() if t.supports_epochs))
            raise ValueError(
                f"loss.ppo_epochs: loss '{self.name}' takes one optimizer step per batch; "
                f"set loss.ppo_epochs=1 or use one of: {able}"
            )
        return self
