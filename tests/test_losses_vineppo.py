"""VinePPO's loss and the MC plumbing around it, against hand-worked numbers.

Loss examples: rows are completions, column j is completion token j, `mask` 1 on real tokens; padded
columns hold junk (99 in log-probs, -77 in the reference, 55 in advantages), so a loss that forgets
the mask gets a wrong number. The generator's MC sampling on the real model is in
tests/test_generator_mc.py, the whole pipeline in bench vineppo_vs_ppo's smoke test (tests/test_loss_runs.py RUNS_IN).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from async_rlhf.config.base import ConfigError
from async_rlhf.config.loss import LossConfig
from async_rlhf.config.run import load_config
from async_rlhf.pipeline.vineppo import MCCost, attach_advantages, step_delimiter_ids
from async_rlhf.rollout import Completion, Prompt, RewardStatus, RolloutGroup, scored_reward
from learners.advantages.monte_carlo import MCBatch, MCRequest, continuation_seed, state_values
from learners.logprobs import mc_advantages
from learners.losses import LOSSES, LossInputs, get_loss
from learners.losses.vineppo import select_valued
from tests.helpers import ROOT, token_ids

LN2 = math.log(2.0)
E05 = math.exp(0.5)  # 1.6487212707

# Row 0: a 3-token response of two steps (tokens 0-1 step 0 with A = 0.5, token 2 step 1 with A = -1).
# Row 1: a 2-token one-step response, A = -0.25 on both tokens; its third column is padding.
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
LOGPS = [[-1.0, -0.5, -2.0], [-2.0, -1.0, 0.0]]
MU = [[-1.0, -1.0, -2.0], [-2.0, -1.0 + LN2, 0.0]]  # log rho = [0, 0.5, 0 | 0, -ln 2] -> rho = [1, e^0.5, 1 | 1, 0.5]
REF = [[-1.0, -0.5, -2.0 + LN2], [-2.0, -1.0, 0.0]]  # ref - log pi = ln 2 on row 0, token 2 only
ADV = [[0.5, 0.5, -1.0], [-0.25, -0.25, 0.0]]


def batch() -> LossInputs:
    m = torch.tensor(MASK)

    def junk(values: list[list[float]], pad: float) -> torch.Tensor:
        return torch.where(m > 0, torch.tensor(values), torch.full_like(m, pad))

    return LossInputs(logps=junk(LOGPS, 99.0).requires_grad_(True), mask=m, rewards=torch.tensor([1.0, 0.0]),
                      ref_logps=junk(REF, -77.0), behaviour_logps=junk(MU, 99.0), group_ids=torch.tensor([0, 0]),
                      advantages=junk(ADV, 55.0))


def run(**params) -> tuple[float, dict, torch.Tensor]:
    inputs = batch()
    loss, metrics = get_loss("vineppo").fn(inputs, LossConfig(name="vineppo", **params))
    loss.backward()
    assert inputs.logps.grad is not None
    return loss.item(), metrics, inputs.logps.grad


def test_vineppo_hand_worked() -> None:
    # eps = 0.2, surrogate min(rho A, clip(rho, 0.8, 1.2) A) per token:
    #   row 0: 1 * 0.5 = 0.5 | min(e^0.5 * 0.5 = 0.824, 1.2 * 0.5 = 0.6) = 0.6 (clipped) | 1 * -1 = -1
    #   row 1: 1 * -0.25 = -0.25 | min(0.5 * -0.25 = -0.125, 0.8 * -0.25 = -0.2) = -0.2 (clipped)
    #   sum = 0.5 + 0.6 - 1 - 0.25 - 0.2 = -0.35
    # k3 on row 0 token 2: e^(ln 2) - ln 2 - 1 = 0.306853, elsewhere 0; beta = 0.5 -> 0.153426
    # L = (0.35 + 0.153426) / 5 tokens = 0.100685
    loss, metrics, grad = run(beta=0.5, clip_eps=0.2)
    assert loss == pytest.approx((0.35 + 0.5 * (1.0 - LN2)) / 5, abs=1e-6)
    # dL/dlogp: -rho A / 5 where the ratio is not clipped, 0 where it is; the k3 term adds
    # beta (1 - e^(ref - logp)) / 5 = 0.5 * (1 - 2) / 5 = -0.1 on row 0 token 2.
    torch.testing.assert_close(grad, torch.tensor([[-0.1, 0.0, 0.2 - 0.1], [0.05, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["k3_kl"] == pytest.approx((1.0 - LN2) / 5, abs=1e-6)
    assert metrics["adv_mean"] == pytest.approx(-0.5 / 5) and metrics["adv_abs_mean"] == pytest.approx(2.5 / 5)
    assert metrics["behaviour_log_ratio"] == pytest.approx((0.5 - LN2) / 5, abs=1e-6)


def test_vineppo_truncated_importance_sampling_hand_worked() -> None:
    # Ratio against the current weights (1 everywhere, never clipped), w = min(pi / mu, 2) detached:
    #   w = [1, e^0.5, 1 | 1, 0.5]; surrogate w A = [0.5, 0.824361, -1 | -0.25, -0.125], sum -0.050639
    #   L = (0.050639 + 0.153426) / 5
    loss, _, grad = run(beta=0.5, clip_eps=0.2, importance_sampling="truncated", is_cap=2.0)
    assert loss == pytest.approx((-(0.5 + 0.5 * E05 - 1 - 0.25 - 0.125) + 0.5 * (1.0 - LN2)) / 5, abs=1e-6)
    # dL/dlogp = -w A / 5 (+ the same k3 gradient -0.1 on row 0 token 2)
    expected = [[-0.1, -E05 * 0.5 / 5, 0.2 - 0.1], [0.05, 0.5 * 0.25 / 5, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected), atol=1e-6, rtol=0)


def test_vineppo_declares_what_it_needs() -> None:
    spec = LOSSES["vineppo"]
    assert spec.needs_mc_values and spec.needs_reference and spec.supports_importance_sampling
    assert spec.min_samples_per_prompt == 1
    assert "Kazemnejad" in spec.doc and "L =" in spec.doc
    assert not any(s.needs_mc_values for name, s in LOSSES.items() if name != "vineppo")
    with pytest.raises(ValueError, match="needs LossInputs.advantages"):
        inputs = batch()
        inputs.advantages = None
        spec.fn(inputs, LossConfig(name="vineppo"))


# --------------------------------------------------------------------- selection and learner inputs


def comp(n: int, reward: float | None, advantages: list[float] | None, status: RewardStatus = "ok") -> Completion:
    return Completion(list(range(3, 3 + n)), "", [0.0] * n, "stop", reward, status, advantages=advantages)


def test_select_valued_keeps_scored_completions_with_advantages() -> None:
    g0 = RolloutGroup(Prompt(0, "", [1, 5]), [comp(2, 1.0, [0.5, 0.5]), comp(1, 0.0, None),
                                              comp(1, None, None, "failed")], 0, 0, 0.0)
    g1 = RolloutGroup(Prompt(1, "", [1, 6]), [comp(1, 1.0, None)], 0, 0, 0.0)  # scored, no value: skipped
    g2 = RolloutGroup(Prompt(2, "", [1, 7]), [comp(1, 0.0, [-0.5]), comp(2, 1.0, [0.2, 0.3])], 0, 0, 0.0)
    sel = select_valued([g0, g1, g2])
    assert sel.prompts == [[1, 5], [1, 7], [1, 7]] and sel.group_ids == [0, 1, 1]
    assert [c.advantages for c in sel.completions] == [[0.5, 0.5], [-0.5], [0.2, 0.3]]
    assert sel.stats == {"groups": 2, "samples": 3, "skipped_failed": 1, "skipped_unvalued": 2}


def test_mc_advantages_are_padded_and_aligned() -> None:
    comps = [comp(2, 1.0, [0.25, -0.5]), comp(1, 0.0, [1.0])]
    torch.testing.assert_close(mc_advantages(comps, 3), torch.tensor([[0.25, -0.5, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="completion 0 has none MC advantages for 2 tokens"):
        mc_advantages([comp(2, 1.0, None)], 2)
    with pytest.raises(ValueError, match="completion 0 has 1 MC advantages for 2 tokens"):
        mc_advantages([comp(2, 1.0, [0.5])], 2)


# --------------------------------------------------------------------- values from scored rollouts


def rollout(rewards: list[float | None]) -> RolloutGroup:
    """One state's continuations, as the RewardService returns them (None = the reward failed)."""
    done = [Completion([3], "x", [], "stop", r, "ok" if r is not None else "failed") for r in rewards]
    return RolloutGroup(Prompt(0, "", [1, 5]), done, 0, 0, 0.0)


