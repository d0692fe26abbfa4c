"""VinePPO's Monte Carlo rollouts sampled by a real GeneratorActor (vLLM in a Ray actor) with the
arith warm-start model: step splits, unique states, continuation counts and budgets, dedup of shared
prefixes, truncated responses without EOS, one-step responses, seeding.

`max_new_tokens` is 20: a 2-step solution with one-digit numbers ("3+4=7\\n7-2=5\\n#### 5" + EOS) is
19 tokens and ends with EOS, a 3-step one is cut off mid-line, so one batch holds both kinds.
"""
from __future__ import annotations

import pytest

from actors.generator import GeneratorActor
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.config.run import load_config
from async_rlhf.pipeline.vineppo import step_delimiter_ids
from async_rlhf.rollout import Prompt
from learners.advantages.monte_carlo import MCRequest, delimiter_splitter
from tests.helpers import QUICK_ARITH, ROOT

pytestmark = pytest.mark.integration
MAX_NEW = 20
K, K_MC = 4, 3


@pytest.fixture(scope="module")
def arith(ray_local):
    """(actor, tokenizer, prompts): 6 train prompts plus prompt 0 again under another id."""
    from transformers import AutoTokenizer

    from async_rlhf.policies.embedded import ensure_policy
    from async_rlhf.tasks.builtin import make_task

    cfg = load_config(ROOT / "configs" / "arith.yaml", [QUICK_ARITH])
    model_dir = ensure_policy(cfg, log=lambda m: None)  # cached after the first build
    tok = AutoTokenizer.from_pretrained(model_dir)
    task = make_task(cfg.task, tok, seed=0)
    prompts = [task.train_prompt(i) for i in range(6)]
    prompts.append(Prompt(99, prompts[0].text, list(prompts[0].token_ids), dict(prompts[0].meta)))
    gen_cfg = GenerationConfig(samples_per_prompt=K, max_new_tokens=MAX_NEW, max_model_len=128)
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1).remote(0, str(model_dir), gen_cfg, 0, None)
    yield actor, tok, prompts
    ray_local.kill(actor)


def expected_states(groups) -> tuple[list[tuple], list[list[int]]]:
    """Unique (prompt ids, prefix ids) in order of first appearance and each response's indices,
    worked out here from the responses alone."""
    unique: dict[tuple, int] = {}
    index = []
    for g in groups:
        for c in g.completions:
            starts = [0, *c.step_ends[:-1]]
            keys = [(tuple(g.prompt.token_ids), tuple(c.token_ids[:s])) for s in starts]
            index.append([unique.setdefault(k, len(unique)) for k in keys])
    return list(unique), index


def test_mc_rollouts_per_unique_step_state(arith, ray_local) -> None:
    actor, tok, prompts = arith
    newline = step_delimiter_ids(tok, "\n")
    result = ray_local.get(actor.generate.remote(prompts, mc=MCRequest(K_MC, newline)))
    mc, split = result.mc, delimiter_splitter(newline)
    responses = [c for g in result.groups for c in g.completions]
    for c in responses:
        assert c.step_ends == split(c.token_ids) and c.advantages is None  # advantages come after scoring

    states, index = expected_states(result.groups)
    assert mc.index == index and len(mc.rollouts) == len(states)
    assert sum(len(row) for row in index) > len(states)  # shared prefixes were estimated once
    assert index[0][0] == index[6 * K][0]  # the repeated prompt (another id) shares s_0 with prompt 0
    kinds = {(c.finish_reason, c.token_ids[-1] == tok.eos_token_id) for c in responses}
    assert {("stop", True), ("length", False)} <= kinds  # both complete and truncated (no EOS) responses
    assert any(len(c.step_ends) >= 3 for c in responses)

    tokens = 0
    for (prompt_ids, prefix), group in zip(states, mc.rollouts):
        assert group.prompt.token_ids == list(prompt_ids) and group.policy_version == result.policy_version
        assert len(group.completions) == K_MC
        for c in group.completions:
            assert tuple(c.token_ids[:len(prefix)]) == prefix and len(c.token_ids) > len(prefix)
            assert len(c.token_ids) <= MAX_NEW  # the continuation got what the response had left
            assert c.finish_reason == "length" and len(c.token_ids) == MAX_NEW or c.token_ids[-1] == tok.eos_token_id
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) and c.reward_status == "pending"
            tokens += len(c.token_ids) - len(prefix)
    assert mc.tokens == tokens and mc.num_rollouts == K_MC * len(states) and mc.gen_s > 0

    again = ray_local.get(actor.generate.remote(prompts, mc=MCRequest(K_MC, newline)))
    assert [[c.token_ids for c in g.completions] for g in again.mc.rollouts] == \
        [[c.token_ids for c in g.completions] for g in mc.rollouts]  # seeded: reproducible
    # Salted apart from the responses' seed: s_0's continuations are not the responses again.
    s0 = [[c.token_ids for c in mc.rollouts[index[p * K][0]].completions] for p in range(6)]
    assert s0 != [[c.token_ids for c in g.completions[:K_MC]] for g in result.groups[:6]]


def test_one_step_responses_have_only_the_prompt_state(arith, ray_local) -> None:
    actor, _, prompts = arith
    result = ray_local.get(actor.generate.remote(prompts, mc=MCRequest(2, ())))  # no delimiter: one step
    assert all(c.step_ends == [len(c.token_ids)] for g in result.groups for c in g.completions)
    assert result.mc.index == [[p if p < 6 else 0] for p in range(7) for _ in range(K)]  # prompt 99 = prompt 0
    assert [len(g.completions) for g in result.mc.rollouts] == [2] * 6
    plain = ray_local.get(actor.generate.remote(prompts[:1]))
    assert plain.mc is None and plain.groups[0].completions[0].step_ends is None
