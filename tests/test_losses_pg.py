"""Policy-gradient losses (rloo, proximal_rloo, grpo, best_of_n_sft) against hand-worked numbers;
truncated importance sampling; group selection; `loss.import_path`; each loss inside the real learner.

Conventions of the hand examples: rows are completions, column j is completion token j, `mask` is 1
on real tokens. Padded columns hold junk (99 / -77) in every log-prob tensor, so a loss that forgets
the mask gets a wrong number.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from async_rlhf.config.base import ConfigError
from async_rlhf.config.loss import LossConfig
from async_rlhf.config.run import validate_config
from async_rlhf.rollout import Completion, Prompt, RolloutGroup
from learners.logprobs import behaviour_logprobs
from learners.loss_traits import builtin_losses
from learners.losses import (
    LOSSES,
    LossImportError,
    LossInputs,
    get_loss,
    load_import_path,
    resolve_loss,
    select_groups,
)
from learners.losses.sft import select_best
from tests.helpers import completion

E05 = math.exp(0.5)  # 1.6487212707
LN2 = math.log(2.0)
PAD = 99.0  # junk in padded columns of logps / behaviour
REF_PAD = -77.0  # junk in padded columns of ref_logps


def inputs(logps: list[list[float]], mask: list[list[float]], rewards: list[float], groups: list[int],
           ref: list[list[float]] | None = None, behaviour: list[list[float]] | None = None) -> LossInputs:
    """LossInputs from per-token lists; `logps` carries grad. ref / behaviour default to logps."""
    m = torch.tensor(mask)

    def junk(values: list[list[float]], pad: float) -> torch.Tensor:
        return torch.where(m > 0, torch.tensor(values), torch.full_like(m, pad))

    lp = junk(logps, PAD).requires_grad_(True)
    return LossInputs(logps=lp, mask=m, rewards=torch.tensor(rewards),
                      ref_logps=junk(ref if ref is not None else logps, REF_PAD),
                      behaviour_logps=junk(behaviour if behaviour is not None else logps, PAD),
                      group_ids=torch.tensor(groups))


def run(name: str, batch: LossInputs, **params) -> tuple[float, dict, torch.Tensor]:
    """(loss, metrics, d loss / d logps) of the registered loss `name`."""
    loss, metrics = get_loss(name).fn(batch, LossConfig(name=name, **params))
    loss.backward()
    assert batch.logps.grad is not None
    return loss.item(), metrics, batch.logps.grad


def assert_grad(grad: torch.Tensor, expected: list[list[float]], mask: torch.Tensor) -> None:
    torch.testing.assert_close(grad, torch.tensor(expected) * mask, atol=1e-6, rtol=0)


# --------------------------------------------------------------------- RLOO
# Two prompts: g0 has 3 scored samples, g1 has 2. Rewards [1, 0, 0.5 | 1, 0].
# seq logp   = [-1-1, -2, -0.5-0.5, -1, -3-1]          = [-2, -2, -1, -1, -4]
# KL_i (seq) = logp - ref summed: [0.5+0, 0, 0+1, 2, 0+0] = [0.5, 0, 1, 2, 0]
RLOO_LOGPS = [[-1.0, -1.0], [-2.0, 0.0], [-0.5, -0.5], [-1.0, 0.0], [-3.0, -1.0]]
RLOO_MASK = [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
RLOO_REF = [[-1.5, -1.0], [-2.0, 0.0], [-0.5, -1.5], [-3.0, 0.0], [-3.0, -1.0]]
RLOO_REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0]
RLOO_GROUPS = [0, 0, 0, 1, 1]
# beta = 0.25:  r' = r - beta KL = [1-0.125, 0, 0.5-0.25, 1-0.5, 0] = [0.875, 0, 0.25, 0.5, 0]
# leave-one-out: A0 = 0.875 - (0 + 0.25)/2 = 0.75;   A1 = 0 - (0.875 + 0.25)/2 = -0.5625
#                A2 = 0.25 - (0.875 + 0)/2 = -0.1875; A3 = 0.5 - 0 = 0.5;  A4 = 0 - 0.5 = -0.5
RLOO_ADV = [0.75, -0.5625, -0.1875, 0.5, -0.5]


def rloo_batch(behaviour: list[list[float]] | None = None) -> LossInputs:
    return inputs(RLOO_LOGPS, RLOO_MASK, RLOO_REWARDS, RLOO_GROUPS, ref=RLOO_REF, behaviour=behaviour)


def test_rloo_hand_worked():
    # L = -mean(A * seq logp) = -(0.75*-2 + -0.5625*-2 + -0.1875*-1 + 0.5*-1 + -0.5*-4) / 5
    #   = -(-1.5 + 1.125 + 0.1875 - 0.5 + 2) / 5 = -1.3125 / 5 = -0.2625
    batch = rloo_batch()
    loss, metrics, grad = run("rloo", batch, beta=0.25)
    assert loss == pytest.approx(-0.2625, abs=1e-6)
    assert metrics["kl_seq"] == pytest.approx((0.5 + 0 + 1 + 2 + 0) / 5)
    assert metrics["penalised_reward"] == pytest.approx((0.875 + 0 + 0.25 + 0.5 + 0) / 5)
    assert metrics["adv_mean"] == pytest.approx(0.0, abs=1e-7)  # LOO advantages sum to 0 per group
    # dL/dlogp_i,t = -A_i / 5 on every real token: descent raises log pi of better-than-baseline samples
    assert_grad(grad, [[-a / 5] * 2 for a in RLOO_ADV], batch.mask)


def test_rloo_kl_penalty_turns_a_reward_tie_into_a_preference_for_the_closer_sample():
    # Equal rewards 1, 1; KL 2 vs 0; beta = 0.5 -> r' = [0, 1] -> A = [-1, +1]
    batch = inputs([[-1.0], [-1.0]], [[1.0], [1.0]], [1.0, 1.0], [0, 0], ref=[[-3.0], [-1.0]])
    _, _, grad = run("rloo", batch, beta=0.5)
    assert grad[:, 0].tolist() == pytest.approx([0.5, -0.5])  # -A/2: pushes down the far sample


def test_rloo_ignores_behaviour_logps_without_importance_sampling():
    shifted = [[v - 3.0 for v in row] for row in RLOO_LOGPS]  # very stale samples
    loss, _, _ = run("rloo", rloo_batch(behaviour=shifted), beta=0.25)
    assert loss == pytest.approx(-0.2625, abs=1e-6)


# --------------------------------------------------------------------- proximal RLOO
# Same rows and advantages. Behaviour chosen so the sequence log-ratios are [0, 0.5, 0, 0.5, -0.5]:
#   row0: -2 - (-1-1) = 0;  row1: -2 - (-2.5) = 0.5;  row2: -1 - (-1) = 0;
#   row3: -1 - (-1.5) = 0.5;  row4: -4 - (-3-0.5) = -0.5
PROX_BEHAVIOUR = [[-1.0, -1.0], [-2.5, 0.0], [-0.5, -0.5], [-1.5, 0.0], [-3.0, -0.5]]


def test_proximal_rloo_hand_worked():
    # eps = 0.2, rho = [1, e^.5, 1, e^.5, e^-.5] = [1, 1.6487213, 1, 1.6487213, 0.6065307]
    # row0: min(1*0.75, 1*0.75) = 0.75
    # row1: A<0: min(1.6487213*-0.5625 = -0.9274057, 1.2*-0.5625 = -0.675) = -0.9274057  (unclipped)
    # row2: -0.1875
    # row3: A>0: min(1.6487213*0.5 = 0.8243606, 1.2*0.5 = 0.6) = 0.6                   (clipped)
    # row4: A<0: min(0.6065307*-0.5 = -0.3032653, 0.8*-0.5 = -0.4) = -0.4               (clipped)
    # L = -(0.75 - 0.9274057 - 0.1875 + 0.6 - 0.4) / 5 = -(-0.1649057) / 5 = 0.0329811
    batch = rloo_batch(behaviour=PROX_BEHAVIOUR)
    loss, metrics, grad = run("proximal_rloo", batch, beta=0.25, clip_eps=0.2)
    assert loss == pytest.approx(-(0.75 - E05 * 0.5625 - 0.1875 + 0.6 - 0.4) / 5, abs=1e-6)
    assert loss == pytest.approx(0.0329811, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(3 / 5)  # |rho - 1| > 0.2 for rows 1, 3, 4
    # d/dlogp_i,t = -rho_i A_i / 5 where unclipped, 0 where the clip binds (rows 3, 4)
    expected = [[-0.75 / 5] * 2, [E05 * 0.5625 / 5] * 2, [0.1875 / 5] * 2, [0.0] * 2, [0.0] * 2]
    assert_grad(grad, expected, batch.mask)


def test_proximal_rloo_equals_rloo_on_fresh_samples():
    # behaviour == current policy: rho = 1 everywhere, so loss value is -mean(A) = 0 and the
    # gradient is RLOO's (-A_i / 5 per token).
    batch = rloo_batch()
    loss, _, grad = run("proximal_rloo", batch, beta=0.25)
    assert loss == pytest.approx(0.0, abs=1e-7)
    assert_grad(grad, [[-a / 5] * 2 for a in RLOO_ADV], batch.mask)


# --------------------------------------------------------------------- GRPO
# g0 rewards [1, 0, 0.5]: mean 0.5, centred [.5, -.5, 0], var (Bessel) = 0.5/2 = 0.25, std 0.5 -> A = [1, -1, 0]
# g1 rewards [1, 0]:      mean 0.5, centred [.5, -.5],    var = 0.5/1 = 0.5, std 0.7071068 -> A = +-0.7071068
# (the 1e-6 in the denominator moves these by ~1e-6)
S = math.sqrt(0.5)
GRPO_LOGPS = [[-1.0, -1.0], [-2.0, 0.0], [-0.5, -0.5], [-1.0, 0.0], [-3.0, -1.0]]
# behaviour: per-token log-ratio 0 except row1 t0 and row3 t0 where it is 0.5 (rho = e^.5)
GRPO_BEHAVIOUR = [[-1.0, -1.0], [-2.5, 0.0], [-0.5, -0.5], [-1.5, 0.0], [-3.0, -1.0]]
# reference: ref - logp = ln 2 at row0 t0 and row2 t1 (k3 = 2 - ln2 - 1 = 0.3068528), 0 elsewhere (k3 = 0)
GRPO_REF = [[-1.0 + LN2, -1.0], [-2.0, 0.0], [-0.5, -0.5 + LN2], [-1.0, 0.0], [-3.0, -1.0]]


def test_grpo_hand_worked():
    # beta = 0.1, eps = 0.2. Per token: -min(rho A, clip(rho) A) + beta k3, then mean per row, mean of rows.
    # row0 A=1,   rho=[1,1], k3=[.3068528, 0]:  [-1 + .0306853, -1]        -> mean -0.9846574
    # row1 A=-1,  rho=e^.5 : min(-1.6487213, -1.2) = -1.6487213 (unclipped) -> +1.6487213
    # row2 A=0,   k3=[0, .3068528]:             [0, .0306853]             -> mean  0.0153426
    # row3 A=.7071, rho=e^.5: min(1.1658, 1.2*.7071=.8485281) (clipped)    -> -0.8485281
    # row4 A=-.7071, rho=[1,1]:                 [.7071068, .7071068]      ->  0.7071068
    # L = (-0.9846574 + 1.6487213 + 0.0153426 - 0.8485281 + 0.7071068) / 5 = 0.1075971
    batch = inputs(GRPO_LOGPS, RLOO_MASK, RLOO_REWARDS, RLOO_GROUPS, ref=GRPO_REF, behaviour=GRPO_BEHAVIOUR)
    loss, metrics, grad = run("grpo", batch, beta=0.1, clip_eps=0.2)
    k3 = 1.0 - LN2
    rows = [(-1 + 0.1 * k3 - 1) / 2, E05, 0.1 * k3 / 2, -1.2 * S, S]
    assert loss == pytest.approx(sum(rows) / 5, abs=1e-5)
    assert loss == pytest.approx(0.1075971, abs=1e-5)
    assert metrics["k3_kl"] == pytest.approx(2 * (k3 / 2) / 5, abs=1e-7)
    assert metrics["clip_frac"] == pytest.approx(2 / 8)  # 2 of 8 real tokens have rho = e^.5
    # gradient per token = (-rho A + beta * dk3/dlogp) / (|y_i| * 5), dk3/dlogp = 1 - e^(ref - logp)
    #   row0 t0: (-1 + 0.1*(1-2)) / 10 = -0.11;  row0 t1: -1/10;  row1: +e^.5/5;  row2 t1: 0.1*(1-2)/10 = -0.01
    #   row3: clipped -> 0;  row4: +0.7071068/10 each
    expected = [[-0.11, -0.1], [E05 / 5, 0.0], [0.0, -0.01], [0.0, 0.0], [S / 10, S / 10]]
    torch.testing.assert_close(grad, torch.tensor(expected) * batch.mask, atol=1e-5, rtol=0)


def test_grpo_all_equal_group_has_zero_advantage():
    batch = inputs([[-1.0], [-2.0]], [[1.0], [1.0]], [0.5, 0.5], [0, 0])
    loss, metrics, grad = run("grpo", batch)
    assert loss == 0.0 and metrics["adv_abs_mean"] == 0.0 and grad.abs().sum() == 0


# --------------------------------------------------------------------- truncated importance sampling
# One prompt, two samples, rewards [1, 0], reference == policy (KL 0).
#   row0: logps [-1, -2], behaviour [-2, -2]: pi/mu = [e^1 = 2.718, 1] -> truncated at cap 2: w = [2, 1]
#   row1: logps [-2],     behaviour [-1]:     pi/mu = e^-1 = 0.3678794 (below the cap: kept)
IS_LOGPS = [[-1.0, -2.0], [-2.0, 0.0]]
IS_MASK = [[1.0, 1.0], [1.0, 0.0]]
IS_BEHAVIOUR = [[-2.0, -2.0], [-1.0, 0.0]]
EM1 = math.exp(-1.0)


def is_batch() -> LossInputs:
    return inputs(IS_LOGPS, IS_MASK, [1.0, 0.0], [0, 0], behaviour=IS_BEHAVIOUR)


def test_truncated_is_rloo_hand_worked():
    # A = [1, -1].  L = -mean_i A_i sum_t w_i,t logp_i,t = -(1*(2*-1 + 1*-2) + -1*(e^-1 * -2)) / 2
    #   = -(-4 + 0.7357589) / 2 = 1.6321206;  grad = -A_i w_i,t / 2 = [[-1, -0.5], [e^-1/2, 0]]
    batch = is_batch()
    loss, metrics, grad = run("rloo", batch, importance_sampling="truncated", is_cap=2.0)
    assert loss == pytest.approx(-(-4 + 2 * EM1) / 2, abs=1e-6)
    assert_grad(grad, [[-1.0, -0.5], [EM1 / 2, 0.0]], batch.mask)
    assert metrics["is_weight_mean"] == pytest.approx((2 + 1 + EM1) / 3)
    assert metrics["is_truncated_frac"] == pytest.approx(1 / 3)
    assert metrics["behaviour_log_ratio"] == pytest.approx((1 + 0 - 1) / 3)


def test_truncated_is_raising_the_cap_restores_the_full_ratio():
    _, _, grad = run("rloo", is_batch(), importance_sampling="truncated", is_cap=10.0)
    assert grad[0, 0].item() == pytest.approx(-math.e / 2)  # w = e^1 = 2.718 kept


def test_truncated_is_proximal_rloo_takes_rloo_gradient():
    # Decoupled form: ratio against the detached current policy (value 1, clip never binds),
    # staleness correction in w -> the same per-token-weighted gradient as truncated RLOO.
    _, _, grad = run("proximal_rloo", is_batch(), importance_sampling="truncated", is_cap=2.0)
    assert_grad(grad, [[-1.0, -0.5], [EM1 / 2, 0.0]], is_batch().mask)


def test_truncated_is_grpo_hand_worked():
    # A = +-0.7071068 (group [1, 0]); ratio vs detached policy = 1, so per token -w A:
    #   row0: [-2*.7071068, -1*.7071068] -> mean -1.0606602;  row1: [+e^-1 * .7071068] -> 0.2601300
    # L = (-1.0606602 + 0.2601300) / 2 = -0.4002651;  grad row0 = -w A / (2*2) = [-.3535534, -.1767767]
    batch = is_batch()
    loss, _, grad = run("grpo", batch, importance_sampling="truncated", is_cap=2.0)
    assert loss == pytest.approx((-1.5 * S + EM1 * S) / 2, abs=1e-5)
    assert_grad(grad, [[-S / 2, -S / 4], [EM1 * S / 2, 0.0]], batch.mask)


def test_importance_sampling_is_refused_for_losses_that_do_not_support_it():
    declared = builtin_losses()
    able = ", ".join(sorted(n for n, t in declared.items() if t.supports_importance_sampling))
    assert able and len(able.split(", ")) < len(declared)  # both kinds exist
    for name in (n for n, t in declared.items() if not t.supports_importance_sampling):
        assert not LOSSES[name].supports_importance_sampling
        with pytest.raises(ConfigError, match=f"loss.importance_sampling: loss '{name}' does not support "
                                              f"'truncated'; set loss.importance_sampling=none or use one of: "
                                              f"{able}$"):
            validate_config({"loss": {"name": name, "importance_sampling": "truncated"}})
    assert validate_config({"loss": {"name": "grpo", "importance_sampling": "truncated"}}).loss.is_cap == 2.0
    with pytest.raises(ConfigError, match="loss.is_cap"):
        validate_config({"loss": {"name": "rloo", "is_cap": 0.5}})


# --------------------------------------------------------------------- best-of-N SFT


def test_best_of_n_sft_hand_worked():
    # NLL mean per token over the batch: -(-1 - 3 - 2) / 3 = 2.0; grad = -1/3 on each real token
    batch = inputs([[-1.0, -3.0], [-2.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]], [0.9, 0.4], [0, 1])
    loss, metrics, grad = run("best_of_n_sft", batch)
    assert loss == pytest.approx(2.0) and metrics["best_reward_mean"] == pytest.approx(0.65)
    assert_grad(grad, [[-1 / 3, -1 / 3], [-1 / 3, 0.0]], batch.mask)


def group(prompt_id: int, *completions: Completion) -> RolloutGroup:
    return RolloutGroup(Prompt(prompt_id, "", [1, prompt_id]), list(completions), 0, 0, 0.0)


def test_select_best_takes_first_of_ties_and_ignores_failed_rewards():
    low, first_best, second_best = completion([4], 0.2), completion([5], 0.9), completion([6], 0.9)
    bogus = completion([7], 5.0, status="failed")
    only = completion([8], 0.1)
    groups = [group(1, low, first_best, bogus, second_best),
              group(2, completion([9], None, "timed_out")),  # nothing scored: skipped
              group(3, only)]  # one scored sample is enough for SFT
    sel = select_best(groups)
    assert sel.completions == [first_best, only] and sel.prompts == [[1, 1], [1, 3]]
    assert sel.group_ids == [0, 1]
    assert sel.stats == {"groups": 2, "samples": 2, "skipped_failed": 1}


# --------------------------------------------------------------------- group selection


def test_select_groups_keeps_scored_samples_with_group_ids_and_counts_skips():
    a = [completion([4], 0.1), completion([5], 0.2), completion([6], None, "failed"), completion([7], 0.3)]
    b = [completion([4], 1.0), completion([5], None, "timed_out")]  # 1 scored: skipped at min 2
    c = [completion([4], None, "failed")]  # 0 scored
    d = [completion([8], 0.0), completion([9], 1.0)]
    groups = [group(1, *a), group(2, *b), group(3, *c), group(4, *d)]
    sel = select_groups(groups)
    assert [x.token_ids for x in sel.completions] == [[4], [5], [7], [8], [9]]
    assert sel.group_ids == [0, 0, 0, 1, 1]
    assert sel.prompts == [[1, 1]] * 3 + [[1, 4]] * 2
    assert sel.stats == {"groups": 2, "samples": 5, "skipped_failed": 2}
    assert select_groups(groups, min_scored=1).stats == {"groups": 3, "samples": 6, "skipped_failed": 1}
    assert select_groups([]).stats == {"groups": 0, "samples": 0, "skipped_failed": 0}


def test_group_losses_select_by_their_min_samples_and_pairs_carry_group_ids():
    groups = [group(1, completion([4], 1.0)), group(2, completion([4], 1.0), completion([5], 0.0))]
    for name in ("rloo", "proximal_rloo", "grpo"):
        spec = LOSSES[name]
        assert spec.min_samples_per_prompt == 2 and spec.needs_reference and spec.supports_importance_sampling
        assert spec.select(groups).stats == {"groups": 1, "samples": 2, "skipped_failed": 1}
    assert LOSSES["best_of_n_sft"].min_samples_per_prompt == 1 and not LOSSES["best_of_n_sft"].needs_reference
    assert LOSSES["online_dpo"].select(groups * 2).group_ids == [0, 1, 0, 1]  # chosen rows, then rejected


def test_group_baseline_refuses_singleton_groups():
    batch = inputs([[-1.0], [-2.0]], [[1.0], [1.0]], [1.0, 0.0], [0, 1])
    with pytest.raises(ValueError, match=">= 2 samples in every group"):
        get_loss("rloo").fn(batch, LossConfig(name="rloo"))


def test_every_registered_loss_documents_formula_and_paper():
    papers = {"rloo": "Ahmadian", "proximal_rloo": "Noukhovitch", "grpo": "Shao", "best_of_n_sft": "RAFT"}
    for name, author in papers.items():
        assert author in LOSSES[name].doc and "L =" in LOSSES[name].doc


def test_behaviour_logprobs_are_aligned_with_completion_tokens():
    comps = [Completion([4, 5], "", [-0.25, -1.5], "stop"), Completion([6], "", [-2.0], "length")]
    torch.testing.assert_close(behaviour_logprobs(comps, 3), torch.tensor([[-0.25, -1.5, 0.0], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="completion 0 has 1 behaviour logprobs for 2 tokens"):
        behaviour_logprobs([Completion([4, 5], "", [-0.25], "stop")], 2)


# --------------------------------------------------------------------- loss.import_path

USER_MODULE = '''
import torch
from learners.losses import register_loss

NOT_A_FUNCTION = 3


def plain_loss(inputs, params):
    """Mean negative log-likelihood of every selected token."""
    return -(inputs.logps * inputs.mask).sum() / inputs.mask.sum(), {"plain": 1.0}


def one_argument(inputs):
    return torch.zeros(())


def keyword_only(inputs, *, params):
    return torch.zeros(())


def detached_loss(inputs, params):
    return (-(inputs.logps * inputs.mask).sum() / inputs.mask.sum()).detach(), {}


def tensor_metric_loss(inputs, params):
    loss = -(inputs.logps * inputs.mask).sum() / inputs.mask.sum()
    return loss, {"nll": loss}


@register_loss("user_registered_loss", min_samples_per_prompt=3, needs_reference=False)
def registered(inputs, params):
    return torch.zeros(()), {}
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user's loss module on sys.path; the registry and sys.modules are restored afterwards."""
    (tmp_path / "user_losses_mod.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "user_losses_broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "user_losses_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "user_losses_script.py").write_text("import sys\nsys.exit(2)\n")  # a script's argparse, at import
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(LOSSES)
    yield "user_losses_mod"
    LOSSES.clear()
    LOSSES.update(before)
    for mod in ("user_losses_mod", "user_losses_broken", "user_losses_dep", "user_losses_script"):
        sys.modules.pop(mod, None)


def test_import_path_plain_function_is_registered_under_its_path(user_module):
    path = f"{user_module}:plain_loss"
    cfg = validate_config({"loss": {"import_path": path}})
    assert cfg.loss.name == path and cfg.loss.import_path == path
    spec = resolve_loss(cfg.loss)
    assert spec is LOSSES[path] and spec.min_samples_per_prompt == 2 and spec.needs_reference
    assert not spec.supports_importance_sampling
    assert spec.select([group(1, completion([4], 1.0), completion([5], 0.0))]).group_ids == [0, 0]
    # Loading again (config re-validated, the learner process) returns the same spec.
    assert load_import_path(path) is spec
    # The run's resolved config.yaml (name and import_path both set) loads again.
    assert validate_config({"loss": {"import_path": path, "name": path}}).loss.name == path
    batch = inputs([[-1.0, -3.0]], [[1.0, 1.0]], [1.0], [0])
    loss, metrics = spec.fn(batch, cfg.loss)
    assert loss.item() == pytest.approx(2.0) and metrics == {"plain": 1.0}


def test_import_path_decorated_function_keeps_its_declarations(user_module):
    cfg = validate_config({"loss": {"import_path": f"{user_module}:registered"},
                           "generation": {"samples_per_prompt": 4}})
    assert cfg.loss.name == "user_registered_loss"
    assert resolve_loss(cfg.loss).min_samples_per_prompt == 3
    with pytest.raises(ConfigError, match="samples_per_prompt \\(2\\) must be >= 3 for loss 'user_registered_"):
        validate_config({"loss": {"import_path": f"{user_module}:registered"},
                         "generation": {"samples_per_prompt": 2}})


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("user_losses_mod", "loss.import_path: 'user_losses_mod' is not of the form 'pkg.module:function'"),
        ("no_such_pkg.losses:fn", "loss.import_path: module 'no_such_pkg.losses' not found (No module named "
                                  "'no_such_pkg'); it must be importable from sys.path or the current directory"),
        ("user_losses_dep:fn", "loss.import_path: importing module 'user_losses_dep' failed: No module named "
                               "'no_such_dependency_xyz'"),
        ("user_losses_broken:fn", "loss.import_path: importing module 'user_losses_broken' failed: "
                                  "RuntimeError: boom at import"),
        ("user_losses_script:fn", "loss.import_path: importing module 'user_losses_script' called sys.exit(2); run "
                                  "its script code only under `if __name__ == \"__main__\":`"),
        ("user_losses_mod:missing", "loss.import_path: module 'user_losses_mod' has no attribute 'missing'"),
        ("user_losses_mod:NOT_A_FUNCTION", "loss.import_path: 'user_losses_mod:NOT_A_FUNCTION' is not callable "
                                           "(it is a int)"),
        ("user_losses_mod:one_argument", "loss.import_path: 'user_losses_mod:one_argument' must accept two "
                                         "positional arguments (inputs, params); its signature is (inputs)"),
        ("user_losses_mod:keyword_only", "loss.import_path: 'user_losses_mod:keyword_only' must accept two "
                                         "positional arguments (inputs, params); its signature is "
                                         "(inputs, *, params)"),
    ],
)
def test_import_path_errors_are_one_line_before_anything_starts(user_module, target: str, message: str):
    with pytest.raises(LossImportError) as direct:
        load_import_path(target)
    assert str(direct.value) == message
    with pytest.raises(ConfigError) as via_config:
        validate_config({"loss": {"import_path": target}})
    assert str(via_config.value) == f"config error: {message}"


