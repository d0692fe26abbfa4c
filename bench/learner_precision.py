"""Learner mixed precision: `Learner.train_step` with learner.autocast=none against =bfloat16, same batch.

    async-rlhf bench learner_precision [--config configs/smollm2_gold_proxy.yaml] [--prompts 8] [--samples 2]
        [--prompt-tokens 64] [--repeats 5] [--threads 2]

The model and settings are the config's (by default SmolLM2-135M: `async-rlhf prepare smollm2` once). One
step's rollout groups: prompts of --prompt-tokens and the config's max_new_tokens of synthetic ids, distinct
rewards so every group gives a DPO pair. Two Learners in this process, one per precision,
both from the same weights, on all the machine's cores (the learner's share while the generators idle),
stepped alternately on the same groups (bench.common.alternate). Before any step it also compares the two
learners' log-probs of the batch (per token: how far bf16 compute moves them from float32's).
"""
from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from async_rlhf.cli.arguments import positive_int
from bench.common import RESULTS, ROOT, alternate, bar_plot, write_result
from bench.learner_step import synthetic_groups

CONFIG = ROOT / "configs" / "smollm2_gold_proxy.yaml"


def make_learner(config: Path, overrides: list[str], threads: int):  # -> learners.learner.Learner
    """A Learner of `config` with `overrides` (the train reward is not loaded), on the first `threads` cores."""
    from async_rlhf.config.run import load_config
    from async_rlhf.policies.embedded import ensure_policy
    from learners.learner import Learner

    cfg = load_config(config, ["reward.learned=null", *overrides])
    cores = sorted(os.sched_getaffinity(0))[:threads]
    return Learner(cfg, str(ensure_policy(cfg)), cores=cores, threads=threads)


def logprob_drift(fp32, bf16, groups: list) -> dict:
    """|bf16 - float32| per completion token of the batch, both learners' untrained policies."""
    from learners.logprobs import completion_logprobs

    batch = fp32._pack(fp32.spec.select(groups))
    with torch.no_grad():
        full = completion_logprobs(fp32.policy, batch, fp32.temperature)
        with bf16.compute():
            half = completion_logprobs(bf16.policy, batch, bf16.temperature)
    diff = (half - full).abs()[batch.completion_mask > 0]
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "tokens": int(diff.numel())}


def measure(config: Path, prompts: int, samples: int, prompt_tokens: int, repeats: int, threads: int) -> dict:
    learners = {name: make_learner(config, [f"learner.autocast={name}"], threads) for name in ("none", "bfloat16")}
    new_tokens = learners["none"].cfg.generation.max_new_tokens
    vocab = learners["none"].policy.config.vocab_size
    groups = synthetic_groups(prompts, samples, vocab, prompt_len=prompt_tokens, completion_len=new_tokens)
    drift = logprob_drift(learners["none"], learners["bfloat16"], groups)
    seconds = alternate({name: partial(lr.train_step, groups) for name, lr in learners.items()}, repeats)
    median = {name: s.median for name, s in seconds.items()}
    return {"config": config.name, "prompts": prompts, "samples": samples, "threads": threads, "repeats": repeats,
            "tokens_per_step": prompts * samples * (prompt_tokens + new_tokens),
            "seconds": {name: s.seconds for name, s in seconds.items()}, "median_s": median,
            "speedup": median["none"] / median["bfloat16"], "logprob_drift": drift}


def step_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options of the in-process learner benchmarks: config, the synthetic step, repeats, threads, out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--prompts", type=positive_int, default=8)
    parser.add_argument("--samples", type=positive_int, default=2)
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=RESULTS / out)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = step_parser(__doc__.splitlines()[0], "bench_learner_precision").parse_args(argv)
    result = measure(args.config, args.prompts, args.samples, args.prompt_tokens, args.repeats, args.threads)
    median = result["median_s"]
    title = f"{args.config.stem}: learner step ({args.threads} threads)"
    bar_plot(write_result(args.out, result), title, list(median), list(median.values()), "s/step")
    drift = result["logprob_drift"]
    print(f"s/step: float32 {median['none']:.2f}, bf16 autocast {median['bfloat16']:.2f}; speed-up "
          f"{result['speedup']:.2f}x; log-prob drift per token mean {drift['mean_abs']:.4f}, "
          f"max {drift['max_abs']:.4f}")
    return result


if __name__ == "__main__":
    main()
