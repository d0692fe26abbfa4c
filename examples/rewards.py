"""A reward function of your own (README "Your own reward function"), named in a config as
`reward.train: examples.rewards:close_and_brief` and imported by each process that scores.

It is called once per completion with the prompt (`prompt.text`; `prompt.meta` holds the row's
`reference` and `meta_columns`) and the completion's text, and returns a number. Raising, or returning
NaN or something that is not a number, marks that completion's reward failed with the reason: it is
never trained on as a 0.
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