def response(step_ends: list[int], reward: float | None) -> Completion:
    return Completion(list(range(3, 3 + step_ends[-1])), "", [0.0] * step_ends[-1], "stop", reward,
                      "ok" if reward is not None else "timed_out", step_ends=step_ends)


def test_attach_advantages_hand_worked_with_failed_mc_rewards() -> None:
    # States: 0 = s_0 with continuation rewards [1, 0, failed] -> V = (1 + 0) / 2 = 0.5 (the failure is
    # left out, not counted as 0); 1 = a's s_1 with [1, 1] -> V = 1; 2 = c's s_1 with every reward
    # failed -> no value.
    rollouts = [rollout([1.0, 0.0, None]), rollout([1.0, 1.0]), rollout([None, None])]
    assert state_values(rollouts) == [0.5, 1.0, None]
    a = response([3, 5], 1.0)  # two steps: A = [V1 - V0, 1 - V1] = [0.5, 0]
    b = response([2], 0.0)  # one step: A = [0 - V0] = [-0.5]
    c = response([2, 4], 1.0)  # its s_1 has no value: left without advantages, counted
    d = response([1], None)  # its own reward timed out: never trained on, not counted as unvalued
    groups = [RolloutGroup(Prompt(0, "", [1, 5]), [a, b, c, d], 0, 0, 0.0)]
    counts = attach_advantages(groups, MCBatch(rollouts, [[0, 1], [0], [0, 2], [0]], gen_s=1.0, tokens=7))
    assert a.advantages == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert b.advantages == [-0.5, -0.5]
    assert c.advantages is None and d.advantages is None
    assert counts == {"mc_failed_reward": 3, "mc_unvalued": 1}
    with pytest.raises(ValueError, match="4 responses but MC states for 1"):
        attach_advantages(groups, MCBatch(rollouts, [[0]], 0.0, 0))


