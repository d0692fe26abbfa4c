"""Loss registry. Adding a loss = one new module that uses `@register_loss` + one import line below."""
from learners.losses.registry import (
    LOSSES,
    LossInputs,
    LossSpec,
    Pair,
    Selection,
    get_loss,
    register_loss,
    select_pairs,
    select_pairs_batch,
)

# Each import registers the losses its module defines.
from learners.losses import dpo  # noqa: E402,F401

__all__ = [
    "LOSSES",
    "LossInputs",
    "LossSpec",
    "Pair",
    "Selection",
    "get_loss",
    "register_loss",
    "select_pairs",
    "select_pairs_batch",
]
