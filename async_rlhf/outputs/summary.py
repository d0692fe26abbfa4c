"""What a run reports: one record per learner step (metrics.jsonl) and the summary at the end (summary.json).

Both read the Controller's live state; they are kept here so that the controller holds the loop only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_rlhf.pipeline.controller import Controller, LearnerJob


@dataclass
class GapTally:
    """Each step's logprob_gap / logprob_gap_fresh (learner vs behaviour log-probs), for summary.json.
    NaN steps (nothing trained, or no staleness-0 sample) are left out; counted since this process started."""

    gaps: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)

    def add(self, metrics: dict) -> None:
        for values, key in ((self.gaps, "logprob_gap"), (self.fresh, "logprob_gap_fresh")):
            if not math.isnan(metrics.get(key, math.nan)):
                values.append(metrics[key])

    def summary(self) -> dict:
        return {"logprob_gap_mean": sum(self.gaps) / len(self.gaps) if self.gaps else None,
                "logprob_gap_fresh_max": max(self.fresh, default=None)}


def step_record(ctl: "Controller", job: "LearnerJob", metrics: dict) -> dict:
    """One line of metrics.jsonl: what step `job` trained on, the queue and generation so far, the learner's metrics."""
    scored = [done.reward for g in job.batch for done in g.scored]
    stale = [job.version - 1 - g.policy_version for g in job.batch]
    gen_s = ctl.timing.get("gen_busy_s")
    return {
        "step": job.version,
        "episodes": ctl.queue.counters.consumed * ctl.cfg.generation.samples_per_prompt,  # samples trained so far
        "elapsed_s": round(ctl.timing.elapsed("loop_s"), 3),
        "reward_mean": sum(scored) / len(scored) if scored else None,
        "staleness_mean": sum(stale) / len(stale),
        "staleness_max": max(stale),
        "queue_depth": len(ctl.queue),
        "gen_tokens_per_s": ctl.timing.get("tokens_generated") / gen_s if gen_s else 0.0,
        "dropped_stale": ctl.queue.counters.dropped_stale,
        "failed_reward": ctl.queue.counters.failed_reward,
        "prompt_ids": [g.prompt.prompt_id for g in job.batch],  # coverage: nothing trained twice or lost
        "learner_cores": len(ctl.balancer.cores) if ctl.balancer else None,  # resources.balance_cores
        **ctl.mc_record(),
        **{k: v for k, v in metrics.items() if k != "version"},
    }


def run_summary(ctl: "Controller", initial: dict, final: dict) -> dict:
    """summary.json: the run's timing, counters, staleness and its first and last evaluation."""
    t, q = ctl.timing, ctl.queue.counters
    loop_s = t.get("loop_s")
    return {
        "wall_s": round(loop_s, 3),
        "setup_s": round(t.get("setup_s"), 3),
        **ctl.startup.summary(),  # setup_*: from the process's start to the first learner step (async_rlhf/pipeline/startup.py)
        "gen_busy_s": round(t.get("gen_busy_s"), 3),
        "weight_sync_s": round(t.get("weight_sync_s"), 3),
        "reward_in_generator_s": round(t.get("reward_in_generator_s"), 3),
        "learn_busy_s": round(t.get("learn_busy_s"), 3),
        "publish_s": round(t.get("publish_s"), 3),
        "wait_s": round(t.get("learner_wait_s"), 3),
        "eval_s": round(t.get("eval_s"), 3),
        "checkpoint_s": round(t.get("checkpoint_s"), 3),
        "episodes": q.consumed * ctl.cfg.generation.samples_per_prompt,
        "steps": ctl.state.steps_taken,
        "stopped_early": ctl.state.steps_taken < ctl.cfg.learner.steps,
        "max_staleness": ctl.queue.max_staleness,  # the bound in force at the end (may be changed over HTTP)
        "max_staleness_configured": ctl.cfg.queue.max_staleness,
        "max_staleness_seen": q.max_staleness_seen,
        "dropped_stale": q.dropped_stale,
        "failed_reward": q.failed_reward,
        "nonfinite_steps": ctl.state.nonfinite_total,
        "generator_restarts": sum(g.restarts for g in ctl.generators),
        "reward_restarts": ctl.reward_restarts,
        "learner_restarts": ctl.learner_restarts,
        "learner_core_moves": ctl.balancer.moves if ctl.balancer else 0,
        "staleness_histogram": {str(k): v for k, v in sorted(q.staleness.items())},
        "tokens_generated": int(t.get("tokens_generated")),
        "cores_pinned": ctl.plan.pinned,
        "initial_gold_reward": initial["gold_reward"],
        "final_gold_reward": final["gold_reward"],
        "initial_proxy_reward": initial["proxy_reward"],
        "final_proxy_reward": final["proxy_reward"],
        "final_kl": final["kl"],
        **ctl.gap_tally.summary(),
        **ctl.mc_record(),
        "final_win_rate": final.get("win_rate"),
        **{f"final_{k}": final.get(k) for k in ("win_rate_vs_initial", "win_rate_vs_initial_se", "win_rate_vs_initial_n")},
        "data": [asdict(s) for s in getattr(ctl.task, "stats", [])],  # rows read and skipped (task.name=dataset)
    }
