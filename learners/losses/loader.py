"""`loss.import_path`: a user's own loss, loaded from "pkg.module:function".

Two kinds of function are accepted:
  * decorated with `@register_loss(...)`: importing the module registers it, with the declarations
    it chose; its registered name becomes `loss.name` (import_path overrides a configured name);
  * a plain `fn(inputs, params) -> (loss, metrics)`: registered here under the import path itself
    (e.g. "my_pkg.losses:my_loss", which cannot collide with a built-in name) with PLAIN_DEFAULTS.
Every problem raises `LossImportError` with one line that starts with "loss.import_path: ", the
message the config validation shows before any worker starts (async_rlhf/user_code.py: where the module
is looked up, and why the learner actor finds it too).
"""
from __future__ import annotations

from typing import Any, Protocol

from async_rlhf.user_code import UserCodeError, load_function
from learners.losses.registry import LOSSES, LossSpec, get_loss, register_loss

# What a plain function gets: every scored completion per prompt with group ids (select_groups),
# at least two per prompt, reference log-probs; it applies no importance sampling of its own.
PLAIN_DEFAULTS: dict[str, Any] = {"min_samples_per_prompt": 2, "needs_reference": True}


# A `loss.import_path` that cannot be used, explained in one line.
LossImportError = UserCodeError


class LossChoice(Protocol):
    """The two `LossConfig` fields that pick a loss."""

    name: str
    import_path: str | None


def resolve_loss(choice: LossChoice) -> LossSpec:
    """The spec to train with: loaded from `import_path` when set, else registered under `name`."""
    return load_import_path(choice.import_path) if choice.import_path else get_loss(choice.name)


def load_import_path(path: str) -> LossSpec:
    """Import "pkg.module:function", check it is a loss function, and return its (registered) spec."""
    return _spec_for(load_function(path, "loss.import_path", ("inputs", "params")), path)


def _spec_for(fn: Any, path: str) -> LossSpec:
    """The spec of a decorated function, or a new one (PLAIN_DEFAULTS) under the import path."""
    for spec in LOSSES.values():
        if spec.fn is fn:
            return spec
    if path in LOSSES:  # the same path was loaded before and its module object was replaced
        raise LossImportError(f"loss.import_path: '{path}' is already registered with another function")
    register_loss(path, **PLAIN_DEFAULTS)(fn)
    return LOSSES[path]
