"""Learner settings side by side: `Learner.train_step` under two or more sets of config overrides, same batch.

    async-rlhf bench learner_settings [--config configs/smollm2_gold_proxy.yaml] [--prompts 8] [--samples 2]
        [--prompt-tokens 64] [--repeats 5] [--threads 2]
        [--arms foreach=learner.fused_optimizer=false fused=learner.fused_optimizer=true]

Each arm is NAME=KEY=VALUE[,KEY=VALUE...]; the default compares AdamW's for-each kernels with its fused
one. Like `bench learner_precision`: one Learner per arm in this process, from the same weights, on the
same synthetic rollout groups, stepped alternately. Besides the seconds per step it counts the process's
minor page faults and system CPU seconds in each step (on CPU every fresh page of a large temporary is a
fault: a large part of a SmolLM2 step), and at the end how far each arm's weights have moved from the first
arm's (settings that should only change speed round differently, nothing more).
"""
from __future__ import annotations

import resource
import statistics
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import alternate, bar_plot, write_result
from bench.learner_precision import make_learner, step_parser
from bench.learner_step import synthetic_groups

DEFAULT_ARMS = ["foreach=learner.fused_optimizer=false", "fused=learner.fused_optimizer=true"]


def parse_arms(specs: list[str]) -> dict[str, list[str]]:
    """NAME=KEY=VALUE[,KEY=VALUE...] -> {NAME: [KEY=VALUE, ...]}, in the given order."""
    arms = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            raise SystemExit(f"bench error: arm {spec!r} is not NAME=KEY=VALUE[,KEY=VALUE...]")
        arms[name] = overrides.split(",")
    if len(arms) < 2:
        raise SystemExit("bench error: give at least two arms with distinct names")
    return arms


def counted(step: Callable[[], Any], faults: list[int], system_s: list[float]) -> Callable[[], None]:
    """`step`, appending its minor page faults and system CPU seconds (this process's) to the lists."""
    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF)
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system_s.append(round(after.ru_stime - before.ru_stime, 3))
    return run


def weight_drift(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |a - b| over every parameter of two models of one architecture."""
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def measure(config: Path, arms: dict[str, list[str]], prompts: int, samples: int, prompt_tokens: int,
            repeats: int, threads: int) -> dict:
    learners = {name: make_learner(config, overrides, threads) for name, overrides in arms.items()}
    first = next(iter(learners.values()))
    groups = synthetic_groups(prompts, samples, first.policy.config.vocab_size, prompt_len=prompt_tokens,
                              completion_len=first.cfg.generation.max_new_tokens)
    faults: dict[str, list[int]] = {name: [] for name in arms}
    system_s: dict[str, list[float]] = {name: [] for name in arms}
    runs: dict[str, Callable[[], object]] = {
        name: counted(partial(lr.train_step, groups), faults[name], system_s[name]) for name, lr in learners.items()}
    seconds = alternate(runs, repeats)
    median = {name: s.median for name, s in seconds.items()}
    timed = slice(-repeats, None)  # the warm-up round is counted too; leave it out
    return {"config": config.name, "arms": arms, "prompts": prompts, "samples": samples, "threads": threads,
            "repeats": repeats, "seconds": {name: s.seconds for name, s in seconds.items()}, "median_s": median,
            "median_faults": {name: statistics.median(f[timed]) for name, f in faults.items()},
            "median_system_s": {name: statistics.median(s[timed]) for name, s in system_s.items()},
            "speedup_over_first": {name: median[next(iter(arms))] / m for name, m in median.items()},
            "weight_drift_from_first": {name: weight_drift(first.policy, lr.policy) for name, lr in learners.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__.splitlines()[0], "bench_learner_settings")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    args = parser.parse_args(argv)
    arms = parse_arms(args.arms)
    result = measure(args.config, arms, args.prompts, args.samples, args.prompt_tokens, args.repeats, args.threads)
    median = result["median_s"]
    title = f"{args.config.stem}: learner step ({args.threads} threads)"
    bar_plot(write_result(args.out, result), title, list(median), list(median.values()), "s/step")
    for name in arms:
        print(f"{name}: {median[name]:.2f} s/step ({result['speedup_over_first'][name]:.2f}x the first), "
              f"{result['median_faults'][name]:.0f} page faults and {result['median_system_s'][name]:.1f} "
              f"system s per step, weights {result['weight_drift_from_first'][name]:.1e} from the first's")
    return result


if __name__ == "__main__":
    main()
