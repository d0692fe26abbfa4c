"""VinePPO's Monte Carlo estimator (learners/advantages/monte_carlo.py) on hand-built token ids, with the
numbers worked out in comments.

Token ids used throughout: NL = 9 is the step delimiter (newline), EOS = 2, everything else is
an ordinary token. The prompt P = (1, 5, 6) is BOS and two characters.
"""
from __future__ import annotations

import pytest

from learners.advantages.monte_carlo import (
    MCStates,
    State,
    StepSplit,
    batch_advantages,
    delimiter_splitter,
    gather_states,
    mc_value,
    split_response,
    step_advantages,
    step_states,
    token_advantages,
)
from tests.helpers import token_ids

NL, EOS = 9, 2
P = (1, 5, 6)
split_nl = delimiter_splitter([NL])


# --- the step splitter ---------------------------------------------------------------------------

def test_splitter_multi_step_keeps_newline_and_eos_in_their_steps() -> None:
    # "ab\n" "c\n" "d</s>": steps end after each newline; the last step runs to the end, EOS included.
    assert split_nl([10, 11, NL, 12, NL, 13, EOS]) == [3, 5, 7]


def test_splitter_one_step() -> None:
    assert split_nl([13, EOS]) == [2]  # no newline at all: one step, EOS included
    assert split_nl([13]) == [1]


def test_splitter_truncated_without_eos() -> None:
    # Cut off by max_new_tokens mid-step: the partial last step still counts as a step.
    assert split_nl([10, 11, NL, 12]) == [3, 4]
    # Cut off right after a newline: no empty trailing step.
    assert split_nl([10, 11, NL, 12, NL]) == [3, 5]


def test_splitter_edge_cases() -> None:
    assert split_nl([]) == []  # empty completion: no steps
    assert split_nl([NL]) == [1]
    assert split_nl([NL, NL, EOS]) == [1, 2, 3]  # blank lines are steps of one token
    assert split_nl([EOS]) == [1]  # EOS straight away: one step
    assert delimiter_splitter([])([10, NL, 11]) == [3]  # no delimiters: the whole completion is one step
    assert delimiter_splitter([NL, 7])([10, 7, 11, NL]) == [2, 4]  # several delimiter ids


def test_step_split_validates_its_ends() -> None:
    assert split_response(P, [10, NL, EOS], split_nl).ends == (2, 3)
    with pytest.raises(ValueError, match="must increase strictly"):
        StepSplit(P, (10, NL, EOS), (2, 2, 3))
    with pytest.raises(ValueError, match="end at 3"):
        StepSplit(P, (10, NL, EOS), (2,))
    with pytest.raises(ValueError, match="at least one step"):
        StepSplit(P, (10,), ())


# --- states and deduplication --------------------------------------------------------------------

def test_states_of_one_response() -> None:
    split = split_response(P, [10, 11, NL, 12, NL, 13, EOS], split_nl, policy_version=3)
    states = step_states(split)
    # S = 3 steps -> s_0 = P, s_1 = P + "ab\n", s_2 = P + "ab\n" "c\n"; the terminal state is left out.
    assert [s.prefix_ids for s in states] == [(), (10, 11, NL), (10, 11, NL, 12, NL)]
    assert all(s.prompt_ids == P and s.policy_version == 3 for s in states)
    assert states[2].token_ids == [1, 5, 6, 10, 11, NL, 12, NL]
    assert states[2].remaining_tokens(12) == 7  # 12 - 5 prefix tokens
    assert step_states(split_response(P, [13, EOS], split_nl)) == [State(0, P, ())]  # one step: only s_0
    assert step_states(split_response(P, [], split_nl)) == []  # empty: nothing to estimate


def hand_batch() -> list[StepSplit]:
    return [
        split_response(P, [10, 11, NL, 12, NL, 13, EOS], split_nl),  # a: 3 steps
        split_response(P, [10, 11, NL, 14, EOS], split_nl),  # b: same first line as a
        split_response(P, [13, EOS], split_nl),  # c: one step
        split_response(P, [10, 11, NL, 12], split_nl),  # d: truncated, no EOS; same first line again
    ]


def test_gather_dedups_shared_prefixes() -> None:
    mc = gather_states(hand_batch())
    # Unique states: 0 = s_0 (all four share it), 1 = P + "ab\n" (a, b, d), 2 = P + "ab\n" "c\n" (a only).
    assert [s.prefix_ids for s in mc.states] == [(), (10, 11, NL), (10, 11, NL, 12, NL)]
    assert mc.index == [[0, 1, 2], [0, 1], [0], [0, 1]]
    assert mc.owner == [0, 0, 0]  # response a introduced all three (its Prompt scores their rollouts)
    # 4 responses with 3 + 2 + 1 + 2 = 8 states need only 3 estimates.
    assert sum(len(row) for row in mc.index) == 8 and len(mc.states) == 3


