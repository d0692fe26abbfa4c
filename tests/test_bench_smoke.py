"""Each micro-benchmark still runs, end to end, at toy size (numbers are not checked: docs/benchmarks.md).

The benchmarks start their own Ray instance and vLLM engines, so each runs as the documented
command in a subprocess, which also keeps this pytest process's Ray instance out of the way.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# generator_path and weight_sync are left out for now: in the full suite on a loaded machine the
# generator_path script hung past 600 s at exit (its in-process vLLM engine's shutdown); see
# docs/next_steps.md. They run by hand with the commands in docs/benchmarks.md.
SMOKE = {
    "learner_step": ["--prompts", "2", "--samples", "2", "--repeats", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs_at_toy_size(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *SMOKE[name], "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    if name == "weight_sync":
        size = result["sizes"][0]
        assert size["bytes"] > 0 and size["floor_s"] > 0 and size["best"]["load_s"] > 0
    else:
        assert set(result["tokens_per_s"]) == ({"raw_vllm", "generator_path"} if name == "generator_path"
                                               else {"bare_deepspeed", "learner"})
        assert all(v > 0 for v in result["tokens_per_s"].values()) and result["ratio"] > 0
