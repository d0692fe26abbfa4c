"""Each benchmark still runs, end to end, at toy size (numbers are not checked: docs/benchmarks.md).

The benchmarks start their own Ray instance, vLLM engines and training runs, so each runs as the
documented command in a subprocess of its own session: on a timeout the whole process group (Ray
workers and engine processes included) is killed, so a hang fails this test instead of the suite.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # about 1 minute each on a quiet 2-core machine; several times that under load

TOY = ["--prompts", "2", "--samples", "2", "--repeats", "1"]
SMOKE = {
    "learner_step": TOY,
    "generator_path": TOY,
    "weight_sync": ["--sizes", "tiny", "--repeats", "1"],
    "async_vs_sync": ["--staleness", "0", "1", "--seeds", "0", "--steps", "2"],
    "off_policy": ["--losses", "rloo", "--staleness", "2", "--seeds", "0", "--steps", "2"],
    "vineppo_vs_ppo": ["--steps", "2", "--every", "2"],
}
RUN_LEVEL = {"async_vs_sync", "off_policy", "vineppo_vs_ppo"}


def run_benchmark(name: str, out: Path) -> None:
    args = [*SMOKE[name], "--out", str(out)]
    if name in RUN_LEVEL:
        args += ["--runs-dir", str(out.parent / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "async_rlhf.cli", "bench", name, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"bench {name} ran past {TIMEOUT_S} s; last output:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]


def check_micro(name: str, result: dict) -> None:
    if name == "weight_sync":
        size = result["sizes"][0]
        assert size["bytes"] > 0 and size["floor_s"] > 0 and size["best"]["load_s"] > 0
        return
    sides = {"generator_path": {"raw_vllm", "generator_path"}, "learner_step": {"bare_deepspeed", "learner"}}
    assert set(result["tokens_per_s"]) == sides[name]
    assert all(v > 0 for v in result["tokens_per_s"].values()) and result["ratio"] > 0


def check_runs(name: str, result: dict) -> None:
    runs = result["runs"]
    if name == "async_vs_sync":
        assert [r["max_staleness"] for r in runs] == [0, 1]
        assert all(r["G_s"] > 0 and r["T_s"] > 0 and r["wall_s"] > 0 for r in runs)
        assert runs[1]["cores_pinned"] and not runs[0]["cores_pinned"]
        assert runs[1]["ideal_speedup"] >= 1.0 and runs[1]["overlap_efficiency"] > 0
    elif name == "off_policy":
        (run,) = runs
        assert (run["loss"], run["max_staleness"]) == ("rloo", 2)
        assert 0 <= run["final_gold_reward"] <= 1 and run["mean_staleness"] <= 2
    else:
        assert {r["arm"] for r in runs} == {"vineppo", "ppo"}
        for r in runs:
            assert [p["version"] for p in r["curve"]] == [0, 2]
            assert r["curve"][0]["train_s"] == 0.0 < r["curve"][1]["train_s"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs_at_toy_size(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    run_benchmark(name, out)
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    if name == "async_vs_sync":
        assert out.with_name(out.name + "_gantt.png").stat().st_size > 1000
    (check_runs if name in RUN_LEVEL else check_micro)(name, result)
    assert result["cpus"] >= 1  # every result records the machine it ran on