def test_gather_keeps_apart_other_prompts_and_other_versions() -> None:
    splits = [
        split_response(P, [10, NL, EOS], split_nl, policy_version=1),
        split_response((1, 5, 7), [10, NL, EOS], split_nl, policy_version=1),  # another prompt
        split_response(P, [10, NL, EOS], split_nl, policy_version=2),  # same ids, newer weights
        split_response(P, [10, NL, 13, EOS], split_nl, policy_version=1),  # shares a's s_0 and s_1
    ]
    mc = gather_states(splits)
    assert mc.index == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert mc.owner == [0, 0, 1, 1, 2, 2]
    assert gather_states([]) == MCStates()
    assert gather_states([split_response(P, [], split_nl)]).index == [[]]  # an empty completion has no states


# --- values and advantages -----------------------------------------------------------------------

def test_mc_value_is_the_mean_continuation_reward() -> None:
    assert mc_value([1.0, 0.0, 0.0, 1.0]) == 0.5
    assert mc_value([0.25]) == 0.25
    with pytest.raises(ValueError, match="at least one"):
        mc_value([])


def test_step_advantages_hand_worked() -> None:
    # V(s_0) = 0.5, V(s_1) = 0.75, V(s_2) = 1.0, R = 1:
    # A_0 = 0 + 0.75 - 0.5 = 0.25, A_1 = 0 + 1.0 - 0.75 = 0.25, A_2 = 1 + 0 - 1.0 = 0.
    assert step_advantages([0.5, 0.75, 1.0], 1.0) == [0.25, 0.25, 0.0]
    # Same states, R = 0: the last step's A_2 = 0 + 0 - 1.0 = -1.
    assert step_advantages([0.5, 0.75, 1.0], 0.0) == [0.25, 0.25, -1.0]
    # One step: A_0 = R - V(s_0).
    assert step_advantages([0.25], 1.0) == [0.75]
    assert step_advantages([0.25], 0.0) == [-0.25]
    assert step_advantages([], 1.0) == []


def test_step_advantages_telescope_to_reward_minus_start_value() -> None:
    values, reward = [0.1, 0.7, 0.4, 0.9], 1.0
    assert sum(step_advantages(values, reward)) == pytest.approx(reward - values[0])


def test_token_advantages_expand_each_step() -> None:
    # Steps [0, 3), [3, 5), [5, 7) take 0.25, 0.25 and 0.
    assert token_advantages([3, 5, 7], [0.25, 0.25, 0.0]) == [0.25] * 5 + [0.0] * 2
    assert token_advantages([2], [-0.5]) == [-0.5, -0.5]
    assert token_advantages([], []) == []
    with pytest.raises(ValueError, match="2 steps but 1"):
        token_advantages([1, 2], [0.5])


def test_batch_advantages_with_shared_prefixes_hand_worked() -> None:
    splits = hand_batch()
    mc = gather_states(splits)
    values = [0.5, 0.75, 1.0]  # V of the unique states: s_0, P + "ab\n", P + "ab\n" "c\n"
    rewards = [1.0, 0.0, 0.0, 0.0]  # a right; b, c, d wrong (d truncated)
    out = batch_advantages(splits, mc, values, rewards)
    # a: A = [0.75 - 0.5, 1.0 - 0.75, 1 - 1.0] = [0.25, 0.25, 0] over steps of 3, 2, 2 tokens.
    assert out[0] == [0.25, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0]
    # b: A = [0.75 - 0.5, 0 - 0.75] = [0.25, -0.75] over steps of 3 and 2 tokens (the shared s_1's value).
    assert out[1] == [0.25, 0.25, 0.25, -0.75, -0.75]
    # c: one step, A_0 = 0 - 0.5 = -0.5 on both tokens.
    assert out[2] == [-0.5, -0.5]
    # d: truncated with no EOS, reward 0: A = [0.25, 0 - 0.75]; the partial step (one token) takes -0.75.
    assert out[3] == [0.25, 0.25, 0.25, -0.75]
    assert [len(adv) for adv in out] == [len(s.token_ids) for s in splits]  # aligned with Completion.token_ids


def test_batch_advantages_checks_lengths() -> None:
    splits = hand_batch()
    mc = gather_states(splits)
    with pytest.raises(ValueError, match="one value per unique state"):
        batch_advantages(splits, mc, [0.5, 0.75], [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="one reward per response"):
        batch_advantages(splits, mc, [0.5, 0.75, 1.0], [1.0])


def test_arith_solution_splits_into_its_lines() -> None:
    from async_rlhf.policies.embedded import build_tokenizer
    from async_rlhf.tasks.builtin import ArithTask

    tok = build_tokenizer("arith")
    splitter = delimiter_splitter(token_ids(tok, list(ArithTask.step_end_chars)))
    ids = token_ids(tok, list("3+4=7\n7-2=5\n#### 5")) + [tok.eos_token_id]
    ends = splitter(ids)
    assert ends == [6, 12, 19]  # "3+4=7\n" | "7-2=5\n" | "#### 5</s>"
    assert tok.decode(ids[ends[0]:ends[1]]) == "7-2=5\n"
