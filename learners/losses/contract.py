"""What a loss must return, checked at every call: `(loss, metrics)`, the loss a 0-d float tensor with a
gradient, the metrics a dict of numbers.

A loss of the user's own (`loss.import_path`) that returned a float, a vector, a detached tensor or a tensor
among its metrics failed the run with a line from the learner's own code ("'float' object has no attribute
'detach'", "iteration over a 0-d tensor", "can't multiply sequence by non-int of type 'float'"), which named
neither the loss nor what it should return. Now the line says both. A 0-d tensor among the metrics is taken
as its number: that is what a user computing a metric from tensors has at hand.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NoReturn

import torch

CONTRACT = ("a loss returns (loss, metrics): loss a 0-d float tensor with a gradient (reduced from inputs.logps, "
            "not detached), metrics a dict of numbers (docs/losses.md)")


class LossContractError(TypeError):
    """A loss returned something the learner cannot train on; the message names the loss and the fix."""


def loss_call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`; its `sys.exit()` is a LossContractError naming it (in a Ray actor, SystemExit ends the actor: the
    learner was restarted as if it had crashed, learner.max_restarts times, with no word of the loss)."""
    try:
        return fn(*args)
    except SystemExit as exc:
        _refuse(name, f"called sys.exit({exc.code!r})")


def loss_result(name: str, result: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """`result` of loss `name` as (loss, metrics of floats), or LossContractError saying what is wrong."""
    if not isinstance(result, tuple) or len(result) != 2:
        _refuse(name, f"returned {_described(result)} instead of a (loss, metrics) pair")
    loss, metrics = result
    return _checked_loss(name, loss), _checked_metrics(name, metrics)


def _checked_loss(name: str, loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        _refuse(name, f"returned {_described(loss)} as its loss")
    if loss.ndim != 0:
        _refuse(name, f"returned a loss of shape {tuple(loss.shape)}; reduce it to one number (e.g. .mean())")
    if not loss.is_floating_point():
        _refuse(name, f"returned a loss of dtype {loss.dtype}")
    if not loss.requires_grad:
        _refuse(name, "returned a loss without a gradient (detached, or not computed from inputs.logps)")
    return loss


def _checked_metrics(name: str, metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        _refuse(name, f"returned {_described(metrics)} as its metrics")
    return {str(key): _number(name, key, value) for key, value in metrics.items()}


def _number(name: str, key: Any, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, numbers.Real):
        return float(value)
    _refuse(name, f"returned metric '{key}' as {_described(value)}")


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _refuse(name: str, problem: str) -> NoReturn:
    raise LossContractError(f"loss '{name}' {problem}; {CONTRACT}")
