"""Evaluator: gold reward (and the proxy, KL to the reference, the win-rate against the dataset's
reference answers where there are any, and the gold win-rate against the starting policy) of the
policy on the held-out set.

The win-rate against the starting policy is the seed paper's measure: each eval prompt's sample now
against the starting policy's sample of the same prompt (from the version-0 evaluation), judged by
the gold reward, ties half. Eval sampling is seeded per prompt, so the pairs share random numbers.
Those starting scores are kept in the run directory (eval_initial.json) so a resumed run, which does
not evaluate version 0 again, still reports the win-rate.

Each record also says when it was taken: `wall_s`, seconds from the process's start to the start of
the evaluation (the scored weights existed then), `eval_s`, how long the evaluation took (it runs beside
training: eval_schedule.py), and `eval_gen_s`, generator 0's time in it (weight load and sampling); the
scheduler adds `eval_blocking_s`, what the loop waited for it. Subtracting the earlier records'
`eval_blocking_s` from `wall_s` gives the training clock without the evaluations.

The KL is computed from the log-probs the generator reported with the samples (the evaluated weights'),
against the reference at the eval temperature: the learner may have taken steps since the samples were
drawn, so its own weights are no longer the evaluated ones.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import ray

from actors.generation_result import GenerationResult
from async_rlhf.pipeline.timing import process_started_at
from async_rlhf.rollout import EVAL_ID_OFFSET, Completion, Prompt, RolloutGroup, scored_reward
from async_rlhf.weights.broker import WeightRef


def _mean_reward(groups: list[RolloutGroup]) -> float | None:
    values = [scored_reward(c) for g in groups for c in g.scored]
    return sum(values) / len(values) if values else None


def failed_rewards(groups: list[RolloutGroup]) -> tuple[int, int, str | None]:
    """How many completions have no reward (failed or timed out), of how many, and the first one's reason."""
    completions = [c for g in groups for c in g.completions]
    failed = [c for c in completions if c.reward_status != "ok"]
    return len(failed), len(completions), failed[0].reward_error if failed else None


def reference_groups(groups: list[RolloutGroup]) -> list[RolloutGroup]:
    """Each group that has a reference answer, with that answer as its only completion (to be scored
    like a sample); groups without one are left out."""
    out = []
    for group in groups:
        if "reference" in group.prompt.meta:
            answer = Completion([], str(group.prompt.meta["reference"]), [], "stop")
            out.append(RolloutGroup(group.prompt, [answer], group.policy_version, group.generator_id, group.created_at))
    return out


def win_rate(samples: list[RolloutGroup], references: list[RolloutGroup]) -> float | None:
    """Share of prompts whose sample outscores the reference (ties count half), over the prompts where
    both were scored; None when there are none."""
    ref_by_id = {g.prompt.prompt_id: g.scored for g in references}
    outcomes = []
    for group in samples:
        ref = ref_by_id.get(group.prompt.prompt_id)
        if ref and group.scored:
            sample, answer = scored_reward(group.scored[0]), scored_reward(ref[0])
            outcomes.append(1.0 if sample > answer else 0.5 if sample == answer else 0.0)
    return sum(outcomes) / len(outcomes) if outcomes else None


def paired_win_rate(now: dict[int, float], before: dict[int, float]) -> dict:
    """Win-rate of `now` over `before` on their common prompt ids (ties half), its standard error and count."""
    common = sorted(set(now) & set(before))
    if not common:
        return {"win_rate_vs_initial": None, "win_rate_vs_initial_se": None, "win_rate_vs_initial_n": 0}
    wins = [1.0 if now[i] > before[i] else 0.5 if now[i] == before[i] else 0.0 for i in common]
    mean = sum(wins) / len(wins)
    var = sum((w - mean) ** 2 for w in wins) / max(len(wins) - 1, 1)
    return {"win_rate_vs_initial": mean, "win_rate_vs_initial_se": math.sqrt(var / len(wins)),
            "win_rate_vs_initial_n": len(wins)}


def clock_fields(started: float, ended: float, process_start: float) -> dict:
    """When an evaluation ran (epoch seconds in): `wall_s` since the process started, `eval_s` its duration."""
    return {"wall_s": round(started - process_start, 3), "eval_s": round(ended - started, 3)}


def gold_by_prompt(groups: list[RolloutGroup]) -> dict[int, float]:
    return {g.prompt.prompt_id: scored_reward(g.scored[0]) for g in groups if g.scored}