def test_mc_rewards_failing_at_a_remote_reward_model_are_left_out() -> None:
    """Responses and MC rollouts scored in one RewardService call, as the controller does, by a real
    HTTP reward model that fails on some items: the failures never become values."""
    from dataclasses import replace

    from async_rlhf.api.serving import ThreadedServer
    from reward_models.server import create_reward_app
    from reward_models.service import RewardService

    def picky(prompts, responses):  # the server scores item by item after a batch fails
        if any("boom" in r for r in responses):
            raise ValueError("cannot score 'boom'")
        return [1.0 if r.endswith("right") else 0.0 for r in responses]

    server = ThreadedServer(create_reward_app("picky", picky))
    url = server.start()
    try:
        service = RewardService({"train": "arith_partial", "gold": "arith_exact"},
                                remote={"url": url, "retries": 0, "backoff_s": 0.0})
        prompt = Prompt(0, "q", [1, 5])

        def texts(*values: str) -> list[Completion]:
            return [Completion([3], v, [], "stop") for v in values]

        a = Completion([3, 4], "x\nright", [0.0, 0.0], "stop", step_ends=[1, 2])  # steps "x\n" | "right"
        b = Completion([3], "wrong", [0.0], "stop", step_ends=[1])  # one step
        groups = [RolloutGroup(prompt, [a, b], 0, 0, 0.0)]
        rollouts = [RolloutGroup(prompt, texts("right", "wrong", "boom"), 0, 0, 0.0),  # s_0: V = 0.5
                    RolloutGroup(prompt, texts("x\nboom", "x\nboom"), 0, 0, 0.0)]  # a's s_1: no value
        batch = MCBatch(rollouts, [[0, 1], [0]], gen_s=0.1, tokens=5)
        scored = service.score(groups + batch.rollouts)
    finally:
        server.stop()
    responses = scored[:1]
    counts = attach_advantages(responses, replace(batch, rollouts=scored[1:]))
    assert counts == {"mc_failed_reward": 3, "mc_unvalued": 1}
    got_a, got_b = responses[0].completions
    assert (got_a.reward, got_b.reward) == (1.0, 0.0) and got_a.advantages is None
    assert got_b.advantages == [-0.5]  # 0 - V(s_0), V(s_0) = (1 + 0) / 2 with the failed one left out
    assert [c.reward_status for c in scored[1].completions] == ["ok", "ok", "failed"]
    assert "cannot score" in (scored[2].completions[0].reward_error or "") and service.counts["failed"] == 3


def test_mc_cost_is_cumulative_and_reports_its_share() -> None:
    cost = MCCost()
    for _ in range(2):
        cost.add_generated(MCBatch([rollout([1.0, 0.0]), rollout([1.0, 1.0])], [[0, 1]], gen_s=1.5, tokens=10))
    cost.add_scored({"mc_failed_reward": 1, "mc_unvalued": 2})
    # 2 calls x 2 states x 2 continuations; MC 3 s of 3 + 1 s of sampling
    assert cost.record(response_gen_s=1.0) == {
        "mc_states": 4, "mc_rollouts": 8, "mc_tokens": 20, "mc_gen_s": 3.0, "mc_gen_share": 0.75,
        "mc_failed_reward": 1, "mc_unvalued": 2}


