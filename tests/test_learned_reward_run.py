"""A few RL steps with the learned reward model in the reward actor (Ray + vLLM + DeepSpeed, tiny
models): the train reward of every sample is the RM's score of it, the gold reward stays the rule,
and the eval records carry the gold win-rate against the starting policy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import read_jsonl

pytestmark = pytest.mark.slow


def test_online_dpo_steps_with_learned_rm(tmp_path: Path, random_policies: tuple[Path, Path], tiny_rm: Path) -> None:
    from async_rlhf.cli.main import main

    run = tmp_path / "run"
    code = main(["train", "configs/byo_example.yaml", f"model.path={random_policies[0]}",
                 f"reward.learned.path={tiny_rm}",
                 "reward.learned.max_length=32", "learner.steps=3", "eval.every=0", "task.eval_prompts=16",
                 "generation.prompts_per_step=8", "logging.tensorboard=false", "logging.wandb=false",
                 "--run-dir", str(run)])
    assert code == 0
    steps = read_jsonl(run / "metrics.jsonl")
    evals = read_jsonl(run / "eval.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["reward_mean"] is not None for s in steps)
    assert evals[0]["proxy_reward"] is not None and evals[0]["win_rate_vs_initial"] == 0.5  # version 0 vs itself
    assert evals[-1]["version"] == 3 and evals[-1]["win_rate_vs_initial_n"] == 16
    assert 0 <= evals[-1]["win_rate_vs_initial"] <= 1 and evals[-1]["win_rate_vs_initial_se"] >= 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed_reward"] == 0 and summary["final_win_rate_vs_initial_n"] == 16
