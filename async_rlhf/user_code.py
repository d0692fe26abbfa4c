"""A user's own function named in a config as "pkg.module:function" (`loss.import_path`, a reward scorer).

The module is looked up on sys.path plus the current directory (like `uvicorn app:app`); Ray workers share the
driver's directory, so the actors that call the function import it the same way. Every problem raises
`UserCodeError` with one line that starts with the config key, the line the config validation shows before
any worker starts.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable


class UserCodeError(ValueError):
    """A "pkg.module:function" that cannot be used, explained in one line that names its config key."""


def is_import_path(value: str) -> bool:
    """Names the form "pkg.module:function" (registered names never hold a colon)."""
    return ":" in value


def split_import_path(path: str, key: str) -> tuple[str, str]:
    """("pkg.module", "function"), or UserCodeError for any other form."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserCodeError(f"{key}: '{path}' is not of the form 'pkg.module:function'")
    return module_name, attr


def load_function(path: str, key: str, arguments: tuple[str, ...] | None) -> Callable[..., Any]:
    """The callable "pkg.module:function" names, checked to take `arguments` positionally (None: unchecked)."""
    module_name, attr = split_import_path(path, key)
    fn = getattr(_import(module_name, key), attr, None)
    if fn is None:
        raise UserCodeError(f"{key}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserCodeError(f"{key}: '{path}' is not callable (it is a {type(fn).__name__})")
    if arguments is not None:
        check_signature(fn, path, key, arguments)
    return fn


def _import(module_name: str, key: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # appended: never shadows an installed package
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):  # the module (or a parent) itself
            raise UserCodeError(f"{key}: module '{module_name}' not found ({exc}); it must be importable "
                                "from sys.path or the current directory") from None
        raise UserCodeError(f"{key}: importing module '{module_name}' failed: {exc}") from None
    except SystemExit as exc:  # a script's `sys.exit(main())`, or its argparse, run at import: ended the caller
        raise UserCodeError(f"{key}: importing module '{module_name}' called sys.exit({exc.code!r}); run its script "
                            "code only under `if __name__ == \"__main__\":`") from None
    except Exception as exc:  # a broken user module: name the module and the error, in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserCodeError(
            f"{key}: importing module '{module_name}' failed: {type(exc).__name__}: {first}") from None


def check_signature(fn: Any, path: str, key: str, arguments: tuple[str, ...]) -> None:
    """It is called fn(*arguments): that many positional arguments must bind."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    try:
        sig.bind(*[None] * len(arguments))
    except TypeError:
        count = ("no", "one", "two", "three", "four")[len(arguments)]
        raise UserCodeError(f"{key}: '{path}' must accept {count} positional arguments "
                            f"({', '.join(arguments)}); its signature is {sig}") from None
