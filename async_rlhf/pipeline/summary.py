"""What a run reports: one record per learner step (metrics.jsonl) and the summary at the end (summary.json).

Both read the run through its read-only `RunView`; they are kept here so that the controller holds the loop only.
"""
from __future__ import annotations

from collections.abc import Iterable

from async_rlhf.pipeline.view import RunView
from async_rlhf.rollout import RolloutGroup, scored_reward

PART_PREFIX = "reward_mean/"  # a step record's key of one reward of a sum, before its name
LOGGED_PREFIX = "reward_log/"  # a step record's key of a value a reward function logged (TRL's log_metric)


def step_record(view: RunView, batch: list[RolloutGroup], version: int, metrics: dict) -> dict:
    """One line of metrics.jsonl: what step `version` trained on, the queue and generation so far, the learner's
    metrics."""
    scored = [scored_reward(done) for g in batch for done in g.scored]
    stale = [version - 1 - g.policy_version for g in batch]
    gen_s = view.seconds("gen_busy_s")
    return {
        "step": version,
        "episodes": view.queue_counters.consumed * view.samples_per_prompt,  # samples trained so far
        "elapsed_s": round(view.elapsed_s, 3),
        "reward_mean": sum(scored) / len(scored) if scored else None,
        **reward_part_means(batch),
        **reward_logged_means(batch),
        "staleness_mean": sum(stale) / len(stale),
        "staleness_max": max(stale),
        "queue_depth": view.queue_depth,
        "gen_tokens_per_s": view.seconds("tokens_generated") / gen_s if gen_s else 0.0,
        "dropped_stale": view.queue_counters.dropped_stale,
        "failed_reward": view.queue_counters.failed_reward,
        "prompt_ids": [g.prompt.prompt_id for g in batch],  # coverage: nothing trained twice or lost
        **view.mc_record(),
        **{k: v for k, v in metrics.items() if k != "version"},
    }


def reward_part_means(batch: list[RolloutGroup]) -> dict[str, float]:
    """`reward_mean/NAME` for each reward of a sum (reward.train as a list): its own value, before its weight,
    averaged over the completions it scored (TRL logs `rewards/NAME/mean`). Nothing for a single reward."""
    completions = [done for group in batch for done in group.scored]
    return named_means(((n, v) for c in completions for n, v in (c.reward_parts or {}).items()), PART_PREFIX)


def reward_logged_means(batch: list[RolloutGroup]) -> dict[str, float]:
    """`reward_log/NAME` for each value the train reward's functions logged with TRL's `log_metric` while scoring
    the step's groups, averaged over them (TRL averages it over a logging step)."""
    return named_means(((n, v) for g in batch for n, v in (g.reward_logged or {}).items()), LOGGED_PREFIX)


def named_means(values: Iterable[tuple[str, float]], prefix: str) -> dict[str, float]:
    """Each name's mean, under `prefix` + its name."""
    by_name: dict[str, list[float]] = {}
    for name, value in values:
        by_name.setdefault(name, []).append(value)
    return {f"{prefix}{name}": sum(v) / len(v) for name, v in by_name.items()}


def run_summary(view: RunView, initial: dict, final: dict) -> dict:
    """summary.json: the run's timing, counters, staleness and its first and last evaluation."""
    q, t = view.queue_counters, view.seconds
    return {
        "wall_s": round(t("loop_s"), 3),
        "setup_s": round(t("setup_s"), 3),
        **view.startup_summary(),  # setup_*: from the process's start to the first learner step (pipeline/startup.py)
        "gen_busy_s": round(t("gen_busy_s"), 3),
        "weight_sync_s": round(t("weight_sync_s"), 3),
        "reward_in_generator_s": round(t("reward_in_generator_s"), 3),
        "learn_busy_s": round(t("learn_busy_s"), 3),
        "learn_wide_s": round(t("learn_wide_s"), 3),  # of which on the generators' idle cores too (balance_cores)
        "publish_s": round(t("publish_s"), 3),
        "learner_queued_s": round(t("learner_queued_s"), 3),  # steps waiting on other learner calls (eval KL)
        "wait_s": round(t("learner_wait_s"), 3),
        "eval_s": round(t("eval_s"), 3),  # the evaluations' own durations, summed (they overlap training)
        "eval_gen_s": round(t("eval_gen_s"), 3),  # of which generator 0 spent loading weights and sampling
        "eval_blocking_s": round(t("eval_blocking_s"), 3),  # what the run waited for them
        "eval_blocking_loop_s": round(t("eval_blocking_loop_s"), 3),  # of which inside the loop (`wall_s`)
        "checkpoint_s": round(t("checkpoint_s"), 3),
        "checkpoint_failures": view.checkpoint_failures,  # not written (a full disk); the run went on
        "episodes": q.consumed * view.samples_per_prompt,
        "steps": view.steps_taken,
        "stopped_early": view.steps_taken < view.total_steps,
        "max_staleness": view.max_staleness,  # the bound in force at the end (may be changed over HTTP)
        "max_staleness_configured": view.configured_max_staleness,
        "max_staleness_seen": q.max_staleness_seen,
        "dropped_stale": q.dropped_stale,
        "failed_reward": q.failed_reward,
        "nonfinite_steps": view.nonfinite_total,
        "generator_restarts": sum(g.restarts for g in view.generators),
        "reward_restarts": view.reward_restarts,
        "learner_restarts": view.learner_restarts,
        "staleness_histogram": {str(k): v for k, v in sorted(q.staleness.items())},
        "tokens_generated": int(t("tokens_generated")),
        "cores_pinned": view.cores_pinned,
        "initial_gold_reward": initial.get("gold_reward"),  # {}: its line in eval.jsonl was damaged
        "final_gold_reward": final["gold_reward"],
        "initial_proxy_reward": initial.get("proxy_reward"),
        "final_proxy_reward": final["proxy_reward"],
        "final_kl": final["kl"],
        **view.gap_summary(),
        **view.mc_record(),
        "final_win_rate": final.get("win_rate"),
        **{f"final_{k}": final.get(k)
           for k in ("win_rate_vs_initial", "win_rate_vs_initial_se", "win_rate_vs_initial_n")},
        "data": view.data_stats(),  # rows read and skipped (task.name=dataset)
    }
