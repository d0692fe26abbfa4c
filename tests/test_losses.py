"""Loss registry, DPO/IPO formulas against hand-worked numbers, and pair selection."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from async_rlhf.config.base import ConfigError
from async_rlhf.config.loss import LossConfig
from async_rlhf.config.run import validate_config
from async_rlhf.rollout import Completion, Prompt, RewardStatus, RolloutGroup
from learners.loss_traits import LossTraits, builtin_loss_modules, builtin_losses
from learners.losses import LOSSES, LossInputs, get_loss, register_loss, select_pairs, select_pairs_batch
from learners.losses.contract import LossContractError, loss_call, loss_result
from learners.losses.dpo import dpo_sigmoid_loss, ipo_loss
from tests.helpers import completion as make_completion
from tests.helpers import present


def completion(ids: list[int], reward: float | None, status: RewardStatus = "ok") -> Completion:
    return make_completion(ids, reward, status, logprob=-1.0)


def group(prompt_id: int, *completions: Completion) -> RolloutGroup:
    return RolloutGroup(prompt=Prompt(prompt_id, "", [1, 2, prompt_id]), completions=list(completions),
                        policy_version=0, generator_id=0, created_at=0.0)


# ------------------------------------------------------------------ formulas, hand-worked


def test_dpo_sigmoid_loss_hand_worked():
    beta = 0.1
    chosen = torch.tensor([2.0, -1.0, 0.5])
    rejected = torch.tensor([-1.0, 1.0, 0.5])
    # pair 0: h = 2 - (-1) = 3;  beta*h = 0.3;  -log sigmoid(0.3) = log(1 + e^-0.3)
    #         e^-0.3 = 0.7408182207  ->  log(1.7408182207) = 0.5543552445
    # pair 1: h = -1 - 1 = -2;   beta*h = -0.2; log(1 + e^0.2) = log(2.2214027582) = 0.7981388694
    # pair 2: h = 0 -> log 2 = 0.6931471806
    expected = torch.tensor([0.5543552445, 0.7981388694, 0.6931471806])
    torch.testing.assert_close(dpo_sigmoid_loss(chosen, rejected, beta), expected, atol=1e-7, rtol=0)


def test_ipo_loss_hand_worked():
    chosen = torch.tensor([2.0, -1.0])
    rejected = torch.tensor([-1.0, 1.0])
    # beta = 0.1 -> target 1/(2*0.1) = 5.  pair 0: h = 3 -> (3-5)^2 = 4;  pair 1: h = -2 -> (-2-5)^2 = 49
    torch.testing.assert_close(ipo_loss(chosen, rejected, 0.1), torch.tensor([4.0, 49.0]))
    # beta = 0.5 -> target 1.  pair 0: (3-1)^2 = 4;  pair 1: (-2-1)^2 = 9
    torch.testing.assert_close(ipo_loss(chosen, rejected, 0.5), torch.tensor([4.0, 9.0]))


def pair_inputs(pi_c: list[float], pi_r: list[float], ref_c: list[float], ref_r: list[float]) -> LossInputs:
    """Rows laid out as the learner does: chosen rows, then rejected rows; one token + one pad each,
    with junk at the padded column to check the mask is honoured."""
    logps = torch.tensor([[v, 123.0] for v in pi_c + pi_r], requires_grad=True)
    ref = torch.tensor([[v, -77.0] for v in ref_c + ref_r])
    mask = torch.tensor([[1.0, 0.0]] * len(logps))
    return LossInputs(logps=logps, mask=mask, rewards=torch.zeros(len(logps)), ref_logps=ref)


def test_registered_online_dpo_reduces_sequences_and_averages_pairs():
    # pair 0: pi_c=-3, ref_c=-5 -> +2;  pi_r=-4, ref_r=-3 -> -1;  h = 3 -> 0.5543552445
    # pair 1: pi_c=-6, ref_c=-5 -> -1;  pi_r=-2, ref_r=-3 -> +1;  h = -2 -> 0.7981388694
    # mean = (0.5543552445 + 0.7981388694) / 2 = 0.6762470569
    inputs = pair_inputs(pi_c=[-3.0, -6.0], pi_r=[-4.0, -2.0], ref_c=[-5.0, -5.0], ref_r=[-3.0, -3.0])
    loss, metrics = get_loss("online_dpo").fn(inputs, LossConfig(beta=0.1))
    assert loss.item() == pytest.approx(0.6762470569, abs=1e-7)
    # implicit reward margin = beta * mean(h) = 0.1 * (3 + -2) / 2 = 0.05; only pair 0 is ordered right
    assert metrics["reward_margin"] == pytest.approx(0.05, abs=1e-7)
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["chosen_logratio"] == pytest.approx((2.0 - 1.0) / 2)
    assert metrics["rejected_logratio"] == pytest.approx((-1.0 + 1.0) / 2)


def test_registered_ipo_value():
    # same pairs: h = 3 and -2, beta = 0.1 -> (4 + 49) / 2 = 26.5
    inputs = pair_inputs(pi_c=[-3.0, -6.0], pi_r=[-4.0, -2.0], ref_c=[-5.0, -5.0], ref_r=[-3.0, -3.0])
    loss, _ = get_loss("ipo").fn(inputs, LossConfig(name="ipo", beta=0.1))
    assert loss.item() == pytest.approx(26.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    # one pair with h = 3, beta = 0.1: dL/dh = -beta * sigmoid(-beta*h) = -0.1 * 0.4255574832 = -0.0425557483
    inputs = pair_inputs(pi_c=[-3.0], pi_r=[-4.0], ref_c=[-5.0], ref_r=[-3.0])
    loss, _ = get_loss("online_dpo").fn(inputs, LossConfig(beta=0.1))
    loss.backward()
    grad = present(inputs.logps.grad)
    assert grad[0, 0].item() == pytest.approx(-0.0425557483, abs=1e-8)  # descent raises log pi(chosen)
    assert grad[1, 0].item() == pytest.approx(+0.0425557483, abs=1e-8)  # and lowers log pi(rejected)
    assert grad[:, 1].abs().sum() == 0  # padding gets no gradient


def test_ipo_gradient_pulls_gap_towards_target():
    # beta = 0.1, target 5.
    # below: (-3 - -5) - (-4 - -3) = 2 + 1 = 3;  dL/dh = 2*(3-5) = -4 -> gradient descent widens the gap
    # above: (-1 - -5) - (-8 - -3) = 4 + 5 = 9;  dL/dh = 2*(9-5) = +8 -> gradient descent narrows it
    below = pair_inputs(pi_c=[-3.0], pi_r=[-4.0], ref_c=[-5.0], ref_r=[-3.0])
    above = pair_inputs(pi_c=[-1.0], pi_r=[-8.0], ref_c=[-5.0], ref_r=[-3.0])
    for inputs, expected in ((below, -4.0), (above, 8.0)):
        loss, _ = get_loss("ipo").fn(inputs, LossConfig(name="ipo", beta=0.1))
        loss.backward()
        grad = present(inputs.logps.grad)
        assert grad[0, 0].item() == pytest.approx(expected)
        assert grad[1, 0].item() == pytest.approx(-expected)


def test_pairwise_loss_without_reference_fails_loudly():
    inputs = pair_inputs(pi_c=[-3.0], pi_r=[-4.0], ref_c=[-5.0], ref_r=[-3.0])
    inputs.ref_logps = None
    with pytest.raises(ValueError, match="reference"):
        get_loss("online_dpo").fn(inputs, LossConfig(beta=0.1))


# ------------------------------------------------------------------ registry


def test_registry_declarations():
    assert {"online_dpo", "ipo"} <= set(LOSSES)
    for name in ("online_dpo", "ipo"):
        spec = LOSSES[name]
        assert spec.name == name and spec.min_samples_per_prompt == 2 and spec.needs_reference
        assert spec.select is select_pairs_batch
    assert "Rafailov" in LOSSES["online_dpo"].doc and "Azar" in LOSSES["ipo"].doc


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError, match="unknown loss 'nope'.*ipo.*online_dpo"):
        get_loss("nope")
    with pytest.raises(ConfigError, match="unknown loss 'nope'; valid names: .*online_dpo"):
        validate_config({"loss": {"name": "nope"}})


def test_declarations_read_from_the_source_are_what_the_registry_holds():
    """The config reads built-in losses' declarations from their source (learners/loss_traits.py, no torch):
    every loss a module of learners/losses/ registers is found, with what its @register_loss says."""
    builtin = {name: spec for name, spec in LOSSES.items() if spec.fn.__module__.startswith("learners.losses.")}
    assert set(builtin) == set(builtin_losses())
    assert {spec.fn.__module__ for spec in builtin.values()} == set(builtin_loss_modules())
    for name, spec in builtin.items():
        assert builtin_losses()[name] == LossTraits.of(spec), name


def test_a_loss_declared_with_a_variable_is_refused(tmp_path, monkeypatch):
    """The reader needs literals: a declaration it cannot read fails loudly, never silently as False."""
    import learners.loss_traits as loss_traits

    (tmp_path / "mine.py").write_text("FLAG = True\n\n@register_loss('mine', min_samples_per_prompt=1, "
                                      "needs_reference=FLAG)\ndef mine(inputs, params):\n    pass\n")
    monkeypatch.setattr(loss_traits, "LOSSES_DIR", tmp_path)
    loss_traits.builtin_declarations.cache_clear()
    try:
        with pytest.raises(ValueError, match="mine.py:3: @register_loss takes the loss name and its declarations"):
            loss_traits.builtin_declarations()
    finally:
        loss_traits.builtin_declarations.cache_clear()


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("online_dpo", select=select_pairs_batch, min_samples_per_prompt=2,
                      needs_reference=True)(lambda inputs, params: (torch.zeros(()), {}))


def test_config_uses_min_samples_per_prompt():
    with pytest.raises(ConfigError, match="samples_per_prompt \\(1\\) must be >= 2"):
        validate_config({"generation": {"samples_per_prompt": 1}})


# ------------------------------------------------------------------ pair selection


def test_select_pairs_picks_best_and_worst():
    worst, mid, best = completion([4], 0.1), completion([5, 6], 0.5), completion([7], 0.9)
    pairs, stats = select_pairs([group(3, mid, worst, best)])
    assert stats == {"pairs": 1, "skipped_ties": 0, "skipped_failed": 0}
    assert pairs[0].chosen is best and pairs[0].rejected is worst
    assert pairs[0].prompt == [1, 2, 3]


def test_select_pairs_never_uses_failed_rewards():
    # The failed/timed-out completions carry (bogus) rewards that would win; they must be ignored.
    ok_low, ok_high = completion([4], 0.2), completion([5], 0.4)
    bogus_high = completion([6], 99.0, status="failed")
    bogus_low = completion([7], -99.0, status="timed_out")
    pending = completion([8], None, status="pending")
    pairs, stats = select_pairs([group(1, bogus_high, ok_low, bogus_low, ok_high, pending)])
    assert stats["pairs"] == 1
    assert pairs[0].chosen is ok_high and pairs[0].rejected is ok_low


def test_select_pairs_counts_ties_and_failed_groups():
    groups = [
        group(1, completion([4], 1.0), completion([5], 1.0), completion([6], 1.0)),  # all tied
        group(2, completion([4], 0.5), completion([5], None, "failed")),  # only one scored
        group(3, completion([4], None, "failed"), completion([5], None, "timed_out")),  # none scored
        group(4, completion([4], 0.0), completion([5], 1.0)),  # usable
    ]
    pairs, stats = select_pairs(groups)
    assert stats == {"pairs": 1, "skipped_ties": 1, "skipped_failed": 2}
    assert [p.prompt[-1] for p in pairs] == [4]
    assert select_pairs([]) == ([], {"pairs": 0, "skipped_ties": 0, "skipped_failed": 0})


def test_select_pairs_batch_layout_is_chosen_then_rejected():
    g1 = group(1, completion([10], 0.0), completion([11], 1.0))
    g2 = group(2, completion([20], 3.0), completion([21], 2.0))
    sel = select_pairs_batch([g1, g2])
    assert [c.token_ids for c in sel.completions] == [[11], [20], [10], [21]]
    assert sel.prompts == [[1, 2, 1], [1, 2, 2], [1, 2, 1], [1, 2, 2]]
    assert sel.stats["pairs"] == 2 and len(sel) == 4


def test_dpo_reward_margin_matches_math_identity():
    # Random pairs: the loss equals mean(-logsigmoid(margin)) where margin is the reported reward margin per pair.
    torch.manual_seed(0)
    h = torch.randn(8) * 3
    per_pair = dpo_sigmoid_loss(h, torch.zeros(8), 0.25)
    assert torch.allclose(per_pair, torch.log1p(torch.exp(-0.25 * h)), atol=1e-6)
    assert math.isclose(float(dpo_sigmoid_loss(torch.zeros(1), torch.zeros(1), 5.0)), math.log(2), rel_tol=1e-6)


# --------------------------------------------------------------------- what a loss returns (contract.py)

GRAD = torch.tensor(2.0, requires_grad=True)
MUST = ("; a loss returns (loss, metrics): loss a 0-d float tensor with a gradient (reduced from inputs.logps, not "
        "detached), metrics a dict of numbers (docs/losses.md)")


@pytest.mark.parametrize(("result", "problem"), [
    (1.5, "returned a float instead of a (loss, metrics) pair"),
    (GRAD * 1, "returned a tensor of shape () instead of a (loss, metrics) pair"),
    ((None, {}), "returned None as its loss"),
    ((0.5, {}), "returned a float as its loss"),
    ((GRAD * torch.ones(3), {}), "returned a loss of shape (3,); reduce it to one number (e.g. .mean())"),
    ((torch.tensor(1), {}), "returned a loss of dtype torch.int64"),
    ((torch.tensor(1.0), {}), "returned a loss without a gradient (detached, or not computed from inputs.logps)"),
    ((GRAD * 1, [1.0]), "returned a list as its metrics"),
    ((GRAD * 1, {"hist": torch.ones(3)}), "returned metric 'hist' as a tensor of shape (3,)"),
    ((GRAD * 1, {"name": "x"}), "returned metric 'name' as a str"),
])
def test_a_loss_that_returns_the_wrong_thing_is_refused_with_what_it_must_return(result, problem: str) -> None:
    with pytest.raises(LossContractError) as refused:
        loss_result("mine:fn", result)
    assert str(refused.value) == f"loss 'mine:fn' {problem}{MUST}"


def test_a_loss_that_calls_sys_exit_is_named_not_taken_for_a_dead_learner() -> None:
    # In the learner's Ray actor a SystemExit ended the actor: "the Learner actor died", replaced twice, then the end.
    def gives_up(inputs, params):
        raise SystemExit("no pairs")

    with pytest.raises(LossContractError) as refused:
        loss_call("mine:fn", gives_up, None, None)
    assert str(refused.value) == f"loss 'mine:fn' called sys.exit('no pairs'){MUST}"
    assert loss_call("mine:fn", lambda inputs, params: (inputs, params), 1, 2) == (1, 2)


def test_a_loss_result_keeps_the_loss_and_makes_its_metrics_floats() -> None:
    loss = GRAD * 3
    got, metrics = loss_result("mine:fn", (loss, {"a": 1, "b": torch.tensor(0.25), "c": np.float32(0.5), "d": True}))
    assert got is loss and metrics == {"a": 1.0, "b": 0.25, "c": 0.5, "d": 1.0}
    assert all(type(v) is float for v in metrics.values())
