"""Your own reward function: a scorer given as "pkg.module:function" where a registered scorer's name goes
(`reward.train`, `reward.gold`, `async-rlhf serve-reward`), in one of two forms:

* `fn(prompt, text) -> float`, called once per completion: `prompt.text` is the prompt as the policy saw it and
  `prompt.meta` its data (a dataset's `reference` and `meta_columns`, the embedded tasks' `answer`); `text` is
  the completion, decoded without special tokens;
* TRL's form, `fn(prompts, completions, **kwargs) -> list[float]`, called once per batch (its first two
  parameters are named so): the prompts' and completions' texts, and each `prompt.meta` key as a keyword
  argument holding one value per completion (TRL passes a dataset's columns the same way), where the function
  takes it. A reward function written for TRL's GRPOTrainer works as it is (on plain-text prompts).

Either is called in the process that scores (the generator's call, the reward actor, the reward server) and
returns numbers, higher is better. An exception, a non-finite value or anything that is not a number marks the
completion's reward failed, with the reason, never 0 (reward_models/service.py); `reward.max_failed_steps`
steps in a row without a usable reward stop the run.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from async_rlhf.rollout import Prompt
from async_rlhf.user_code import UserCodeError, check_signature, is_import_path, load_function
from reward_models.rules import SCORERS, Scorer

ARGUMENTS = ("prompt", "text")
BATCH_ARGUMENTS = ("prompts", "completions")


class BatchedReward:
    """A TRL-style reward function, called once per batch; `__call__` checks only the answer's shape (one value
    per completion): each value is checked as a single scorer's is."""

    def __init__(self, fn: Callable[..., Any], path: str) -> None:
        self.fn, self.path = fn, path
        parameters = inspect.signature(fn).parameters.values()
        self.any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self.keywords = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[Any]:
        keys = {key for p in prompts for key in p.meta} - set(BATCH_ARGUMENTS)
        taken = {key: [p.meta.get(key) for p in prompts] for key in keys if self.any_keyword or key in self.keywords}
        values = self.fn(prompts=[p.text for p in prompts], completions=texts, **taken)
        if not isinstance(values, (list, tuple)) or len(values) != len(texts):
            shown = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TypeError(f"'{self.path}' returned {shown} for {len(texts)} completions; a batched reward returns "
                            "a list with one number per completion")
        return list(values)


class CombinedReward:
    """Several rewards summed with weights (`reward.train` as a list, TRL's `reward_weights`): a completion's
    reward is the weighted sum where every part scored it, and failed, naming the part, where one did not."""

    def __init__(self, parts: list[tuple[str, Scorer | BatchedReward, float]]) -> None:
        self.parts = parts

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        """The sums for a batch (the TRL benchmark arm's use; a part's exception propagates)."""
        columns = [[weight * float(v) for v in as_batch(part)(prompts, texts)] for _, part, weight in self.parts]
        return [sum(values) for values in zip(*columns)]


ScorerSpec = str | list[tuple[str, float]]  # a name, or (name, weight) pairs to sum


def resolve_scorer(spec: ScorerSpec, key: str) -> Scorer | BatchedReward | CombinedReward:
    """The scorer a name gives, or the weighted sum of several (CombinedReward)."""
    if isinstance(spec, str):
        return resolve_one(spec, key)
    return CombinedReward([(name, resolve_one(name, key), weight) for name, weight in spec])


def resolve_one(name: str, key: str) -> Scorer | BatchedReward:
    """The registered scorer `name`, or the user's function it names (BatchedReward in TRL's form);
    UserCodeError (one line, starting with `key`) for anything else."""
    if name in SCORERS:
        return SCORERS[name]
    if is_import_path(name):
        fn = load_function(name, key, None)
        if is_batched(fn):  # its other parameters are the prompts' columns, known only at the call
            return BatchedReward(fn, name)
        check_signature(fn, name, key, ARGUMENTS)
        return fn
    raise UserCodeError(f"{key}: unknown scorer '{name}'; valid: {', '.join(sorted(SCORERS))}, or "
                        f"'pkg.module:function' of your own (fn(prompt, text) -> float, or TRL's "
                        "fn(prompts, completions, **kwargs) -> list[float])")


def as_batch(scorer: Scorer | BatchedReward | CombinedReward) -> Callable[[list[Prompt], list[str]], list[Any]]:
    """Any of them as one call over a batch (the reward server's and the TRL benchmark arm's use)."""
    if isinstance(scorer, (BatchedReward, CombinedReward)):
        return scorer
    return lambda prompts, texts: [scorer(p, t) for p, t in zip(prompts, texts)]


def is_batched(fn: Callable[..., Any]) -> bool:
    """TRL's form: the first two parameters are `prompts` and `completions`."""
    try:
        names = tuple(inspect.signature(fn).parameters)[:2]
    except (TypeError, ValueError):
        return False
    return names == BATCH_ARGUMENTS
