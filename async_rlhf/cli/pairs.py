"""`async-rlhf sample-pairs`: preference pairs for a proxy reward model, labelled by the gold scorer.

The policy of a run config (model.path) samples K responses to each of the first N train prompts
of its task (vLLM, the run's generator class, in this process); the config's gold scorer
(reward.gold) scores them; the best and the worst become one pair (`chosen`, `rejected`).
Prompts whose best and worst are within `min_margin` give no pair (the label would be noise).
With K=2 this is the seed paper's recipe; a larger K gives pairs with a clearer margin.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.captured_output import output_to
from async_rlhf.rollout import RolloutGroup
from learners.preference import best_and_worst


def pair_record(group: RolloutGroup, min_margin: float) -> dict | None:
    """One pair from a scored group: the highest and lowest gold score, if they differ by > min_margin
    (ties: learners/preference.py)."""
    picked = best_and_worst(group.scored, min_margin)
    if picked is None:
        return None
    best, worst = picked
    return {"prompt": group.prompt.text, "chosen": best.text, "rejected": worst.text,
            "chosen_score": best.reward, "rejected_score": worst.reward, "prompt_id": group.prompt.prompt_id}


def sample_pairs(cfg: RunConfig, out: Path, prompts: int, samples: int = 2, min_margin: float = 0.0,
                 batch: int = 64, log: Callable[[str], None] = print) -> dict:
    """Write the pairs as JSONL to `out`; return counts and timings."""
    if cfg.model.source != "local" or cfg.model.path is None:
        raise ConfigError("config error: sample-pairs needs model.source=local and model.path (the policy to sample)")
    if samples < 2:
        raise ConfigError(f"config error: sample-pairs: --samples must be >= 2 to make a pair (got {samples})")
    from actors.generator import GeneratorActor
    from async_rlhf.tasks.builtin import load_task
    from reward_models.columns import reward_columns
    from reward_models.service import RewardService

    task = load_task(cfg, cfg.model.path, reward_columns(cfg))
    scratch = tempfile.TemporaryDirectory(prefix="async-rlhf-pairs-")  # removed at exit (temp_files_in)
    out.parent.mkdir(parents=True, exist_ok=True)
    engine_log = out.with_name(out.name + ".engine.log")
    log(f"sample-pairs: starting the vLLM engine (its output: {engine_log})")
    with output_to(engine_log):
        generator = GeneratorActor(0, str(cfg.model.path), cfg.generation, cfg.seed, dtype=cfg.generator_dtype,
                                   scratch_dir=scratch.name)
    gold = RewardService({"gold": cfg.reward.gold}, cfg.reward.timeout_s)
    start, written, counts = time.perf_counter(), 0, {"prompts": 0, "ties": 0, "failed": 0}
    with out.open("w") as sink:
        for first in range(0, prompts, batch):
            chunk = [task.train_prompt(i) for i in range(first, min(first + batch, prompts))]
            groups = gold.score(generator.generate(chunk, None, n=samples).groups, "gold")
            for group in groups:
                pair = pair_record(group, min_margin)
                counts["prompts"] += 1
                counts["failed"] += len(group.completions) - len(group.scored)
                counts["ties"] += pair is None
                if pair is not None:
                    sink.write(json.dumps(pair) + "\n")
                    written += 1
            log(f"sample-pairs: {counts['prompts']}/{prompts} prompts, {written} pairs")
    return {"pairs": written, **counts, "seconds": round(time.perf_counter() - start, 1), "out": str(out)}
