"""End to end through the CLI, as a user runs it: the real Ray + vLLM + DeepSpeed pipeline.
(The synchronous baseline's end-to-end checks ride on the deterministic run of tests/test_resume.py.)

The embedded policy is built once (cached under the default cache dir, as `make quickstart` does),
so these runs share its supervised warm start.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from async_rlhf.pipeline.startup import LAPS
from tests.helpers import ROOT, read_jsonl, train_command

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
    initial = read_jsonl(run / "eval.jsonl")[0]
    assert initial["version"] == 0 and initial["kl"] == pytest.approx(0.0, abs=1e-4)
    assert initial["gold_reward"] == summary["initial_gold_reward"]
