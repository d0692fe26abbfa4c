"""Each benchmark still runs, end to end, at toy size (numbers are not checked: docs/benchmarks.md).

The benchmarks start their own Ray instance, vLLM engines and training runs, so each runs as the
documented command in a subprocess, which also keeps this pytest process's Ray instance out of the
way. Every vLLM engine lives in a Ray actor that the script kills, so the scripts exit promptly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from async_rlhf.config.run import load_config
from tests.helpers import QUICK_ARITH, ROOT, read_jsonl

PER_TEST_TIMEOUT_S = 600  # a loaded 2-core machine starts a vLLM engine in minutes, an idle one in ~20 s

SMOKE = {
    "learner_step": ["--prompts", "2", "--samples", "2", "--repeats", "1"],
    "learner_precision": ["--config", "configs/quickstart.yaml", "--prompts", "2", "--prompt-tokens", "8",
                          "--repeats", "1"],
    "learner_settings": ["--config", "configs/quickstart.yaml", "--prompts", "2", "--prompt-tokens", "8",
                         "--repeats", "1"],
    "generator_path": ["--prompts", "2", "--samples", "2", "--repeats", "1"],
    "weight_sync": ["--sizes", "tiny", "--repeats", "1"],
    "async_vs_sync": ["--staleness", "0", "1", "--seeds", "0", "--steps", "2"],
    "off_policy": ["--losses", "rloo", "--staleness", "2", "--seeds", "0", "--steps", "4", "--mode", "fixed"],
    "vineppo_vs_ppo": ["--arms", "vineppo", "--steps", "2", "--every", "1", "--set", QUICK_ARITH],
    "vs_trl": ["--steps", "2", "--prompts", "2", "--every", "1"],
    "dataset_read": ["--rows", "2000", "--runs", "1"],
}


def run_bench(name: str, out: Path) -> dict:
    cli = Path(sys.executable).parent / "async-rlhf"  # the documented console script, not `python -m`
    cmd = [str(cli), "bench", name, *SMOKE[name], "--out", str(out)]
    if name in ("async_vs_sync", "off_policy", "vineppo_vs_ppo", "vs_trl"):
        cmd += ["--runs-dir", str(out.parent / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PER_TEST_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 1000
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
@pytest.mark.parametrize("name", ["learner_step", "generator_path"])
def test_ratio_benchmark_runs_at_toy_size(name: str, tmp_path: Path) -> None:
    result = run_bench(name, tmp_path / name)
    sides = {"generator_path": {"raw_vllm", "generator_path"}, "learner_step": {"bare_deepspeed", "learner"}}
    assert set(result["tokens_per_s"]) == sides[name]
    assert all(v > 0 for v in result["tokens_per_s"].values()) and result["ratio"] > 0


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_learner_precision_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    result = run_bench("learner_precision", tmp_path / "learner_precision")
    assert set(result["median_s"]) == {"none", "bfloat16"} and all(v > 0 for v in result["median_s"].values())
    drift = result["logprob_drift"]  # bf16 compute moves the log-probs, but not far
    assert 0 < drift["mean_abs"] <= drift["max_abs"] < 1.0 and drift["tokens"] == 2 * 2 * 12


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_learner_settings_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    result = run_bench("learner_settings", tmp_path / "learner_settings")  # default arms: AdamW for-each vs fused
    assert set(result["median_s"]) == {"foreach", "fused"} and all(v > 0 for v in result["median_s"].values())
    # counted per step; at toy size a step may reuse every page it touches, so 0 is a real median
    faults = result["median_faults"]
    assert set(faults) == {"foreach", "fused"} and all(f >= 0 for f in faults.values())
    drift = result["weight_drift_from_first"]  # two steps each: the kernels round differently, nothing more
    assert drift["foreach"] == 0 and 0 < drift["fused"] < 1e-3


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_dataset_read_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    result = run_bench("dataset_read", tmp_path / "dataset_read")
    (run,) = result["runs"]
    assert run["seconds"] > 0 and run["peak_mb"] > 0
    assert 1500 < run["train"] < 2000  # every row fits 256 characters; eval_fraction 0.05 is held out


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_weight_sync_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    size = run_bench("weight_sync", tmp_path / "weight_sync")["sizes"][0]
    assert size["bytes"] > 0 and size["floor_s"] > 0 and size["best"]["load_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_async_vs_sync_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "async_vs_sync"
    result = run_bench("async_vs_sync", out)
    sync, one = result["runs"]
    assert (sync["max_staleness"], one["max_staleness"]) == (0, 1)
    assert sync["overlap_efficiency"] == pytest.approx(sync["measured_speedup"] / sync["ideal_speedup"], abs=2e-3)
    assert sync["measured_speedup"] == 1.0  # the baseline against itself
    assert one["G_s"] > 0 and one["T_s"] > 0 and one["cores_pinned"] and not sync["cores_pinned"]
    assert out.with_name("async_vs_sync_gantt.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_off_policy_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    (run,) = run_bench("off_policy", tmp_path / "off_policy")["runs"]
    assert (run["mode"], run["loss"], run["max_staleness"]) == ("fixed", "rloo", 2)
    # Fixed delay: steps 1, 2, 3, 4 train on versions 0, 0, 0, 1, i.e. 16 groups each at staleness 0, 1, 2, 2.
    assert run["staleness_histogram"] == {"0": 16, "1": 16, "2": 32} and run["max_staleness_seen"] == 2
    assert run["mean_staleness"] == 1.25 and run["dropped_stale"] == 0
    assert 0 <= run["final_gold_reward"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_vineppo_vs_ppo_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    """Also VinePPO's end-to-end run (test_loss_runs.py RUNS_IN): its MC accounting on the real pipeline."""
    (run,) = run_bench("vineppo_vs_ppo", tmp_path / "vineppo_vs_ppo")["runs"]
    assert [p["version"] for p in run["curve"]] == [0, 1, 2]
    assert run["curve"][0]["train_s"] == 0.0 and run["curve"][-1]["train_s"] > 0
    run_dir = tmp_path / "runs" / "vineppo-seed0"
    summary, steps = json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "metrics.jsonl")
    assert summary["steps"] == len(steps) == 2 and summary["max_staleness_seen"] <= 1
    assert all(s["nonfinite"] == 0 and s["optimizer_step"] == 1 for s in steps)
    # K_mc rollouts per unique state, costed apart, none left unvalued.
    k_mc = load_config(ROOT / "configs" / "arith_vineppo.yaml").mc_values.k_mc
    assert summary["mc_rollouts"] == k_mc * summary["mc_states"] > 0 and 0 < summary["mc_gen_share"] < 1
    assert summary["mc_unvalued"] == summary["mc_failed_reward"] == 0
    assert all(s["samples"] == 16 * 4 and s["skipped_unvalued"] == 0 for s in steps)


