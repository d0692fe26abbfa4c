"""RunRecorder: metrics lines, summary and the plot, including steps with missing values."""
from __future__ import annotations

import json
import math
from pathlib import Path

from async_rlhf.config import RunConfig
from async_rlhf.recorder import RunRecorder


def test_records_and_plot_tolerate_gaps(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    rec.save_config(RunConfig())
    rec.log_step({"step": 1, "reward_mean": 0.5, "kl": 0.0})
    rec.log_step({"step": 2, "reward_mean": None, "kl": math.nan})  # a step where every pair tied
    rec.log_eval({"version": 0, "gold_reward": 0.4})
    rec.write_summary({"wall_s": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"wall_s": 1.0}
    assert "max_staleness: 1" in (tmp_path / "config.yaml").read_text()
    assert rec.plot().stat().st_size > 5_000
