"""GeneratorActor with real vLLM in a real Ray actor: sampling contract, weight sync, HF parity."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.generation_result import GenerationResult
from actors.generator import GeneratorActor, cpu_kv_cache_bytes, cpu_kv_cache_named
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.rollout import Prompt, RolloutGroup
from async_rlhf.weights.broker import SharedMemoryTransport, WeightSyncBroker
from learners.learner import load_causal_lm
from learners.persistence import hf_state_dict
from reward_models.service import TrainReward
from tests.helpers import publish_state

pytestmark = pytest.mark.integration
PROMPTS = ["3914>", "50182>", "7777>", "9081726>"]


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    model = load_causal_lm(model_dir).eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=2,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_token_logprobs(model_dir: Path, prompt_ids: list[int], completion: list[int]) -> list[float]:
    model = load_causal_lm(model_dir).eval()
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return [logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion)]


def vllm_detokenized(actor: GeneratorActor, prompts: list[Prompt]) -> list[str]:
    """The same call's texts from vLLM's detokenizer (run inside the actor: its engine, its seeds)."""
    params = [actor._sampling_params(actor.cfg.samples_per_prompt, None, p.prompt_id) for p in prompts]
    for param in params:
        param.detokenize = True
    inputs: list = [{"prompt_token_ids": p.token_ids} for p in prompts]
    outputs = actor.llm.generate(inputs, params, use_tqdm=False)
    return [c.text for out in outputs for c in out.outputs]


def test_generate_sync_and_match_hf_greedy(ray_local, random_policies, tmp_path: Path) -> None:
    from async_rlhf.policies.embedded import build_tokenizer

    tok = build_tokenizer()
    start_dir, new_dir = random_policies
    prompts = [Prompt(i, text, tok(text)["input_ids"]) for i, text in enumerate(PROMPTS)]
    cfg = GenerationConfig(samples_per_prompt=3, max_new_tokens=8)
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1).remote(0, str(start_dir), cfg, 0, None)

    sampled = ray_local.get(actor.generate.remote(prompts))
    assert sampled.policy_version == 0 and len(sampled.groups) == len(PROMPTS)
    # The KV cache is what 256 sequences of max_model_len (64: one 128-token block) need, not the 1 GiB budget.
    assert ray_local.get(actor.__ray_call__.remote(kv_blocks)) == 256
    for prompt, group in zip(prompts, sampled.groups):
        assert group.prompt.prompt_id == prompt.prompt_id and len(group.completions) == 3
        for c in group.completions:
            assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
            assert c.reward_status == "pending" and c.reward is None
    # Behaviour logprobs are the sampling policy's: equal to a transformers forward pass.
    c = sampled.groups[0].completions[0]
    assert c.logprobs == pytest.approx(hf_token_logprobs(start_dir, prompts[0].token_ids, c.token_ids), abs=1e-4)
    # The texts, decoded once after the call, are those of vLLM's own per-step detokenizer.
    assert [c.text for g in sampled.groups for c in g.completions] == ray_local.get(
        actor.__ray_call__.remote(vllm_detokenized, prompts))

    # Publish other weights through the broker's slot ring, as the learner does, and let the actor load them.
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"))
    ref = publish_state(broker, 1, hf_state_dict(load_causal_lm(new_dir)))
    greedy = ray_local.get(actor.generate.remote(prompts, ref, n=1, temperature=0.0))
    assert greedy.policy_version == 1 and greedy.sync_s > 0
    assert all(g.policy_version == 1 for g in greedy.groups)
    changed = 0
    for prompt, group in zip(prompts, greedy.groups):
        vllm_ids = group.completions[0].token_ids
        assert vllm_ids == hf_greedy(new_dir, prompt.token_ids, 8)  # token for token
        changed += vllm_ids != hf_greedy(start_dir, prompt.token_ids, 8)
    assert changed > 0, "new weights should change at least one greedy output"
    # generation.top_k reaches vLLM: top_k=1 at temperature 1 samples the greedy tokens, each of probability 1 in
    # the truncated distribution the behaviour log-probs are of (why losses with ratios refuse it).
    ray_local.get(actor.__ray_call__.remote(lambda a: setattr(a, "cfg", cfg.model_copy(update={"top_k": 1}))))
    narrowed = ray_local.get(actor.generate.remote(prompts[:2]))
    for prompt, group in zip(prompts, narrowed.groups):
        assert all(c.token_ids == hf_greedy(new_dir, prompt.token_ids, 8) for c in group.completions)
        assert all(lp == pytest.approx(0.0, abs=1e-5) for c in group.completions for lp in c.logprobs)
    # generation.stop: a completion ends where "3" appears, kept at its end, in its ids as in its text.
    ray_local.get(actor.__ray_call__.remote(lambda a: setattr(a, "cfg", cfg.model_copy(update={"stop": ["3"]}))))
    stopped = [c for g in ray_local.get(actor.generate.remote(prompts)).groups for c in g.completions]
    assert all(c.text.find("3") in (-1, len(c.text) - 1) for c in stopped)
    ended = [c for c in stopped if c.text.endswith("3")]
    assert ended and all(c.finish_reason == "stop" and tok.decode(c.token_ids[-1:]) == "3" for c in ended)
    ray_local.kill(actor)
    broker.close()


def mean_logprob_gap(model_dir: Path, groups: list[RolloutGroup]) -> float:
    """Mean |behaviour - transformers float32| log-prob per sampled token."""
    gaps = [abs(a - b) for g in groups for c in g.completions
            for a, b in zip(c.logprobs, hf_token_logprobs(model_dir, g.prompt.token_ids, c.token_ids))]
    return sum(gaps) / len(gaps)


def kv_blocks(actor: GeneratorActor) -> int | None:
    return actor.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


def write_hf_config(directory: Path, **fields: int) -> str:
    (directory / "config.json").write_text(json.dumps(fields))
    return str(directory)


def test_the_cpu_kv_cache_is_what_the_longest_batch_needs_within_the_budget(tmp_path: Path) -> None:
    cfg = GenerationConfig(max_model_len=64)
    # 2 layers x 4 kv heads x 32 dims x (key, value) x 4 bytes = 2,048 B per token; 256 sequences x 128 tokens.
    tiny = write_hf_config(tmp_path, num_hidden_layers=2, num_attention_heads=4, hidden_size=128)
    assert cpu_kv_cache_bytes(cfg, tiny, "float32") == 256 * 128 * 2048 == 64 * 2**20
    assert cpu_kv_cache_bytes(cfg, tiny, "bfloat16") == 32 * 2**20
    # SmolLM2-135M at 256 tokens (2 blocks): 30 x 3 x 64 x 2 x 2 = 23,040 B per token: 1.4 GiB > the 1 GiB cap.
    smol = write_hf_config(tmp_path, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           hidden_size=576)
    assert cpu_kv_cache_bytes(GenerationConfig(max_model_len=256), smol, "bfloat16") == 2**30
    assert cpu_kv_cache_bytes(GenerationConfig(max_model_len=256, kv_cache_gib=4), smol, "bfloat16") == (
        256 * 256 * 23_040)
    explicit = write_hf_config(tmp_path, num_hidden_layers=2, num_attention_heads=4, hidden_size=128, head_dim=64)
    assert cpu_kv_cache_bytes(cfg, explicit, "float32") == 128 * 2**20  # head_dim given: not hidden / heads
    unknown = write_hf_config(tmp_path, n_layer=2)  # fields this cannot read: the configured budget
    assert cpu_kv_cache_bytes(cfg, unknown, "float32") == 2**30
    hybrid = write_hf_config(tmp_path, num_hidden_layers=2, num_attention_heads=4, hidden_size=128, mamba_d_state=16)
    assert cpu_kv_cache_bytes(cfg, hybrid, "float32") == 2**30  # a state per sequence too: the configured budget


VLLM_KV_REFUSALS = """
import json
from vllm.v1.core.kv_cache_utils import _check_enough_kv_cache_memory
said = []
for available in (0, 1024):  # no block at all; less than one sequence of 64 tokens needs
    try:
        _check_enough_kv_cache_memory(available, lambda: 64 * 2048, 64, lambda memory: 0)
    except ValueError as exc:
        said.append(str(exc))
