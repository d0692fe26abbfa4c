"""Snapshots of a running Controller for the HTTP API, the status command and checkpoints.

Read from the API thread while the loop runs: every value is read once into plain builtins, so
a snapshot may be a few milliseconds inconsistent across fields but never raises.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_rlhf.pipeline.controller import Controller

HEARTBEAT_STALE_S = 30.0  # the loop wakes at least every 0.2 s; 30 s of silence means it is stuck


def _elapsed(c: "Controller") -> float:
    return c.timing.elapsed("loop_s")


def generator_status(c: "Controller") -> list[dict]:
    elapsed = _elapsed(c)
    return [
        {
            "generator_id": slot.generator_id,
            "version": slot.version,
            "busy": slot.job is not None,
            "busy_fraction": round(slot.busy_s / elapsed, 4) if elapsed > 0 else 0.0,
            "tokens_per_s": round(slot.tokens / slot.busy_s, 1) if slot.busy_s > 0 else 0.0,
            "tokens": slot.tokens,
            "restarts": slot.restarts,
        }
        for slot in list(c.generators)
    ]


def learner_status(c: "Controller") -> dict:
    steps = c.state.steps_taken - (c.state.learner_job is not None)
    busy = c.timing.get("learn_busy_s")
    elapsed = _elapsed(c)
    return {
        "version": c.broker.latest_version if hasattr(c, "broker") else 0,
        "busy": c.state.learner_job is not None,
        "last_step_s": c.last_step.get("step_s"),
        "mean_step_s": round(busy / steps, 4) if steps > 0 else None,
        "busy_fraction": round(busy / elapsed, 4) if elapsed > 0 else 0.0,
        "restarts": c.learner_restarts,
    }


def reward_status(c: "Controller") -> dict:
    counts = dict(c.reward_counts)
    total = sum(counts.values())
    failed = counts["failed"] + counts["timed_out"]
    return {**counts, "restarts": c.reward_restarts, "healthy": total == 0 or failed / total < 0.5}


def status_snapshot(c: "Controller") -> dict:
    done = c.broker.latest_version if hasattr(c, "broker") else 0
    elapsed = _elapsed(c)
    remaining = max(c.cfg.learner.steps - done, 0)
    last = c.last_step
    return {
        "run_id": c.run_dir.name,
        "run_dir": str(c.run_dir),
        "phase": c.phase,
        "step": done,
        "total_steps": c.cfg.learner.steps,
        "elapsed_s": round(elapsed, 3),
        "eta_s": round(elapsed / done * remaining, 1) if done else None,
        "max_staleness": c.queue.max_staleness,
        "queue_depth": len(c.queue),
        "generators": generator_status(c),
        "learner": learner_status(c),
        "reward_service": reward_status(c),
        "last": {k: last.get(k) for k in ("reward_mean", "kl", "loss", "staleness_mean", "gen_tokens_per_s")},
    }


def health_snapshot(c: "Controller") -> dict:
    age = time.monotonic() - c.heartbeat
    loop_ok = c.phase not in ("failed",) and (c.phase != "running" or age < HEARTBEAT_STALE_S)
    components = {
        "controller": {"ok": loop_ok, "phase": c.phase, "heartbeat_age_s": round(age, 3)},
        "learner": {"ok": c.phase != "failed", "version": learner_status(c)["version"]},
        "reward_service": {"ok": reward_status(c)["healthy"]},
    }
    for g in generator_status(c):
        components[f"generator-{g['generator_id']}"] = {"ok": c.phase != "failed", "version": g["version"]}
    return {"ok": all(v["ok"] for v in components.values()), "components": components}
