"""`loss.import_path`: a user's own loss, loaded from "pkg.module:function".

Two kinds of function are accepted:
  * decorated with `@register_loss(...)`: importing the module registers it, with the declarations
    it chose; its registered name becomes `loss.name` (import_path overrides a configured name);
  * a plain `fn(inputs, params) -> (loss, metrics)`: registered here under the import path itself
    (e.g. "my_pkg.losses:my_loss", which cannot collide with a built-in name) with PLAIN_DEFAULTS.
Every problem raises `LossImportError` with one line that starts with "loss.import_path: ", the
message the config validation shows before any worker starts. The module is looked up on sys.path
plus the current directory (like `uvicorn app:app`); Ray workers share the driver's directory, so
the learner actor finds it too.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Protocol

from learners.losses.registry import LOSSES, LossSpec, get_loss, register_loss

# What a plain function gets: every scored completion per prompt with group ids (select_groups),
# at least two per prompt, reference log-probs; it applies no importance sampling of its own.
PLAIN_DEFAULTS: dict[str, Any] = {"min_samples_per_prompt": 2, "needs_reference": True}


class LossImportError(ValueError):
    """A `loss.import_path` that cannot be used, explained in one line."""


class LossChoice(Protocol):
    """The two `LossConfig` fields that pick a loss."""

    name: str
    import_path: str | None


def resolve_loss(choice: LossChoice) -> LossSpec:
    """The spec to train with: loaded from `import_path` when set, else registered under `name`."""
    return load_import_path(choice.import_path) if choice.import_path else get_loss(choice.name)


def load_import_path(path: str) -> LossSpec:
    """Import "pkg.module:function", check it is a loss function, and return its (registered) spec."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise LossImportError(f"loss.import_path: '{path}' is not of the form 'pkg.module:function'")
    fn = getattr(_import(module_name), attr, None)
    if fn is None:
        raise LossImportError(f"loss.import_path: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise LossImportError(f"loss.import_path: '{path}' is not callable (it is a {type(fn).__name__})")
    _check_signature(fn, path)
    return _spec_for(fn, path)


def _import(module_name: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # appended: never shadows an installed package
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):  # the module (or a parent) itself
            raise LossImportError(
                f"loss.import_path: module '{module_name}' not found ({exc}); it must be importable "
                "from sys.path or the current directory"
            ) from None
        raise LossImportError(f"loss.import_path: importing module '{module_name}' failed: {exc}") from None
    except Exception as exc:  # a broken user module: name the module and the error, in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LossImportError(
            f"loss.import_path: importing module '{module_name}' failed: {type(exc).__name__}: {first}"
        ) from None


def _check_signature(fn: Any, path: str) -> None:
    """The learner calls fn(inputs, params): two positional arguments must bind."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    try:
        sig.bind(None, None)
    except TypeError:
        raise LossImportError(
            f"loss.import_path: '{path}' must accept two positional arguments (inputs, params); "
            f"its signature is {sig}"
        ) from None


def _spec_for(fn: Any, path: str) -> LossSpec:
    """The spec of a decorated function, or a new one (PLAIN_DEFAULTS) under the import path."""
    for spec in LOSSES.values():
        if spec.fn is fn:
            return spec
    if path in LOSSES:  # the same path was loaded before and its module object was replaced
        raise LossImportError(f"loss.import_path: '{path}' is already registered with another function")
    register_loss(path, **PLAIN_DEFAULTS)(fn)
    return LOSSES[path]