print(json.dumps(said))
"""


def test_a_cpu_kv_cache_too_small_for_one_sequence_names_generation_kv_cache_gib() -> None:
    # vLLM's own refusals, with its wording, from a process of their own (vLLM is not imported into pytest's).
    out = subprocess.run([sys.executable, "-c", VLLM_KV_REFUSALS], capture_output=True, text=True, timeout=300)
    refusals = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(refusals) == 2, out.stderr[-2000:]
    cfg = GenerationConfig(max_model_len=64, kv_cache_gib=1e-6)
    for said in refusals:
        with pytest.raises(ValueError) as err, cpu_kv_cache_named(cfg, cuda=False):
            raise ValueError(said)
        assert str(err.value).startswith("the CPU KV cache is too small for one sequence of generation.max_model_len "
                                         "(64) tokens; raise generation.kv_cache_gib (now 1e-06) or lower")
        with pytest.raises(ValueError, match="gpu_memory_utilization"), cpu_kv_cache_named(cfg, cuda=True):
            raise ValueError(said)  # on a GPU it is the knob to turn


def engine_dtype(actor: GeneratorActor) -> str:
    return str(actor.llm.llm_engine.model_config.dtype)


def test_a_bfloat16_generator_samples_in_bf16_and_converts_float32_versions(ray_local, random_policies,
                                                                            tmp_path: Path) -> None:
    """generation.dtype=bfloat16 over float32 checkpoints (CPU): vLLM computes in bf16, its behaviour log-probs
    stay within bf16 rounding of a float32 forward, and a float32 version published by the learner is
    converted as it loads (the samples then follow the new weights, not the old)."""
    from async_rlhf.policies.embedded import build_tokenizer

    tok = build_tokenizer()
    start_dir, new_dir = random_policies
    prompts = [Prompt(i, text, tok(text)["input_ids"]) for i, text in enumerate(PROMPTS)]
    cfg = GenerationConfig(samples_per_prompt=2, max_new_tokens=8)
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1).remote(0, str(start_dir), cfg, 0, None, "bfloat16")
    assert ray_local.get(actor.__ray_call__.remote(engine_dtype)) == "torch.bfloat16"
    first = ray_local.get(actor.generate.remote(prompts)).groups
    assert 0 < mean_logprob_gap(start_dir, first) < 0.05

    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"))
    ref = publish_state(broker, 1, hf_state_dict(load_causal_lm(new_dir)))  # float32 tensors
    second = ray_local.get(actor.generate.remote(prompts, ref))
    assert second.policy_version == 1
    gap = mean_logprob_gap(new_dir, second.groups)
    assert 0 < gap < 0.05 and mean_logprob_gap(start_dir, second.groups) > 10 * gap
    ray_local.kill(actor)
    broker.close()


@pytest.fixture(scope="module")
def seeded_pair(ray_local, random_policies):
    """Generators 0 and 1 of one run (seed 7), started together; generator 0 scores the sort reward in its call
    when asked (reward.in_generator). Shared by the tests below: neither keeps state between calls."""
    from async_rlhf.policies.embedded import build_tokenizer

    tok = build_tokenizer()
    prompts = [Prompt(i, text, tok(text)["input_ids"], meta={"answer": "".join(sorted(text[:-1]))})
               for i, text in enumerate(PROMPTS)]
    cfg = GenerationConfig(samples_per_prompt=2, max_new_tokens=8)
    cls = ray_local.remote(GeneratorActor).options(num_cpus=1)
    first = cls.remote(0, str(random_policies[0]), cfg, 7, None, "float32", "shm", TrainReward("sort_partial"))
    second = cls.remote(1, str(random_policies[0]), cfg, 7, None)
    yield first, second, prompts
    ray_local.kill(first)
    ray_local.kill(second)


def test_sampling_is_seeded_per_prompt_across_generators(ray_local, seeded_pair) -> None:
    first, second, prompts = seeded_pair
    a = ray_local.get(first.generate.remote(prompts))
    b = ray_local.get(second.generate.remote(list(reversed(prompts))))  # other generator, other batch order
    def ids(result: GenerationResult) -> dict[int, list[list[int]]]:
        return {g.prompt.prompt_id: [c.token_ids for c in g.completions] for g in result.groups}

    assert ids(a) == ids(b)
    assert len({tuple(map(tuple, v)) for v in ids(a).values()}) == len(PROMPTS)  # prompts differ from each other


def test_a_rule_reward_scored_in_the_generators_call_equals_the_reward_actors(ray_local, seeded_pair) -> None:
    """reward.in_generator: the same RewardService code, run inside the generator's call, gives the same
    rewards as the reward actor, and a scorer's failure is a failure with its reason there too."""
    from reward_models.service import RewardService

    gen, _, prompts = seeded_pair
    local = ray_local.get(gen.generate.remote(prompts, score=True))
    actor = ray_local.remote(RewardService).options(num_cpus=0).remote({"train": "sort_partial"})
    remote = ray_local.get(actor.score.remote(ray_local.get(gen.generate.remote(prompts)).groups))
    def rewards(groups: list[RolloutGroup]) -> list[tuple[float | None, str]]:
        return [(c.reward, c.reward_status) for g in groups for c in g.completions]

    assert local.reward_s is not None and rewards(local.groups) == rewards(remote)
    assert all(status == "ok" for _, status in rewards(local.groups))
    unscored = ray_local.get(gen.generate.remote(prompts))
    assert unscored.reward_s is None and all(c.reward is None for g in unscored.groups for c in g.completions)
    ray_local.kill(actor)
