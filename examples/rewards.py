"""Reward functions of your own (README "Your own reward function"), named in a config as
`reward.train: examples.rewards:close_and_brief` and imported by each process that scores.

`close_and_brief` is called once per completion with the prompt (`prompt.text`; `prompt.meta` holds the row's
`reference` and `meta_columns`) and the completion's text, and returns a number. `exact_match` is in TRL's form
(GRPOTrainer's `reward_funcs`): one call per batch, the dataset's columns as keyword lists, with TRL's
`trainer_state`, `log_metric` and `log_extra`. Raising, or returning NaN or
something that is not a number, marks a completion's reward failed with the reason: it is never trained on
as a 0.
"""
from __future__ import annotations

import difflib
from typing import Callable

from async_rlhf.rollout import Prompt

EXTRA_CHARACTER_COST = 0.05  # per character past the reference's length


def close_and_brief(prompt: Prompt, text: str) -> float:
    """Partial credit for resembling the reference answer, less a little for every character too many."""
    answer, reference = text.strip(), str(prompt.meta["reference"]).strip()
    resemblance = difflib.SequenceMatcher(None, answer, reference, autojunk=False).ratio()
    return resemblance - EXTRA_CHARACTER_COST * max(0, len(answer) - len(reference))


def exact_match(prompts: list[str], completions: list[str], answer: list[str],
                log_metric: Callable[[str, float], None] | None = None, **kwargs: object) -> list[float]:
    """1.0 where the completion is the row's `answer`, else 0.0 (TRL's form: a batch at a time). `answer` is the
    dataset's column, given because the function names it; `log_metric` is TRL's, its values in metrics.jsonl as
    `reward_log/<name>` (a default keeps the function callable on its own)."""
    matches = [float(text.strip() == str(reference).strip()) for text, reference in zip(completions, answer)]
    if log_metric is not None:
        too_long = [len(text.strip()) > len(str(reference).strip()) for text, reference in zip(completions, answer)]
        log_metric("too_long", sum(too_long) / len(too_long))
    return matches
