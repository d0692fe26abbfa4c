"""Micro-batching by tokens (learner.max_tokens_per_micro_batch): the splitter by hand, then the
learner on the tiny Llama of test_learner.py: same update as one micro-batch, non-finite passes."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from async_rlhf.rollout import RolloutGroup
from learners.learner import Learner
from learners.losses import get_loss
from learners.micro_batches import GroupSize, padded_tokens, split_by_tokens, split_further, sum_stats
from tests.helpers import present
from tests.test_learner import build_model_dir, make_cfg, params_snapshot, synthetic_groups

# ------------------------------------------------------------------ the splitter (no model)


def sizes(*pairs: tuple[int, int]) -> list[GroupSize]:
    return [GroupSize(rows, width) for rows, width in pairs]


def test_padded_tokens_is_rows_times_longest_row() -> None:
    assert padded_tokens(sizes((2, 10), (4, 7), (0, 0))) == 6 * 10
    assert padded_tokens([]) == 0


def test_split_keeps_chunks_under_budget_in_order() -> None:
    # costs alone: 20, 22, 24, 26 (DPO rows of synthetic_groups); two groups with no rows (tie, failure)
    groups = sizes((2, 10), (2, 11), (2, 12), (2, 13), (0, 0), (0, 0))
    assert split_by_tokens(groups, 50) == [range(0, 2), range(2, 3), range(3, 6)]  # 44 | 24 | 26
    assert split_by_tokens(groups, None) == [range(0, 6)]
    assert split_by_tokens(groups, 10**6) == [range(0, 6)]
    assert split_by_tokens(groups, 1) == [range(0, 1), range(1, 2), range(2, 3), range(3, 6)]


def test_groups_without_rows_never_start_a_chunk() -> None:
    groups = sizes((0, 0), (3, 5), (0, 0), (3, 5), (0, 0))
    assert split_by_tokens(groups, 15) == [range(0, 3), range(3, 5)]  # rows-less ones ride along
    assert split_by_tokens(sizes((0, 0), (0, 0)), 1) == [range(0, 2)]  # nothing to train: one chunk
    assert split_by_tokens([], 10) == [range(0, 0)]


def test_a_group_over_budget_is_its_own_chunk() -> None:
    groups = sizes((1, 4), (8, 50), (1, 4))
    assert split_by_tokens(groups, 100) == [range(0, 1), range(1, 2), range(2, 3)]


def test_split_further_cuts_the_largest_chunk_evenly() -> None:
    groups = sizes((1, 10), (1, 10), (1, 10), (1, 10), (2, 5))
    chunks = split_by_tokens(groups, None)
    assert padded_tokens(groups) == 60
    assert split_further(groups, chunks, 2) == [range(0, 3), range(3, 5)]  # 30 | 30
    assert split_further(groups, chunks, 3) == [range(0, 1), range(1, 3), range(3, 5)]  # tie: the first cut
    assert split_further(groups, chunks, 5) == [range(i, i + 1) for i in range(5)]


def test_split_further_stops_when_no_chunk_can_be_cut() -> None:
    groups = sizes((2, 5), (0, 0), (2, 5))
    assert split_further(groups, [range(0, 3)], 4) == [range(0, 2), range(2, 3)]  # the caller pads to 4


def test_stats_of_micro_batches_equal_whole_selection() -> None:
    spec = get_loss("online_dpo")
    groups = synthetic_groups()
    chunks = split_by_tokens([GroupSize.of(spec.select([g])) for g in groups], 50)
    assert len(chunks) == 3
    parts = [spec.select(groups[c.start:c.stop]) for c in chunks]
    assert sum_stats(parts) == spec.select(groups).stats == {"pairs": 4, "skipped_ties": 1, "skipped_failed": 1}


# ------------------------------------------------------------------ the learner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


def cfg_with_budget(loss: str, stage: int, budget: int | None):
    cfg = make_cfg(zero_stage=stage, loss=loss)
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"max_tokens_per_micro_batch": budget})})


@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize(("loss", "budget", "expected_micro_batches"),
                         [("online_dpo", 50, 3), ("rloo", 50, 5), ("grpo", 90, 3)])
def test_micro_batches_give_the_whole_batch_update(model_dir, stage, loss, budget, expected_micro_batches):
    """Row-mean losses: accumulating row-weighted micro-batch gradients is the whole step's gradient.

    AdamW's first step is lr * g / (|g| + eps): about lr * sign(g), so a rounding-level difference
    in a near-zero gradient element can flip a whole lr-sized step. A large eps makes the step
    linear in small gradients, so comparing the weights compares the gradients."""
    whole = Learner(cfg_with_budget(loss, stage, None), str(model_dir), threads=2)
    split = Learner(cfg_with_budget(loss, stage, budget), str(model_dir), threads=2)
    for learner in (whole, split):
        for group in learner.engine.optimizer.param_groups:
            group["eps"] = 1e-2
    want, got = whole.train_step(synthetic_groups()), split.train_step(synthetic_groups())
    assert (want["micro_batches"], got["micro_batches"]) == (1, expected_micro_batches)
    assert got["optimizer_step"] == 1 and got["nonfinite"] == 0 and got["nonfinite_micro_batches"] == 0
    for key in ("pairs", "skipped_ties", "skipped_failed", "groups", "samples", "train_tokens"):
        assert got.get(key) == want.get(key), key
    assert got["forward_tokens"] == want["forward_tokens"]  # real tokens; only padding differs
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    expected = whole.policy.state_dict()
    for name, tensor in split.policy.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name


def nan_reward_groups() -> list[RolloutGroup]:
    """synthetic_groups with one reward of group 1 NaN: its RLOO advantages, so its loss, are NaN."""
    groups = synthetic_groups()
    bad = groups[1]
    comps = [dataclasses.replace(c, reward=math.nan) if k == 2 else c for k, c in enumerate(bad.completions)]
    groups[1] = dataclasses.replace(bad, completions=comps)
    return groups


@pytest.mark.integration
def test_a_nonfinite_micro_batch_is_left_out_and_the_rest_train(model_dir):
    learner = Learner(cfg_with_budget("rloo", 2, 50), str(model_dir), threads=2)
    before = params_snapshot(learner)
    metrics = learner.train_step(nan_reward_groups())
    assert (metrics["micro_batches"], metrics["nonfinite_micro_batches"]) == (5, 1)
    assert metrics["nonfinite"] == 1 and metrics["optimizer_step"] == 1 and math.isnan(metrics["loss"])
    after = learner.policy.state_dict()
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.integration
def test_all_micro_batches_nonfinite_leaves_weights_untouched(model_dir):
    learner = Learner(cfg_with_budget("online_dpo", 2, 50), str(model_dir), threads=2)
    before = params_snapshot(learner)
    spec = learner.spec
    learner.spec = dataclasses.replace(spec, fn=lambda inputs, p: (inputs.logps.sum() * math.nan, {}))
    metrics = learner.train_step(synthetic_groups())
    learner.spec = spec
    assert (metrics["micro_batches"], metrics["nonfinite_micro_batches"]) == (3, 3)
    assert metrics["nonfinite"] == 1 and metrics["optimizer_step"] == 0
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert learner.train_step(synthetic_groups())["optimizer_step"] == 1  # and training goes on


@pytest.mark.integration
def test_ppo_epochs_loop_over_the_same_micro_batches_with_the_value_model(model_dir):
    """PPO (value model, old values, whitening per micro-batch): every epoch accumulates over all
    micro-batches, then one policy step and one value-model step."""
    cfg = cfg_with_budget("ppo", 2, 50)
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"ppo_epochs": 2})})
    learner = Learner(cfg, str(model_dir), threads=2)
    value = present(learner.value)  # loss ppo: a value model
    value_before = {k: v.clone() for k, v in value.model.state_dict().items()}
    metrics = learner.train_step(synthetic_groups()[:3])  # rows x longest row: 40, 44, 48
    assert metrics["micro_batches"] == 3 and metrics["epochs"] == 2 and metrics["optimizer_step"] == 2
    assert metrics["nonfinite"] == 0 and value.steps == 2 and math.isfinite(metrics["value_grad_norm"])
    assert math.isfinite(metrics["last_epoch_loss"])
    value_after = value.model.state_dict()
    assert any(not torch.equal(value_before[k], value_after[k]) for k in value_before)
