"""Loss registry. Adding a loss = one new module that uses `@register_loss` + one import line below + its
declarations in async_rlhf/config/loss_traits.py, which the config reads without importing torch (or, without
touching this package, `loss.import_path`: see learners/losses/loader.py)."""
# Each import registers the losses its module defines.
from learners.losses import dpo, grpo, ppo, rloo, sft, vineppo  # noqa: E402,F401
from learners.losses.loader import LossImportError, load_import_path, resolve_loss
from learners.losses.registry import (
    LOSSES,
    LossInputs,
    LossSpec,
    Pair,
    Selection,
    get_loss,
    register_loss,
    select_groups,
    select_pairs,
    select_pairs_batch,
)

__all__ = [
    "LOSSES",
    "LossImportError",
    "LossInputs",
    "LossSpec",
    "Pair",
    "Selection",
    "get_loss",
    "load_import_path",
    "register_loss",
    "resolve_loss",
    "select_groups",
    "select_pairs",
    "select_pairs_batch",
]
