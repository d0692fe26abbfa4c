"""Your own reward function: a scorer given as "pkg.module:function" where a registered scorer's name goes
(`reward.train`, `reward.gold`, `async-rlhf serve-reward`).

It is called `fn(prompt, text)` once per completion, in the process that scores (the generator's call, the
reward actor, the reward server), and returns a number: higher is better. `prompt.text` is the prompt as the
policy saw it and `prompt.meta` its data (a dataset's `reference` and `meta_columns`, the embedded tasks'
`answer`); `text` is the completion, decoded without special tokens. An exception, a non-finite value or
anything that is not a number marks that completion's reward failed, with the reason, never 0
(reward_models/service.py); `reward.max_failed_steps` steps in a row without a usable reward stop the run.
"""
from __future__ import annotations

from async_rlhf.user_code import UserCodeError, is_import_path, load_function
from reward_models.rules import SCORERS, Scorer

ARGUMENTS = ("prompt", "text")


def resolve_scorer(name: str, key: str) -> Scorer:
    """The registered scorer `name`, or the user's function it names; UserCodeError (one line, starting with
    `key`) for anything else."""
    if name in SCORERS:
        return SCORERS[name]
    if is_import_path(name):
        return load_function(name, key, ARGUMENTS)
    raise UserCodeError(f"{key}: unknown scorer '{name}'; valid: {', '.join(sorted(SCORERS))}, or "
                        f"'pkg.module:function' of your own (called fn(prompt, text) -> float)")
