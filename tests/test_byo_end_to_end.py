"""README's "Your own data and model", end to end through the CLI as a user runs it: export the tiny
embedded model as a local HF checkpoint, train configs/byo_example.yaml on the shipped JSONL prompts with its
own reward function (examples/rewards.py, imported in the generator that scores; Ray + vLLM + DeepSpeed), and
read back every output: eval cadence, win-rate, skipped-row counts, TensorBoard events, the W&B offline run
and the plot."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_command, read_jsonl

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_your_own_data_and_model(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "tiny-sort"
    cli("export-model", str(model))
    run = tmp_path / "run"
    proc = cli("train", "configs/byo_example.yaml", f"model.path={model}", "learner.steps=6", "eval.every=3",
               "--run-dir", str(run))
    assert "236 usable (1 longer than 10 tokens, 1 empty, 1 malformed, 1 with unknown tokens)" in proc.stdout

    steps, evals = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    parts = ("reward_mean/examples.rewards:close_and_brief", "reward_mean/examples.rewards:exact_match")
    # Its two rewards, summed with weights 1 and 0.5, each with its own mean; every completion scored by both.
    assert all(s["reward_mean"] == pytest.approx(s[parts[0]] + 0.5 * s[parts[1]]) for s in steps)
    assert all(0 <= s["reward_log/too_long"] <= 1 for s in steps)  # what exact_match logged (TRL's log_metric)
    assert [e["version"] for e in evals] == [0, 3, 6]  # start, every eval.every steps, end
    assert all(e["prompts"] == 48 and 0 <= e["win_rate"] <= 1 and 0 <= e["gold_reward"] <= 1 for e in evals)
    ids = [i for s in steps for i in s["prompt_ids"]]
    assert sorted(ids) == list(range(6 * 16))  # the train stream by index: nothing lost or repeated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["max_staleness_seen"] <= 1 and summary["final_win_rate"] == evals[-1]["win_rate"]
    assert [(d["rows"], d["used"], d["too_long"]) for d in summary["data"]] == [(240, 236, 1), (48, 48, 0)]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward_mean")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars(f"train/{parts[1]}")] == [1, 2, 3, 4, 5, 6]
    logged = [round(e.value, 5) for e in events.Scalars("eval/gold_reward")]
    assert logged == [round(e["gold_reward"], 5) for e in evals]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))

    AutoModelForCausalLM.from_pretrained(run / "final")
    assert AutoTokenizer.from_pretrained(run / "final").eos_token == "</s>"
    cli("plot", str(run), "--out", str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 20_000
