"""Every sample is exactly the version it is tagged with, through the real engine, the real broker and its
slot ring, for any N and either speed ratio: batches leased with version v and still queued on a generator
while the learner publishes up to N newer versions (which reuse freed slots), batches of older versions
queued behind newer ones (fixed delay, evaluation), and two generators finishing out of order.

Every version is a differently initialised model, so a greedy output identifies the weights that made it:
each batch's output must equal transformers' greedy output with the weights of its tagged version."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.generator import GeneratorActor
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.config.model import EmbeddedModelConfig
from async_rlhf.rollout import Prompt
from async_rlhf.weights.broker import SharedMemoryTransport, WeightRef, WeightSyncBroker
from async_rlhf.weights.shm_ring import ShmSlotRing
from learners.persistence import hf_state_dict
from tests.helpers import shm_slot

pytestmark = pytest.mark.integration
PROMPTS = ["3914>", "50182>", "7777>", "9081726>"]
NEW_TOKENS = 8


class Versions:
    """Version v = a tiny Llama initialised with seed v, built on demand."""

    def __init__(self) -> None:
        from async_rlhf.policies.embedded import build_tokenizer

        self.tokenizer = build_tokenizer()
        self.models: dict[int, LlamaForCausalLM] = {}

    def model(self, version: int) -> LlamaForCausalLM:
        from async_rlhf.policies.embedded import build_model

        if version not in self.models:
            torch.manual_seed(1000 + version)
            self.models[version] = build_model(EmbeddedModelConfig(), len(self.tokenizer)).eval()
        return self.models[version]

    def greedy(self, version: int, prompt_ids: list[int]) -> list[int]:
        model: Any = self.model(version)  # transformers types generate's self as another class
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=2, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()


def publish(broker: WeightSyncBroker, ring: ShmSlotRing, versions: Versions, version: int) -> None:
    """The learner's write into the staged slot, then the controller's publication."""
    _, slot = shm_slot(broker.staging_location(version))
    ring.write(slot, hf_state_dict(versions.model(version)))
    broker.publish(version)


def test_batches_sample_exactly_their_leased_version(ray_local, tmp_path: Path) -> None:
    versions = Versions()
    model_dir = tmp_path / "v0"
    versions.model(0).save_pretrained(model_dir)
    versions.tokenizer.save_pretrained(model_dir)
    prompts = [Prompt(i, t, versions.tokenizer(t)["input_ids"]) for i, t in enumerate(PROMPTS)]
    cfg = GenerationConfig(samples_per_prompt=1, max_new_tokens=NEW_TOKENS)
    cls = ray_local.remote(GeneratorActor).options(num_cpus=0)
    fast, slow = cls.remote(0, str(model_dir), cfg, 0, None), cls.remote(1, str(model_dir), cfg, 0, None)
    # keep_versions=1: every slot not leased is reused at once, so only the leases protect queued batches.
    root = tmp_path / "shm"
    broker, ring = WeightSyncBroker(SharedMemoryTransport(root), keep_versions=1, initial_version=-1), ShmSlotRing(root)
    publish(broker, ring, versions, 0)
    jobs: list[tuple[WeightRef, object]] = []

    def submit(actor, version: int, batch: list[Prompt]) -> None:
        ref = broker.lease(version)
        jobs.append((ref, actor.generate.remote(batch, ref, n=1, temperature=0.0)))

    for n in (2, 4, 8):
        start = broker.latest_version
        submit(slow, start, prompts)  # queued; the learner runs ahead by n versions before it is served
        for step in range(1, n + 1):
            publish(broker, ring, versions, start + step)
            submit(fast, start + step, prompts[:1])  # a fast generator follows every version
        submit(slow, start + 1, prompts[2:])  # an older version queued behind newer ones (fixed delay)
        submit(fast, start, prompts[1:3])  # and on the other generator, out of order with the slow one
    # The reverse ratio: a slow learner, many batches of one version on both generators.
    last = broker.latest_version
    for actor in (fast, slow, fast, slow):
        submit(actor, last, prompts)

    results = ray_local.get([job for _, job in jobs])
    for (ref, _), result in zip(jobs, results):
        broker.release(ref.version)
        assert result.policy_version == ref.version and all(g.policy_version == ref.version for g in result.groups)
        got = [g.completions[0].token_ids for g in result.groups]
        assert got == [versions.greedy(ref.version, g.prompt.token_ids) for g in result.groups], ref
    outputs = {tuple(versions.greedy(v, prompts[0].token_ids)) for v in range(last + 1)}
    assert len(outputs) > last // 2  # versions differ
    assert broker.available() == [last]  # every lease released, every older slot freed
    for actor in (fast, slow):
        ray_local.kill(actor)
    broker.close()
