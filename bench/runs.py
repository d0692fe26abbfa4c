"""Pieces the run-level benchmarks share: one training run as a subprocess, mean ± sd, error-bar plots.

Each training run is the documented CLI command (`python -m async_rlhf.cli train CONFIG key=value ...`)
in its own process, one after another: runs side by side would share the two cores and measure
each other. A sweep rewrites its JSON after every run, so a sweep that is stopped part-way still
leaves every finished run on record.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT

RUN_TIMEOUT_S = 1800  # one tiny run takes about a minute; this only stops a hung run from blocking a sweep


def train(config: Path, overrides: list[str], run_dir: Path) -> dict:
    """Run one training job and return its summary.json (plus the load average when it ended)."""
    cmd = [sys.executable, "-m", "async_rlhf.cli", "train", str(config), *overrides, "--run-dir", str(run_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({' '.join(overrides)}): {proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "process_s": round(time.perf_counter() - start, 2), "load_avg_1m": os.getloadavg()[0]}


def earlier_runs(path: Path, **settings: object) -> list[dict]:
    """The runs already in a sweep's result file, if it was written with the same `settings` (e.g.
    steps=60): a rerun with the same --out continues the sweep instead of starting over."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old["runs"] if all(old.get(k) == v for k, v in settings.items()) else []


def mean_sd(values: list[float | None]) -> tuple[float, float]:
    """Mean and standard deviation of the values a run reported (None: it did not)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def save_json(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "load_avg_1m_now": os.getloadavg()[0], "cpus": os.cpu_count()}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))  # a reader never sees half a file


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
