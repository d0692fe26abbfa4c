"""One evaluator for policies trained anywhere (bench/vs_trl.py scores TRL's snapshots and our final policy
with it): the gold reward of a run config on its held-out eval prompts, sampled the way our runs evaluate.

The project's own parts, in this process (as `async-rlhf sample-pairs` runs them): one GeneratorActor (vLLM)
started on the starting policy, with the run's seed, so that each eval prompt is sampled with the same
per-prompt seed, once, at `generation.eval_temperature`, as in an `async-rlhf train` evaluation; the
run's gold scorer (RewardService). Another policy's weights are loaded into the same engine through the
"shm" weight-transfer engine, as a learner publishes a version, so no engine is started per policy.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from safetensors.torch import load_file

from actors.generator import GeneratorActor
from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.captured_output import output_to
from async_rlhf.rollout import scored_reward
from async_rlhf.tasks.builtin import load_task
from async_rlhf.weights.broker import WeightRef
from async_rlhf.weights.shm_ring import ShmSlotRing
from async_rlhf.weights.slot_location import slot_location
from reward_models.service import RewardService


def checkpoint_tensors(policy_dir: Path) -> dict:
    """The tensors of an HF checkpoint directory (every safetensors shard), by name."""
    shards = sorted(policy_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {policy_dir}")
    return {name: t for shard in shards for name, t in load_file(str(shard)).items()}


class GoldEvaluator:
    def __init__(self, cfg: RunConfig, start_policy: Path) -> None:
        self.cfg = cfg
        self.prompts = load_task(cfg, start_policy).eval_prompts()
        self.scratch = tempfile.TemporaryDirectory(prefix="async-rlhf-policy-eval-")  # removed at exit
        with output_to(Path(self.scratch.name) / "engine.log"):  # vLLM's start-up lines, off the terminal
            self.generator = GeneratorActor(0, str(start_policy), cfg.generation, cfg.seed,
                                            dtype=cfg.generator_dtype, scratch_dir=self.scratch.name)
        self.gold = RewardService({"gold": cfg.reward.gold}, cfg.reward.timeout_s)
        self.root = cfg.weight_sync.shm_root / f"async-rlhf-policy-eval-{uuid.uuid4().hex[:8]}"
        self.ring = ShmSlotRing(self.root)
        self.loaded = 0  # versions loaded so far: each load is a new version to the generator

    def score(self, policy_dir: Path | None) -> float:
        """Mean gold reward of `policy_dir`'s weights (None: the starting policy) on the eval prompts."""
        if policy_dir is None and self.loaded:
            raise RuntimeError("score the starting policy first: the engine holds other weights by now")
        weights = self._stage(policy_dir) if policy_dir is not None else None
        result = self.generator.generate(self.prompts, weights, n=1, temperature=self.cfg.generation.eval_temperature)
        values = [scored_reward(c) for g in self.gold.score(result.groups, "gold") for c in g.scored]
        return sum(values) / len(values)

    def _stage(self, policy_dir: Path) -> WeightRef:
        """Write the weights into the ring's one slot; the generator loads them at its next call."""
        self.ring.write(0, checkpoint_tensors(policy_dir))
        self.loaded += 1
        return WeightRef(self.loaded, "shm", slot_location(self.root, 0))

    def close(self) -> None:
        self.ring.close()
        shutil.rmtree(self.root, ignore_errors=True)
