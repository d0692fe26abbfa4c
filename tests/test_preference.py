"""The one best/worst pair picker (learners/preference.py) and its tie rule, as both of its users see it."""
from __future__ import annotations

from async_rlhf.cli.pairs import pair_record
from async_rlhf.rollout import Completion, Prompt, RolloutGroup
from learners.losses import select_pairs
from learners.preference import best_and_worst


def scored(text: str, reward: float) -> Completion:
    return Completion([len(text)], text, [-1.0], "stop", reward=reward, reward_status="ok")


def test_ties_take_the_first_of_equal_rewards_for_best_and_worst() -> None:
    a, b, c, d = scored("a", 0.5), scored("b", 0.9), scored("c", 0.9), scored("d", 0.5)
    assert best_and_worst([a, b, c, d]) == (b, a)


def test_a_pair_needs_a_difference_above_the_margin() -> None:
    low, high = scored("low", 0.25), scored("high", 0.75)
    assert best_and_worst([low, high]) == (high, low)
    assert best_and_worst([low, high], min_margin=0.5) is None  # 0.5 is not above 0.5
    assert best_and_worst([low, scored("same", 0.25)]) is None  # equal rewards: no preference
    assert best_and_worst([high]) is None


def test_the_dpo_selector_and_sample_pairs_pick_the_same_pair() -> None:
    group = RolloutGroup(Prompt(3, "p", [1], {}), [scored("x", 0.1), scored("y", 0.7), scored("z", 0.7)], 0, 0, 0.0)
    pairs, _ = select_pairs([group])
    record = pair_record(group, min_margin=0.0)
    assert record is not None
    assert (pairs[0].chosen.text, pairs[0].rejected.text) == (record["chosen"], record["rejected"]) == ("y", "x")
