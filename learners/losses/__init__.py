"""Loss registry. Adding a loss = one new module in this package whose function carries `@register_loss(...)`:
learners/loss_traits.py finds it (and reads its declarations for the config, without importing torch) and
the loop below imports it; or, without touching this package, `loss.import_path` (learners/losses/loader.py)."""
from importlib import import_module

from learners.loss_traits import builtin_loss_modules
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

for _module in builtin_loss_modules():  # importing a loss module registers the losses it defines
    import_module(_module)

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
