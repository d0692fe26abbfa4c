"""What a loss declares, and the built-in losses' declarations read without importing them.

A built-in loss is one module of learners/losses/ whose function carries `@register_loss("name", ...)`
(learners/losses/registry.py): that decorator is the only place the loss is declared. The loss modules
import torch, which costs seconds, and validating a config (`async-rlhf check-config`, and `train` before
anything starts) must not; so `builtin_losses()` reads the decorators' arguments from the source, and
learners/losses/__init__.py imports the modules found here. Adding a built-in loss is one new file.
The declarations must therefore be literals (`supports_epochs=True`, not a variable); a user's loss
(`loss.import_path`) is read from the registry itself, importing it has imported torch anyway.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

LOSSES_DIR = Path(__file__).parent / "losses"
NOT_TRAITS = ("select",)  # register_loss arguments that are code, not declarations


@dataclass(frozen=True)
class LossTraits:
    """What a loss declares; the role of each field is in learners/losses/registry.py's docstring."""

    min_samples_per_prompt: int
    needs_reference: bool
    supports_importance_sampling: bool = False
    needs_value_model: bool = False
    supports_epochs: bool = False
    needs_mc_values: bool = False
    needs_behaviour_logprobs: bool = False

    @classmethod
    def of(cls, declared: LossTraits) -> LossTraits:
        """The declarations alone, e.g. of a `LossSpec` (which is a LossTraits with its code)."""
        return cls(**{f.name: getattr(declared, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Declaration:
    """One `@register_loss` found in the source."""

    name: str
    module: str
    traits: LossTraits


def _is_register_call(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == "register_loss") or (
        isinstance(func, ast.Attribute) and func.attr == "register_loss")


def _declaration(call: ast.Call, module: str, where: str) -> Declaration:
    try:
        name = ast.literal_eval(call.args[0])
        declared = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg not in NOT_TRAITS}
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{where}: @register_loss takes the loss name and its declarations as literals "
                         f"(learners/loss_traits.py reads them without importing torch): {exc}") from None
    return Declaration(str(name), module, LossTraits(**declared))  # type: ignore[arg-type]


def _declarations_in(path: Path) -> list[Declaration]:
    module = f"learners.losses.{path.stem}"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef):
            calls = [d for d in node.decorator_list if _is_register_call(d)]
            found += [_declaration(c, module, f"{path}:{c.lineno}") for c in calls]  # type: ignore[arg-type]
    return found


@lru_cache(maxsize=1)  # the source does not change while the process runs
def builtin_declarations() -> tuple[Declaration, ...]:
    """Every built-in loss's declaration, in module order (the order the registry registers them)."""
    return tuple(d for path in sorted(LOSSES_DIR.glob("*.py")) for d in _declarations_in(path))


def builtin_losses() -> dict[str, LossTraits]:
    """Built-in loss name -> its declarations."""
    return {d.name: d.traits for d in builtin_declarations()}


def builtin_loss_modules() -> list[str]:
    """The modules of learners/losses/ that register a loss (importing one registers its losses)."""
    return list(dict.fromkeys(d.module for d in builtin_declarations()))
