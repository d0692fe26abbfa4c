"""Reward functions of your own (README "Your own reward function"), named in a config as
`reward.train: examples.rewards:close_and_brief` and imported by each process that scores.

`close_and_brief` is called once per completion with the prompt (`prompt.text`; `prompt.meta` holds the row's
`reference` and `meta_columns`) and the completion's text, and returns a number. `exact_match` is in TRL's form
(GRPOTrainer's `reward_funcs`): one call per batch, the columns as keyword lists. Raising, or returning NaN or
something that is not a number, marks a completion's reward failed with the reason: it is never trained on
as a 0.
"""
from __future__ import annotations

import difflib

from async_rlhf.rollout import Prompt

EXTRA_CHARACTER_COST = 0.05  # per character past the reference's length


def close_and_brief(prompt: Prompt, text: str) -> float:
    """Partial credit for resembling the reference answer, less a little for every character too many."""
    answer, reference = text.strip(), str(prompt.meta["reference"]).strip()
    resemblance = difflib.SequenceMatcher(None, answer, reference, autojunk=False).ratio()
    return resemblance - EXTRA_CHARACTER_COST * max(0, len(answer) - len(reference))


def exact_match(prompts: list[str], completions: list[str], reference: list[str], **kwargs: object) -> list[float]:
    """1.0 where the completion is the reference answer, else 0.0 (TRL's form: a batch at a time)."""
    return [float(text.strip() == str(answer).strip()) for text, answer in zip(completions, reference)]
