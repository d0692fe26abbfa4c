"""Evaluations off the critical path (async_rlhf/pipeline/eval_schedule.py), on the real pipeline: while a
periodic evaluation is in flight the learner keeps taking steps, and every evaluation is still logged,
once, in version order, with the samples trained at the evaluated version."""
from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest

from async_rlhf.outputs.timeline import read_timeline
from tests.helpers import ROOT, read_jsonl, train_command

pytestmark = pytest.mark.slow

STEPS, EVERY, SAMPLES_PER_STEP = 24, 4, 16 * 4  # quickstart: 16 prompts x 4 samples per step


def test_learner_steps_go_on_while_periodic_evaluations_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(train_command(run, f"learner.steps={STEPS}", f"eval.every={EVERY}", "checkpoint.every=8",
                                        "api.enabled=false"), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["version"] for e in evals] == list(range(0, STEPS + 1, EVERY))
    assert [e["episodes"] for e in evals] == [e["version"] * SAMPLES_PER_STEP for e in evals]
    assert [e["wall_s"] for e in evals] == sorted(e["wall_s"] for e in evals)
    periodic = [e for e in evals if 0 < e["version"] < STEPS]
    # The loop only sends each periodic evaluation and handles its answers: it never waits for one.
    assert all(e["eval_blocking_s"] < e["eval_s"] for e in periodic), periodic

    events = read_timeline(run / "timeline.jsonl")
    spans = [e for e in events if e["kind"] == "eval" and 0 < e["version"] < STEPS]
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