@pytest.mark.slow
@pytest.mark.timeout(PER_TEST_TIMEOUT_S + 30)
def test_vs_trl_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    result = run_bench("vs_trl", tmp_path / "vs_trl")
    (run,) = result["runs"]
    for arm in ("trl", "ours"):  # both curves at the same evaluation points, 2 prompts x 2 samples per step
        curve = run[arm]["curve"]
        assert [(p["version"], p["episodes"]) for p in curve] == [(0, 0), (1, 4), (2, 8)], arm
        assert all(a["train_clock_s"] < b["train_clock_s"] for a, b in zip(curve, curve[1:])), arm
        assert run[arm]["process_s"] > run[arm]["net_loop_s"] > 0 and run[arm]["s_per_step"] > 0
        assert result["summary"][arm]["final_gold"] == pytest.approx(run[arm]["final_gold"], abs=1e-4)  # median of one
    ours = run["ours"]
    # One evaluator, the same sampling as the run's own evaluation: the same weights score (nearly) the same.
    assert abs(ours["final_gold"] - ours["final_gold_in_run"]) <= 0.05
    assert abs(result["start_gold"] - ours["start_gold_in_run"]) <= 0.05
    evals = read_jsonl(tmp_path / "runs" / "ours-0" / "eval.jsonl")
    assert all(e["eval_s"] > 0 and e["wall_s"] > 0 for e in evals)
