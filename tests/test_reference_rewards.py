"""Rewards against a dataset's reference answer (reward_models/rules.py) and the eval win-rate against
the reference (async_rlhf/pipeline/evaluation.py), with hand-worked values."""
from __future__ import annotations

import pytest

from async_rlhf.pipeline.evaluation import reference_groups, win_rate
from async_rlhf.rollout import Completion, Prompt, RewardStatus, RolloutGroup
from reward_models.rules import SCORER_TASK, SCORERS, normalise
from reward_models.service import RewardService


def prompt(reference: str | None, prompt_id: int = 0) -> Prompt:
    return Prompt(prompt_id, "q", [1], {} if reference is None else {"reference": reference})


@pytest.mark.parametrize(("scorer", "reference", "text", "value"), [
    ("reference_exact", "Paris.", "  paris</s>", 1.0),
    ("reference_exact", "Paris", "Paris, France", 0.0),
    ("reference_contains", "Paris", "It is Paris, France.", 1.0),
    ("reference_contains", "par", "It is Paris", 0.0),  # whole words only
    ("reference_final", "3+4=7\n#### 7", "3+4=8\n8-1=7\n#### 7", 1.0),  # GSM8K: only the final answer counts
    ("reference_final", "#### 7", "the answer is\n7", 1.0),  # no "####": the last line
    ("reference_final", "#### 7", "#### 17", 0.0),
    ("reference_similarity", "1234", "1243", 0.75),  # difflib: 2 * 3 matching / 8 characters
    ("reference_similarity", "1234", "1234", 1.0),
    ("reference_similarity", "1234", "", 0.0),
])
def test_reference_scorers(scorer: str, reference: str, text: str, value: float) -> None:
    assert SCORERS[scorer](prompt(reference), text) == pytest.approx(value)
    assert SCORER_TASK[scorer] == "dataset"


def test_normalise() -> None:
    assert normalise("  The  Answer: 42!\n") == "the answer 42"


def test_a_row_without_reference_is_a_failed_reward_not_zero() -> None:
    group = RolloutGroup(prompt(None), [Completion([5], "x", [-1.0], "stop")], 0, 0, 0.0)
    [scored] = RewardService({"gold": "reference_exact"}).score([group], "gold")
    assert scored.completions[0].reward_status == "failed" and scored.completions[0].reward is None


def scored_group(prompt_id: int, reward: float | None, reference: str | None = "ref") -> RolloutGroup:
    status: RewardStatus = "ok" if reward is not None else "failed"
    completion = Completion([5], "x", [-1.0], "stop", reward, status)
    return RolloutGroup(prompt(reference, prompt_id), [completion], 3, 0, 0.0)


def test_reference_groups_hold_the_reference_as_a_completion() -> None:
    groups = reference_groups([scored_group(0, 0.5), scored_group(1, 0.5, reference=None)])
    assert [(g.prompt.prompt_id, g.completions[0].text, g.completions[0].reward_status) for g in groups] == [
        (0, "ref", "pending")]


def test_win_rate_counts_ties_half_and_skips_unscored() -> None:
    samples = [scored_group(0, 0.9), scored_group(1, 0.5), scored_group(2, 0.1), scored_group(3, None)]
    references = [scored_group(0, 0.5), scored_group(1, 0.5), scored_group(2, 0.5), scored_group(3, 0.5)]
    assert win_rate(samples, references) == pytest.approx((1 + 0.5 + 0) / 3)
    assert win_rate(samples, []) is None
