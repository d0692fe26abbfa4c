"""Learner throughput: tokens/s of `Learner.train_step` vs a bare DeepSpeed loop on the same batch.

    .venv/bin/python -m bench.learner_step [--size tiny] [--prompts 16] [--samples 4] [--repeats 10]

The batch is one step's worth of rollout groups (synthetic tokens of quickstart lengths, rewards
distinct so every group gives a DPO pair). The bare loop does the same arithmetic with nothing
around it: packed batch built once, policy forward + backward through a DeepSpeed engine with the
same config, reference forward, the DPO formula, `engine.step()`. The Learner adds selection,
packing, loss registry, metrics and the KL diagnostic. Both run in this process on one core, timed
alternately. Goal: learner >= 0.9 of bare.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from bench.common import alternate, build_policy, ratio_main

CORE = 1  # the learner's core when the pipeline overlaps generation and learning on two cores


def synthetic_groups(n_prompts: int, samples: int, vocab: int, prompt_len: int = 12, completion_len: int = 12):
    from async_rlhf.rollout import Completion, Prompt, RolloutGroup

    rng = random.Random(0)
    groups = []
    for i in range(n_prompts):
        prompt = Prompt(i, "", [1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)])
        completions = [Completion([rng.randrange(3, vocab) for _ in range(completion_len)], "", [-1.0] * completion_len,
                                  "length", reward=float(k), reward_status="ok") for k in range(samples)]
        groups.append(RolloutGroup(prompt, completions, 0, 0, 0.0))
    return groups


def bare_step_fn(engine, reference, batch, beta: float):
    """One DPO step with nothing around it; rows are [chosen..., rejected...] as the learner lays them out."""
    from learners.logprobs import completion_logprobs

    def step() -> None:
        logps = completion_logprobs(engine, batch)
        with torch.no_grad():
            ref = completion_logprobs(reference, batch)
        seq = ((logps - ref) * batch.completion_mask).sum(-1)
        half = seq.shape[0] // 2
        loss = -torch.nn.functional.logsigmoid(beta * (seq[:half] - seq[half:])).mean()
        engine.backward(loss)
        engine.step()

    return step


def measure(size: str, n_prompts: int, samples: int, repeats: int, workdir: Path) -> dict:
    import deepspeed

    from async_rlhf.config.run import load_config
    from learners.learner import Learner, deepspeed_config, load_causal_lm

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/quickstart.yaml")
    model_dir = build_policy(size, workdir / size)
    learner = Learner(cfg, str(model_dir), cores=[CORE], threads=1)
    groups = synthetic_groups(n_prompts, samples, learner.policy.config.vocab_size)
    batch = learner._pack(learner.spec.select(groups))
    policy = load_causal_lm(model_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay,
                                  fused=cfg.learner.fused_optimizer)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=deepspeed_config(cfg.learner))
    engine.train()
    reference = load_causal_lm(model_dir).eval().requires_grad_(False)
    runs = {"bare_deepspeed": bare_step_fn(engine, reference, batch, cfg.loss.beta),
            "learner": lambda: learner.train_step(groups)}
    samples_by_side = alternate(runs, repeats)
    tps = {k: batch.num_tokens / s.median for k, s in samples_by_side.items()}
    return {"size": size, "rows": int(batch.input_ids.shape[0]), "tokens_per_step": batch.num_tokens,
            "zero_stage": cfg.learner.zero_stage, "repeats": repeats,
            "seconds": {k: s.seconds for k, s in samples_by_side.items()}, "tokens_per_s": tps,
            "ratio": tps["learner"] / tps["bare_deepspeed"], "goal": 0.9}


def main(argv: list[str] | None = None) -> dict:
    return ratio_main(argv, __doc__, measure, "learner_step", repeats=10, title="learner tokens/s")


if __name__ == "__main__":
    main()
