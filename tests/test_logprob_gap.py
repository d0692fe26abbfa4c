"""Log-probs of the distribution that sampled (temperature applied on both sides) and logprob_gap."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from async_rlhf.config.generation import GenerationConfig
from async_rlhf.config.run import RunConfig
from async_rlhf.pipeline.state import GapTally
from async_rlhf.rollout import Prompt
from learners.logprobs import behaviour_logprobs, completion_logprobs, gap_metrics, gap_sums, pack
from learners.micro_batches import combine_metrics

LOGITS = torch.tensor([2.0, 0.0, -1.0])


def fixed_logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> SimpleNamespace:
    """A model whose every position predicts LOGITS: the expected log-probs are computed by hand."""
    return SimpleNamespace(logits=LOGITS.expand(input_ids.shape[0], logits_to_keep, 3).clone())


def hand_logprob(token: int, temperature: float) -> float:
    scaled = [v / temperature for v in LOGITS.tolist()]
    return scaled[token] - math.log(sum(math.exp(v) for v in scaled))


@pytest.mark.parametrize(("temperature", "divisor"), [(1.0, 1.0), (0.7, 0.7), (2.0, 2.0), (0.0, 1.0)])
def test_completion_logprobs_divide_logits_by_the_temperature(temperature: float, divisor: float) -> None:
    batch = pack([[1], [1, 2]], [[0, 2], [1]])
    got = completion_logprobs(fixed_logits, batch, temperature)
    want = torch.tensor([[hand_logprob(0, divisor), hand_logprob(2, divisor)], [hand_logprob(1, divisor), 0.0]])
    assert torch.allclose(got, want, atol=1e-6)  # greedy (0) is the untempered softmax, like vLLM's


def test_gap_is_a_token_mean_over_all_and_over_fresh_rows() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    behaviour = torch.tensor([[-1.5, -1.0], [-0.25, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    sums = gap_sums(logps, behaviour, mask, torch.tensor([False, True]))
    assert sums == {"gap_sum": 1.75, "gap_tokens": 3.0, "gap_fresh_sum": 0.25, "gap_fresh_tokens": 1.0}
    assert gap_metrics([sums]) == {"logprob_gap": 1.75 / 3, "logprob_gap_fresh": 0.25}
    none_fresh = gap_metrics([gap_sums(logps, behaviour, mask, torch.tensor([False, False]))])
    assert math.isnan(none_fresh["logprob_gap_fresh"])


def test_micro_batches_combine_the_gap_by_tokens_not_rows() -> None:
    one = {"gap_sum": 3.0, "gap_tokens": 3.0, "gap_fresh_sum": 0.0, "gap_fresh_tokens": 0.0}  # gap 1 on 3 tokens
    two = {"gap_sum": 0.0, "gap_tokens": 1.0, "gap_fresh_sum": 0.0, "gap_fresh_tokens": 1.0}  # gap 0 on 1 token
    passes = [{"weight": 0.5, "finite": True, "train_tokens": 3, "forward_tokens": 5, "measures": {}, "gap": one},
              {"weight": 0.5, "finite": True, "train_tokens": 1, "forward_tokens": 3, "measures": {}, "gap": two},
              {"weight": 0.0, "finite": True, "train_tokens": 1, "forward_tokens": 3, "measures": {}, "gap": {}}]
    combined = combine_metrics(passes)
    assert combined["logprob_gap"] == 0.75 and combined["logprob_gap_fresh"] == 0.0


def test_summary_means_the_gap_and_takes_the_worst_fresh_step() -> None:
    tally = GapTally()
    assert tally.summary() == {"logprob_gap_mean": None, "logprob_gap_fresh_max": None}
    for gap, fresh in ((0.2, 1e-6), (0.4, math.nan), (math.nan, math.nan), (0.6, 3e-6)):
        tally.add({"logprob_gap": gap, "logprob_gap_fresh": fresh})
    assert tally.summary() == {"logprob_gap_mean": pytest.approx(0.4), "logprob_gap_fresh_max": 3e-6}


@pytest.mark.integration
def test_fresh_gap_between_vllm_and_learner_at_temperature_07(ray_local, random_policies) -> None:
    """Real vLLM (CPU) samples at T=0.7; the real learner's first step sees the same log-probs.
    The untempered learner log-probs (what the old raw mode compared) are far off: the test bites."""
    from actors.generator import GeneratorActor
    from async_rlhf.policies.embedded import build_tokenizer
    from learners.learner import Learner

    start_dir, _ = random_policies
    tok = build_tokenizer()
    gen_cfg = GenerationConfig(samples_per_prompt=2, max_new_tokens=8, temperature=0.7)
    prompts = [Prompt(i, text, tok(text)["input_ids"]) for i, text in enumerate(["3914>", "50182>"])]
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1).remote(0, str(start_dir), gen_cfg, 0, None)
    groups = ray_local.get(actor.generate.remote(prompts)).groups
    ray_local.kill(actor)
    for group in groups:
        for k, c in enumerate(group.completions):
            c.reward, c.reward_status = float(k), "ok"

    cfg = RunConfig(seed=0, loss={"name": "grpo"}, generation=gen_cfg.model_dump(), queue={"max_staleness": 0})
    learner = Learner(cfg, str(start_dir), threads=1)
    metrics = learner.train_step(groups)
    assert metrics["logprob_gap_fresh"] < 1e-4 and metrics["logprob_gap"] == metrics["logprob_gap_fresh"]

    rows = [(g.prompt.token_ids, c) for g in groups for c in g.completions]
    batch = pack([p for p, _ in rows], [c.token_ids for _, c in rows])
    with torch.no_grad():  # the reference holds the weights that sampled
        raw = completion_logprobs(learner.reference, batch, 1.0)
    mu = behaviour_logprobs([c for _, c in rows], raw.shape[1])
    untempered = gap_metrics([gap_sums(raw, mu, batch.completion_mask, torch.ones(len(rows), dtype=torch.bool))])
    assert untempered["logprob_gap"] > 1e-2