def test_import_path_overrides_a_configured_name(user_module):
    # A YAML that names a loss (quickstart.yaml: online_dpo) plus `loss.import_path=...` on the CLI.
    cfg = validate_config({"loss": {"import_path": f"{user_module}:registered", "name": "grpo"}})
    assert cfg.loss.name == "user_registered_loss"


# --------------------------------------------------------------------- inside the real learner


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.test_learner import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("pg_model"))


def on_policy_groups(model_dir: Path) -> list[RolloutGroup]:
    """The learner tests' synthetic groups, with behaviour log-probs from the initial policy (fresh samples)."""
    from learners.learner import load_causal_lm
    from learners.logprobs import completion_logprobs, pack
    from tests.test_learner import synthetic_groups

    groups, model = synthetic_groups(), load_causal_lm(model_dir)
    rows = [(g.prompt.token_ids, c) for g in groups for c in g.completions]
    with torch.no_grad():
        logps = completion_logprobs(model, pack([p for p, _ in rows], [c.token_ids for _, c in rows]))
    for i, (_, comp) in enumerate(rows):
        comp.logprobs = logps[i, : len(comp.token_ids)].tolist()
    return groups


@pytest.mark.integration
@pytest.mark.parametrize("name", ["rloo", "proximal_rloo", "grpo", "best_of_n_sft"])
def test_loss_in_learner_raises_log_prob_of_the_best_completion(tiny_model_dir: Path, name: str):
    """Four steps on one fixed batch: the best completion of each prompt (reward 3) gets likelier."""
    from async_rlhf.config.run import RunConfig
    from learners.learner import Learner

    cfg = RunConfig(seed=0, loss={"name": name, "beta": 0.05}, learner={"lr": 1e-3, "grad_clip": 1.0})
    learner = Learner(cfg, str(tiny_model_dir), threads=2)
    groups = on_policy_groups(tiny_model_dir)
    best = [(g.prompt.token_ids, g.completions[-1]) for g in groups[:4]]  # reward k = 3 is the best

    def best_logp() -> float:
        return sum(learner_logp(learner, prompt, comp) for prompt, comp in best)

    before = best_logp()
    history = [learner.train_step(groups) for _ in range(4)]
    assert all(m["nonfinite"] == 0 and m["optimizer_step"] == 1 for m in history), history
    assert best_logp() > before + 0.5
    first = history[0]
    if name != "best_of_n_sft":
        # fresh samples: the learner's log-probs equal the behaviour ones before the first update
        assert first["behaviour_log_ratio"] == pytest.approx(0.0, abs=1e-5)
        # 4 prompts x 4 samples + the tied group (kept, its advantages are 0); the failed group skipped
        assert (first["groups"], first["samples"], first["skipped_failed"]) == (5, 4 * 4 + 2, 1)
    else:
        assert (first["groups"], first["samples"], first["skipped_failed"]) == (6, 6, 0)


