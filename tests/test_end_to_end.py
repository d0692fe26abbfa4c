"""End to end through the CLI, as a user runs it: the real Ray + vLLM + DeepSpeed pipeline.
(The synchronous baseline's end-to-end checks ride on the deterministic run of tests/test_resume.py.) The quickstart
run is also online DPO's end-to-end run (tests/test_loss_runs.py names where the other learner paths run) and the
check that its evaluations run off the critical path (async_rlhf/pipeline/eval_schedule.py).

The embedded policy is built once (cached under the default cache dir, as `make quickstart` does),
so these runs share its supervised warm start.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from async_rlhf.config.run import load_config
from async_rlhf.outputs.timeline import read_timeline
from async_rlhf.pipeline.startup import LAPS
from tests.helpers import QUICKSTART, ROOT, read_jsonl, train_command

pytestmark = pytest.mark.slow


def train(run_dir: Path, *overrides: str) -> dict:
    # As a user's shell has it: without the RAY_AUTH_MODE=token that a Ray started in this process set (Ray's
    # warning that it turned token authentication on is only said where the variable is unset).
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(train_command(run_dir, *overrides), capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The terminal gets the run's own lines and its progress bar only: none of Ray's (its start-up INFO line,
    # its token-authentication warning), vLLM's or DeepSpeed's.
    lines = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith(("[async-rlhf]", "train:"))] == []
    return json.loads((run_dir / "summary.json").read_text())


def test_async_quickstart_improves_gold_within_the_staleness_bound(tmp_path: Path) -> None:
    run, shm_root = tmp_path / "async", tmp_path / "shm"
    shm_root.mkdir()
    summary = train(run, "queue.max_staleness=1", f"weight_sync.shm_root={shm_root}")
    # Nothing of the run is left in shared memory: weights ring, busy board, the generator's engine files.
    assert not list(shm_root.iterdir())
    steps = read_jsonl(run / "metrics.jsonl")
    assert summary["steps"] == len(steps) > 0
    # The learned policy beats its supervised start on the held-out gold reward.
    assert summary["final_gold_reward"] >= summary["initial_gold_reward"] + 0.1, summary
    # No sample was trained beyond the bound, and one-step off-policy data was really used.
    assert summary["max_staleness_seen"] == 1 and all(s["staleness_max"] <= 1 for s in steps)
    assert set(summary["staleness_histogram"]) <= {"0", "1"} and summary["dropped_stale"] == 0
    assert summary["cores_pinned"] is True
    for key in ("wall_s", "gen_busy_s", "learn_busy_s", "wait_s", "episodes"):
        assert summary[key] > 0, key
    assert (run / "reward.png").stat().st_size > 10_000
    assert (run / "config.yaml").read_text().count("max_staleness: 1") == 1
    # Start-up, phase by phase (async_rlhf/pipeline/startup.py): the laps add up to the time to the first step, the
    # interpreter and the first step itself take time, and each actor started within the actors lap.
    laps = [summary[f"setup_{name}_s"] for name in LAPS]
    assert min(laps) >= 0 and summary["setup_to_first_step_s"] == pytest.approx(sum(laps), abs=0.01)
    assert summary["setup_process_s"] > 0 and summary["setup_first_step_s"] > 0 and summary["setup_actors_s"] > 0
    actors = [summary[f"setup_{role}_s"] for role in ("learner", "generators", "reward")]
    assert 0 < max(actors) <= summary["setup_actors_s"] + 0.01
    # The initial evaluation runs beside the first batches, of version 0: sampled before them on generator 0;
    # its KL, from the generator's log-probs against the reference (policy == reference), is 0 up to the
    # engines' float differences.
    initial, *_, final = read_jsonl(run / "eval.jsonl")
    assert initial["version"] == 0 and initial["kl"] == pytest.approx(0.0, abs=1e-4)
    assert initial["gold_reward"] == summary["initial_gold_reward"]
    # What the policy writes, beside the means: the same first eval prompts at every evaluation, each completion
    # with its gold reward (sort_exact: 1 exactly where the completion is the prompt's digits sorted).
    for record in (initial, final):
        kept = record["samples"]
        assert [s["prompt_id"] for s in kept] == [0, 1, 2]
        assert all(s["gold"] == float(s["completion"] == "".join(sorted(s["prompt"].strip(">")))) for s in kept), kept
    cfg = load_config(QUICKSTART)
    # Online DPO moves its own objective: the train reward of the last steps beats that of the first ones
    # (tests/test_loss_runs.py's check for the other losses; +0.1 to +0.2 here).
    rewards = [s["reward_mean"] for s in steps]
    assert sum(rewards[-8:]) / 8 > sum(rewards[:8]) / 8 + 0.03, rewards
    evaluations_ran_beside_training(run, cfg.learner.steps, cfg.eval.every,
                                    cfg.generation.prompts_per_step * cfg.generation.samples_per_prompt)


def evaluations_ran_beside_training(run: Path, steps: int, every: int, samples_per_step: int) -> None:
    """While a periodic evaluation was in flight the learner kept taking steps, and every evaluation is still
    logged, once, in version order, with the samples trained at the evaluated version."""
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["version"] for e in evals] == list(range(0, steps + 1, every))
    assert [e["episodes"] for e in evals] == [e["version"] * samples_per_step for e in evals]
    assert [e["wall_s"] for e in evals] == sorted(e["wall_s"] for e in evals)
    periodic = [e for e in evals if 0 < e["version"] < steps]
    # The loop only sends each periodic evaluation and handles its answers: it never waits for one.
    assert all(e["eval_blocking_s"] < e["eval_s"] for e in periodic), periodic
    events = read_timeline(run / "timeline.jsonl")
    spans = [e for e in events if e["kind"] == "eval" and 0 < e["version"] < steps]
    learns = [e for e in events if e["kind"] == "learn"]
    assert list(dict.fromkeys(s["version"] for s in spans)) == [e["version"] for e in periodic]  # a bar per chunk
    during = [learn for learn in learns if any(s["start"] < learn["start"] < s["end"] for s in spans)]
    assert during, "no learner step was dispatched while a periodic evaluation was in flight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_blocking_s"] < summary["eval_s"] and summary["eval_gen_s"] > 0
    # A checkpoint waits only for evaluations it could not redo: one of its own version may stay due.
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints
    for ckpt in checkpoints:
        with (ckpt / "controller_state.pkl").open("rb") as fh:
            assert pickle.load(fh).evals_due in ([], [int(ckpt.name.removeprefix("step-"))])
