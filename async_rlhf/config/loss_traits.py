"""What each built-in loss declares, without its tensor code: what the config checks a run against.

The losses themselves (learners/losses/) import torch, which costs seconds; validating a config (`async-rlhf
check-config`, and `train` before anything starts) must not. This table repeats the declarations of each
built-in `@register_loss(...)`; tests/test_losses.py checks that it matches the registry exactly, so a new
built-in loss fails that test until it is listed here. A user's loss (`loss.import_path`) is read from the
registry itself: importing it has imported torch anyway.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossTraits:
    """The declarations of a `LossSpec` (learners/losses/registry.py), field for field."""

    min_samples_per_prompt: int
    needs_reference: bool
    supports_importance_sampling: bool = False
    needs_value_model: bool = False
    supports_epochs: bool = False
    needs_mc_values: bool = False
    needs_behaviour_logprobs: bool = False


_RATIOS = {"supports_importance_sampling": True, "needs_behaviour_logprobs": True}

BUILTIN_LOSSES: dict[str, LossTraits] = {
    "online_dpo": LossTraits(2, True),
    "ipo": LossTraits(2, True),
    "rloo": LossTraits(2, True, supports_importance_sampling=True),
    "proximal_rloo": LossTraits(2, True, **_RATIOS),
    "grpo": LossTraits(2, True, **_RATIOS),
    "best_of_n_sft": LossTraits(1, False),
    "ppo": LossTraits(1, True, needs_value_model=True, supports_epochs=True, needs_behaviour_logprobs=True),
    "vineppo": LossTraits(1, True, needs_mc_values=True, **_RATIOS),
}