def learner_logp(learner, prompt: list[int], comp: Completion) -> float:
    from learners.logprobs import completion_logprobs, pack

    with torch.no_grad():
        return float(completion_logprobs(learner.policy, pack([prompt], [comp.token_ids])).sum())


@pytest.mark.integration
def test_a_user_loss_that_returns_the_wrong_thing_is_named_with_the_fix(user_module, tiny_model_dir: Path):
    # Before: "AssertionError: loss must be a scalar tensor. If you need to pass output gradients, backward() of
    # output tensors" from DeepSpeed; a tensor among the metrics: "can't multiply sequence by non-int of type
    # 'float'" from the learner's averaging. Neither named the loss nor what it must return.
    from async_rlhf.config.run import RunConfig
    from learners.learner import Learner
    from learners.losses.contract import LossContractError

    cfg = RunConfig(seed=0, loss={"import_path": f"{user_module}:tensor_metric_loss"})
    learner = Learner(cfg, str(tiny_model_dir), threads=2)
    groups = on_policy_groups(tiny_model_dir)
    metrics = learner.train_step(groups)  # a 0-d tensor metric is taken as its number
    assert isinstance(metrics["nll"], float) and metrics["nll"] == pytest.approx(metrics["loss"])
    learner.spec = resolve_loss(validate_config({"loss": {"import_path": f"{user_module}:detached_loss"}}).loss)
    with pytest.raises(LossContractError) as refused:
        learner.train_step(groups)
    assert str(refused.value).startswith(f"loss '{user_module}:detached_loss' returned a loss without a gradient "
                                         "(detached, or not computed from inputs.logps); a loss returns (loss, "
                                         "metrics)")