def kept_samples(gold: list[RolloutGroup], proxy: list[RolloutGroup], count: int) -> list[dict]:
    """The completions of the first `count` eval prompts (the same ones at every evaluation), each with its gold
    and proxy reward (null where it failed): what the policy writes, beside the means."""
    pairs = sorted(zip(gold, proxy), key=lambda pair: pair[0].prompt.prompt_id)[:count]
    return [{"prompt_id": g.prompt.prompt_id - EVAL_ID_OFFSET, "prompt": g.prompt.text, "completion": done.text,
             "gold": done.reward, "proxy": scored.reward}
            for g, p in pairs for done, scored in zip(g.completions, p.completions)]


class Evaluator:
    def __init__(self, prompts: list[Prompt], reward: Any, temperature: float,
                 judge: Literal["gold", "train"] = "gold", initial_path: Path | None = None,
                 start_is_reference: bool = True, samples: int = 0) -> None:
        self.prompts = prompts
        self.samples = samples  # completions kept in each record (eval.samples)
        self.reward = reward  # RewardService actor handle
        self.temperature = temperature
        self.judge = judge  # the role that compares samples with references
        self.initial_path = initial_path
        self.start_is_reference = start_is_reference  # version 0 is the learner's reference (no model.reference_path)
        self.process_start = process_started_at()
        # gold score per eval prompt of the starting policy (version 0), kept from an earlier run of this directory
        self.initial: dict[int, float] = {}
        if initial_path is not None and initial_path.exists():
            self.initial = {int(k): float(v) for k, v in json.loads(initial_path.read_text()).items()}

    def sample(self, generator: Any, prompts: list[Prompt], weights: WeightRef | None) -> Any:
        """Send the generate call for `prompts` (some or all of the eval prompts) now; an actor runs its calls in
        the order they were sent, so calls sent to `generator` after this one sample after it, with their own
        weights. Sampling is seeded per prompt: a prompt's sample does not depend on the call it is in."""
        return generator.generate.remote(prompts, weights, n=1, temperature=self.temperature)

    def chunks(self, size: int) -> list[list[Prompt]]:
        """The eval prompts in calls of `size` (0: one call)."""
        size = size or len(self.prompts)
        return [self.prompts[i:i + size] for i in range(0, len(self.prompts), size)]

    def score(self, result: GenerationResult) -> list[Any]:
        """The reward calls for a sample, sent together: gold, proxy and, where the prompts have reference
        answers, those answers by the win-rate's judge."""
        refs = [self.reward.score.remote(result.groups, "gold"), self.reward.score.remote(result.groups, "train")]
        references = reference_groups(result.groups)
        if references:
            refs.append(self.reward.score.remote(references, self.judge))
        return refs

    def kl(self, learner: Any, proxy: list[RolloutGroup]) -> Any:
        """The KL call: from the generator's own log-probs, so it is the sampled version's even when the
        learner has taken steps since (Learner.sampled_kl_to_reference). Version 0 is the reference itself
        unless model.reference_path names another: its KL is 0 by definition, and the reference pass over every
        eval sample that would measure it is skipped (on SmolLM2 that pass held the learner's one core ~45 s
        before its first step)."""
        if self.start_is_reference and proxy and all(g.policy_version == 0 for g in proxy):
            return ray.put(0.0)
        return learner.sampled_kl_to_reference.remote(proxy, self.temperature)

    def record(self, result: GenerationResult, scored: list[list[RolloutGroup]], kl: float, started: float,
               ended: float | None = None) -> dict:
        """eval.jsonl's record from the answers of `score` (gold, proxy, references) and `kl` (`ended`: when the
        last of them came, default now)."""
        gold, proxy, *references = scored
        if result.policy_version == 0:
            self._keep_initial(gold_by_prompt(gold))
        judged = gold if self.judge == "gold" else proxy
        return {
            "version": result.policy_version,
            "gold_reward": _mean_reward(gold),
            "gold_failed": failed_rewards(gold)[0],  # left out of gold_reward's mean (eval_schedule says why)
            "proxy_reward": _mean_reward(proxy),
            "kl": kl,
            "win_rate": win_rate(judged, references[0]) if references else None,
            **paired_win_rate(gold_by_prompt(gold), self.initial),
            "prompts": len(self.prompts),
            "temperature": self.temperature,
            **clock_fields(started, ended or time.time(), self.process_start),
            "eval_gen_s": round(result.sync_s + result.gen_s, 3),  # its own time on the generator
            "samples": kept_samples(gold, proxy, self.samples),
        }

    def _keep_initial(self, scores: dict[int, float]) -> None:
        self.initial = scores
        self.write_initial()

    def write_initial(self) -> None:
        """eval_initial.json, again after the run directory was made again (RunDirKeeper)."""
        if self.initial_path is not None and self.initial:
            self.initial_path.write_text(json.dumps({str(k): v for k, v in self.initial.items()}))
