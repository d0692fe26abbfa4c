"""Programmatic scorers for the embedded tasks: a partial-credit proxy and an exact gold reward each.

sort: `sort_partial`, `sort_exact`; arith: `arith_partial`, `arith_exact`; your own dataset (its
reference column, `meta["reference"]`): `reference_exact`, `reference_contains`, `reference_final`
(GSM8K-style final answers) and `reference_similarity` (partial credit); any text: `vader_compound`
(sentiment, the gold reward of configs/smollm2_gold_proxy.yaml). Every scorer takes the
prompt (its `meta["answer"]` is the answer; arith's `meta["solution"]` the worked solution) and the
completion text as decoded with special tokens skipped. They never raise on garbage: anything that is not the
answer just earns less. The proxy's unique maximum (1.0) is the exact answer, so optimising
the proxy also drives the gold reward up; the gap between them is what makes it a proxy.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

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


# --- arith: GSM8K's format, "3+4=7\n7-2=5\n#### 5" ------------------------------------------------

ANSWER_MARK = "####"
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only
W_STEPS = 0.5  # arith_partial: share of the worked solution's lines reproduced at their positions
W_ANSWER = 0.5  # arith_partial: the final answer is exact


def final_answer(text: str) -> str | None:
    """What follows the first "####", stripped; None when there is no "####"."""
    _, mark, rest = _clean(text).partition(ANSWER_MARK)
    return rest.strip() if mark else None


def arith_exact(prompt: Prompt, text: str) -> float:
    """Gold reward: 1.0 iff the text after "####" is exactly the answer's integer, else 0.0."""
    got = final_answer(text)
    return 1.0 if got is not None and _INTEGER.fullmatch(got) and int(got) == int(_answer(prompt)) else 0.0


def step_lines(text: str) -> list[str]:
    """The non-empty stripped lines before the "####" line (all of them when there is none)."""
    body = _clean(text).partition(ANSWER_MARK)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def arith_partial(prompt: Prompt, text: str) -> float:
    """Proxy reward in [0, 1]: 0.5 * matching step lines (over the longer count) + 0.5 * exact answer."""
    got, gold = step_lines(text), step_lines(str(prompt.meta["solution"]))
    longest = max(len(got), len(gold))
    steps = sum(a == b for a, b in zip(got, gold)) / longest if longest else 1.0
    return float(W_STEPS * steps + W_ANSWER * arith_exact(prompt, text))


# --- dataset: compare with the row's reference answer (task.dataset.reference_column) -----------

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (SQuAD's answer normalisation, minus articles)."""
    return " ".join(_PUNCT.sub(" ", _clean(text).lower()).split())


def _reference(prompt: Prompt) -> str:
    return normalise(str(prompt.meta["reference"]))  # KeyError (a failed reward) when the row has none


def reference_exact(prompt: Prompt, text: str) -> float:
    """1.0 iff the completion equals the reference after normalisation, else 0.0."""
    return 1.0 if normalise(text) == _reference(prompt) else 0.0


def reference_contains(prompt: Prompt, text: str) -> float:
    """1.0 iff the normalised reference occurs in the normalised completion, as whole words."""
    return 1.0 if f" {_reference(prompt)} " in f" {normalise(text)} " else 0.0


def final_line(text: str) -> str:
    """What follows the last "####" (GSM8K), else the last non-empty line."""
    body = _clean(text)
    if ANSWER_MARK in body:
        return body.rpartition(ANSWER_MARK)[2]
    lines = [line for line in body.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def reference_final(prompt: Prompt, text: str) -> float:
    """1.0 iff the final answers agree (after "####" or on the last line, in both), else 0.0."""
    return 1.0 if normalise(final_line(text)) == normalise(final_line(str(prompt.meta["reference"]))) else 0.0


def reference_similarity(prompt: Prompt, text: str) -> float:
    """Partial credit in [0, 1]: difflib's ratio of the normalised strings; 1.0 only for a match."""
    return difflib.SequenceMatcher(None, normalise(text), _reference(prompt), autojunk=False).ratio()


# --- free text: a fixed sentiment scorer, the gold reward of the gold/proxy pipeline -------------

@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(prompt: Prompt, text: str) -> float:
    """VADER's compound sentiment of the completion, in [-1, 1] (lexicon and rules; offline, deterministic)."""
    return float(_vader().polarity_scores(_clean(text))["compound"])


@dataclass(frozen=True)
class Rule:
    """A registered scorer: its function, the task it scores (the config checks reward.* against task.name)
    and whether it compares with the prompt's reference answer (the config then needs a reference column)."""

    fn: Scorer
    task: str
    needs_reference: bool = False


# The registry of rule scorers; the views below (and the config's reward.* choices) are derived from it.
RULES: dict[str, Rule] = {
    "sort_partial": Rule(sort_partial, "sort"), "sort_exact": Rule(sort_exact, "sort"),
    "arith_partial": Rule(arith_partial, "arith"), "arith_exact": Rule(arith_exact, "arith"),
    "reference_exact": Rule(reference_exact, "dataset", True),
    "reference_contains": Rule(reference_contains, "dataset", True),
    "reference_final": Rule(reference_final, "dataset", True),
    "reference_similarity": Rule(reference_similarity, "dataset", True),
    "vader_compound": Rule(vader_compound, "dataset"),
}
SCORERS: dict[str, Scorer] = {name: rule.fn for name, rule in RULES.items()}
SCORER_TASK: dict[str, str] = {name: rule.task for name, rule in RULES.items()}
NEEDS_REFERENCE = frozenset(name for name, rule in RULES.items() if rule.needs_reference)