def test_mc_cost_is_exported_to_prometheus_only_for_mc_losses(tmp_path: Path) -> None:
    from async_rlhf.api.metrics import prometheus_text
    from async_rlhf.pipeline.controller import Controller

    dpo = Controller(load_config(ROOT / "configs" / "arith.yaml"), tmp_path / "dpo")
    assert "mc_" not in prometheus_text(dpo.view)
    vine = Controller(load_config(ROOT / "configs" / "arith_vineppo.yaml"), tmp_path / "vine")
    vine.parts.mc_request = MCRequest(4, (5,))  # what the builder sets for a loss with needs_mc_values
    batch = MCBatch([rollout([1.0, 0.0]), rollout([1.0, 1.0])], [[0, 1]], gen_s=1.5, tokens=10)
    vine.stats.mc_cost.add_generated(batch)
    lines = set(prometheus_text(vine.view).splitlines())
    assert {"async_rlhf_mc_states_total 2.0", "async_rlhf_mc_rollouts_total 4.0", "async_rlhf_mc_tokens_total 10.0",
            "async_rlhf_mc_generation_seconds_total 1.5", "async_rlhf_mc_failed_reward_total 0.0"} <= lines


def test_step_delimiters_and_continuation_seeds() -> None:
    from async_rlhf.policies.embedded import build_tokenizer

    arith, sort = build_tokenizer("arith"), build_tokenizer("sort")
    assert step_delimiter_ids(arith, "\n") == (arith.convert_tokens_to_ids("\n"),)
    assert step_delimiter_ids(arith, "\n.") == tuple(sorted(token_ids(arith, ["\n", "."])))
    assert step_delimiter_ids(sort, "") == ()  # sort: one step per response
    seed = continuation_seed(0, 7, [10, 11])
    assert seed == continuation_seed(0, 7, [10, 11]) and 0 <= seed < 2**31 - 1
    assert len({seed, continuation_seed(1, 7, [10, 11]), continuation_seed(0, 8, [10, 11]),
                continuation_seed(0, 7, [10]), continuation_seed(0, 7, [])}) == 5


# --------------------------------------------------------------------- config


def test_arith_vineppo_config_and_bad_k_mc() -> None:
    cfg = load_config(ROOT / "configs" / "arith_vineppo.yaml")
    assert (cfg.loss.name, cfg.task.name, cfg.mc_values.k_mc) == ("vineppo", "arith", 4)
    assert load_config(ROOT / "configs" / "arith_vineppo.yaml", ["generation.samples_per_prompt=1"])  # K = 1 is fine
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "arith_vineppo.yaml", ["mc_values.k_mc=0"])
    assert str(err.value) == "config error: mc_values.k_mc: Input should be greater than or equal to 1 (got 0)"
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "arith_vineppo.yaml", ["mc_values.k=8"])
    assert str(err.value) == "config error: unknown key 'mc_values.k'; valid keys at mc_values: k_mc"


# --------------------------------------------------------------------- inside the real learner


@pytest.mark.integration
def test_vineppo_in_learner_follows_the_advantages(tmp_path: Path) -> None:
    """Four steps on one fixed batch whose per-token advantages favour the best completion of each prompt."""
    from async_rlhf.config.run import RunConfig
    from learners.learner import Learner
    from tests.test_learner import build_model_dir
    from tests.test_losses_pg import learner_logp, on_policy_groups

    model_dir = build_model_dir(tmp_path / "model")
    groups = on_policy_groups(model_dir)
    for group in groups:
        scored = group.scored
        mean = sum(scored_reward(c) for c in scored) / len(scored)
        for c in scored:  # one step each: every token takes r - mean
            c.advantages = [scored_reward(c) - mean] * len(c.token_ids)
    groups[4].completions[1].advantages = None  # scored but unvalued: skipped and counted
    cfg = RunConfig(seed=0, loss={"name": "vineppo", "beta": 0.05}, learner={"lr": 1e-3, "grad_clip": 1.0})
    learner = Learner(cfg, str(model_dir), threads=2)
    best = [(g.prompt.token_ids, g.completions[-1]) for g in groups[:4]]  # reward 3, advantage +1.5

    def best_logp() -> float:
        return sum(learner_logp(learner, prompt, c) for prompt, c in best)

    before = best_logp()
    history = [learner.train_step(groups) for _ in range(4)]
    assert all(m["nonfinite"] == 0 and m["optimizer_step"] == 1 for m in history), history
    assert best_logp() > before + 0.5
    first = history[0]
    assert (first["groups"], first["samples"], first["skipped_failed"], first["skipped_unvalued"]) == (6, 18, 1, 1)
    assert first["behaviour_log_ratio"] == pytest.approx(0.0, abs=1e-5)
