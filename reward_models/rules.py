"""Programmatic scorers for the sort task: a partial-credit proxy and an exact gold reward.

Both take the prompt (its `meta["answer"]` is the sorted digits) and the completion text as
decoded with special tokens skipped. They never raise on garbage: anything that is not the
answer just earns less. The proxy's unique maximum (1.0) is the exact answer, so optimising
the proxy also drives the gold reward up; the gap between them is what makes it a proxy.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from async_rlhf.rollout import Prompt

Scorer = Callable[[Prompt, str], float]

# Weights of the proxy's parts; they sum to 1 so the exact answer scores exactly 1.0.
W_POSITIONS = 0.6  # share of positions that hold the right digit
W_MULTISET = 0.2  # the output is a permutation of the input digits (nothing dropped/added)
W_ORDERED = 0.2  # the output is non-empty, all digits and non-decreasing


def _clean(text: str) -> str:
    # Tolerate surrounding whitespace and a literal EOS marker from decoders that keep specials.
    return text.strip().removesuffix("</s>").strip()


def _answer(prompt: Prompt) -> str:
    return str(prompt.meta["answer"])


def position_score(out: str, answer: str) -> float:
    """Matches at equal positions over the longer length, so extra or missing digits cost."""
    longest = max(len(out), len(answer))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(out, answer)) / longest


def is_ordered(out: str) -> bool:
    return bool(out) and out.isascii() and out.isdigit() and list(out) == sorted(out)


def sort_partial(prompt: Prompt, text: str) -> float:
    """Proxy reward in [0, 1]: 0.6 * position matches + 0.2 * same multiset + 0.2 * sorted digits."""
    out, answer = _clean(text), _answer(prompt)
    score = W_POSITIONS * position_score(out, answer)
    score += W_MULTISET * (Counter(out) == Counter(answer))
    score += W_ORDERED * is_ordered(out)
    return float(score)


def sort_exact(prompt: Prompt, text: str) -> float:
    """Gold reward: 1.0 iff the completion is exactly the sorted digits, else 0.0."""
    return 1.0 if _clean(text) == _answer(prompt) else 0.0


SCORERS: dict[str, Scorer] = {"sort_partial": sort_partial, "sort_exact": sort_exact}
