"""The "shm" weight-transfer engine inside a real vLLM engine (GeneratorActor on CPU): after a load the
kernels (re-packed for oneDNN) serve the new weights, the prefix cache holds nothing computed with the old
ones, and nothing stays aliased to the slot the broker may reuse."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from actors.generator import GeneratorActor
from async_rlhf.config.generation import GenerationConfig
from async_rlhf.config.model import EmbeddedModelConfig
from async_rlhf.rollout import Prompt
from async_rlhf.weights.broker import SharedMemoryTransport, WeightRef, WeightSyncBroker
from async_rlhf.weights.shm_ring import ShmSlotRing
from learners.learner import load_causal_lm
from learners.persistence import hf_state_dict
from tests.helpers import publish_state, shm_slot

pytestmark = pytest.mark.integration
LONG = 512  # positions: prompts longer than vLLM-CPU's 128-token KV block, so a prefix can be cached


@pytest.fixture(scope="module")
def long_policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from async_rlhf.policies.embedded import build_model, build_tokenizer

    root, tokenizer, dirs = tmp_path_factory.mktemp("long"), build_tokenizer(), []
    for seed in (0, 1):
        torch.manual_seed(seed)
        build_model(EmbeddedModelConfig(), len(tokenizer), max_positions=LONG).save_pretrained(root / f"s{seed}")
        tokenizer.save_pretrained(root / f"s{seed}")
        dirs.append(root / f"s{seed}")
    return dirs[0], dirs[1]


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    model = load_causal_lm(model_dir).eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=2,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_load_reaches_kernels_resets_prefix_cache_and_copies(ray_local, long_policies, tmp_path: Path) -> None:
    from async_rlhf.policies.embedded import build_tokenizer

    tok, (old_dir, new_dir) = build_tokenizer(), long_policies
    shared = "3141592653" * 30  # 300 tokens shared by every prompt: two whole 128-token blocks
    prompts = [Prompt(i, shared + s + ">", tok(shared + s + ">")["input_ids"]) for i, s in enumerate(["1", "27", "9"])]
    cfg = GenerationConfig(samples_per_prompt=1, max_new_tokens=6, max_model_len=LONG)
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1, max_restarts=1).remote(0, str(old_dir), cfg, 0, None)
    def greedy(ps: list[Prompt], ref: WeightRef | None = None) -> list[list[int]]:
        result = ray_local.get(actor.generate.remote(ps, ref, n=1, temperature=0.0))
        return [g.completions[0].token_ids for g in result.groups]

    assert greedy(prompts[:1]) == [hf_greedy(old_dir, prompts[0].token_ids, 6)]  # caches the shared prefix

    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=1)
    new_state, old_state = hf_state_dict(load_causal_lm(new_dir)), hf_state_dict(load_causal_lm(old_dir))
    ref = publish_state(broker, 1, new_state)
    # Every later prompt shares 300 tokens with the cached one: with old KV blocks reused, the new
    # weights would see an old-policy prefix and their greedy output would differ from transformers'.
    want = [hf_greedy(new_dir, p.token_ids, 6) for p in prompts[1:]]
    assert greedy(prompts[1:], ref) == want
    assert want != [hf_greedy(old_dir, p.token_ids, 6) for p in prompts[1:]]  # the weights do matter

    # The broker reuses the slot for a later version (keep_versions=1, no lease): overwriting it must not
    # change the loaded engine, so nothing of version 1 may still point into the slot.
    root, slot = shm_slot(ref.location)
    assert shm_slot(broker.staging_location(2)) == (root, slot + 1)  # v1 is still kept
    ShmSlotRing(root).write(slot, old_state)
    assert greedy(prompts[1:]) == want

    # The trainer side of the same backend drives the round trip itself (push, as vLLM's NCCL trainer
    # engine does): the old weights go back in through init -> start -> update -> finish.
    from async_rlhf.weights.shm_engine import ShmTrainerInitInfo, ShmTrainerWeightTransferEngine

    client = ActorClient(ray_local, actor, version=3)
    trainer = ShmTrainerWeightTransferEngine.trainer_init(ShmTrainerInitInfo(str(tmp_path / "push"), rank=0),
                                                          client=client)
    trainer.send_weights(slot=0, state=old_state)
    assert client.calls == ["init", "start", "update", "finish"]
    assert greedy(prompts[1:]) == [hf_greedy(old_dir, p.token_ids, 6) for p in prompts[1:]]

    # An update that fails part way leaves the engine's weights unknown (and vLLM refusing later updates after a
    # failed finish): the process exits and Ray starts it again clean, as after any generator death.
    pid = ray_local.get(actor.info.remote())["pid"]
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(actor.receive_weights.remote({"slot": 99}, 4))  # no such slot in the trainer's ring
    info = answer_once_restarted(ray_local, actor)
    assert info["pid"] != pid and info["restarted"] and info["version"] == 0
    ray_local.kill(actor)
    broker.close()


def test_a_version_prepared_beside_sampling_is_the_one_sampled(ray_local, long_policies, tmp_path: Path) -> None:
    """The broker announces each version; while a call samples, the generator's thread prepares it (ShadowWeights)
    and the call that asks for it only swaps it in. An idle generator loads it in that call instead, and another
    version prepared meanwhile is never what gets sampled."""
    from async_rlhf.policies.embedded import build_tokenizer

    tok, (old_dir, new_dir) = build_tokenizer(), long_policies
    shared = "2718281828" * 30  # a cached prefix would keep the old policy's KV blocks after the swap
    prompts = [Prompt(i, shared + s + ">", tok(shared + s + ">")["input_ids"]) for i, s in enumerate(["4", "58"])]
    cfg = GenerationConfig(samples_per_prompt=1, max_new_tokens=6, max_model_len=LONG)
    actor = ray_local.remote(GeneratorActor).options(num_cpus=1).remote(0, str(old_dir), cfg, 0, None)

    def greedy(ref: WeightRef) -> list[list[int]]:
        result = ray_local.get(actor.generate.remote(prompts, ref, n=1, temperature=0.0))
        return [g.completions[0].token_ids for g in result.groups]

    def long_loads(a: GeneratorActor) -> None:  # this tiny policy stands for a model big enough to prepare
        a.llm.collective_rpc(lambda worker: setattr(worker.weight_transfer_engine, "prepare_min_bytes", 0))

    def engine_state(a: GeneratorActor) -> tuple[bool, str | None, int]:
        engine = a.llm.collective_rpc(lambda worker: worker.weight_transfer_engine)[0]
        ready = engine.shadow.ready[0] if engine.shadow and engine.shadow.ready else None
        return engine.shadow_wanted, ready, engine.shadow.swaps if engine.shadow else 0

    def state() -> tuple[bool, str | None, int]:  # (the map asked for, the version ready, swaps so far)
        return ray_local.get(actor.__ray_call__.remote(engine_state))

    def announced_while_generating(until: tuple[bool, str | None, int], *versions: tuple[int, dict],
                                   settle: float = 0.0) -> list:
        # `generating` stands for a call sampling meanwhile: Ray runs this actor's calls one at a time, so the test
        # could not ask it anything while a real one ran.
        ray_local.get(actor.__ray_call__.remote(lambda a: setattr(a, "generating", True)))
        refs = [publish_state(broker, version, weights) for version, weights in versions]
        time.sleep(settle)
        deadline = time.monotonic() + 60
        while state() != until:
            assert time.monotonic() < deadline, f"the generator never reached {until}: {state()}"
            time.sleep(0.05)
        ray_local.get(actor.__ray_call__.remote(lambda a: setattr(a, "generating", False)))
        return refs

    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=2)
    new_state, old_state = hf_state_dict(load_causal_lm(new_dir)), hf_state_dict(load_causal_lm(old_dir))
    want_new, want_old = ([hf_greedy(d, p.token_ids, 6) for p in prompts] for d in (new_dir, old_dir))
    assert greedy(publish_state(broker, 1, new_state)) == want_new
    [ref] = announced_while_generating((False, None, 0), (2, old_state), settle=0.3)  # too small to prepare
    assert greedy(ref) == want_old
    ray_local.get(actor.__ray_call__.remote(long_loads))
    ref = publish_state(broker, 3, new_state)
    time.sleep(0.3)  # announced to an idle generator: loaded in the call, and no map is taken for it
    assert state() == (False, None, 0) and greedy(ref) == want_new
    [ref] = announced_while_generating((True, None, 0), (4, old_state))  # the first one asks for the map...
    assert greedy(ref) == want_old and state() == (False, None, 0)  # ...which this load takes, then loads
    [ref] = announced_while_generating((False, "0:5", 0), (5, new_state))
    assert greedy(ref) == want_new and state() == (False, None, 1)  # swapped in
    # Version 7 is ready when version 6 is asked for: 6 loads in full (and 7's preparation goes), then 7 too.
    six, seven = announced_while_generating((False, "0:7", 1), (6, old_state), (7, new_state))
    assert greedy(six) == want_old and greedy(seven) == want_new and state() == (False, None, 1)
    ray_local.kill(actor)
    broker.close()


def answer_once_restarted(ray, actor) -> dict:
    """info() from the actor's new process: calls made while Ray restarts it fail at once (the pool probes so too)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return ray.get(actor.info.remote())
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, "the generator did not come back"
            time.sleep(1.0)


class ActorClient:
    """vLLM's trainer-side client protocol over a GeneratorActor (start and finish happen inside its
    receive_weights call, so a batch never sees half-swapped weights)."""

    def __init__(self, ray, actor, version: int) -> None:
        self.ray, self.actor, self.version = ray, actor, version
        self.calls: list[str] = []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.calls.append("init")
        self.ray.get(self.actor.init_weight_transfer.remote(init_info))

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict) -> None:
        self.calls.append("update")
        self.ray.get(self.actor.receive_weights.remote(update_info, self.version))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")


