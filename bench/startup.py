"""Start-up: seconds from `async-rlhf train` to the first learner step, timed from outside the process.

    .venv/bin/python bench/startup.py [--runs 3] [--checkout DIR ...] [--out FILE]

Each run is `async-rlhf train configs/quickstart.yaml learner.steps=20 eval.every=0 api.enabled=false`
(console script of this venv, caches warm). The clock starts just before the process is spawned and stops
when metrics.jsonl holds its first line (the first learner step), polled every 10 ms. Several checkouts
(`--checkout`, put first on PYTHONPATH) alternate run by run, so a before/after pair sees the same
machine load. Each row also carries the run's own `setup_*` phases from summary.json when it has them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["learner.steps=20", "eval.every=0", "api.enabled=false"]


def first_step_s(checkout: Path, run_dir: Path) -> float:
    """Spawn one run from `checkout`; seconds until its first metrics line (the run then finishes)."""
    cli = Path(sys.executable).with_name("async-rlhf")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [str(cli), "train", str(checkout / "configs/quickstart.yaml"), *ARGS, "--run-dir", str(run_dir)]
    metrics = run_dir / "metrics.jsonl"
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        time.sleep(0.01)
    seen = time.time() - start
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seen


def run_one(checkout: Path, scratch: Path, i: int) -> dict:
    run_dir = scratch / f"{checkout.name}-{i}"
    seen = first_step_s(checkout, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {k: v for k, v in summary.items() if k.startswith("setup")}
    return {"checkout": str(checkout), "run": i, "to_first_step_s": round(seen, 2), **phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkout", type=Path, nargs="+", default=[ROOT])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every row (default: print only)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        for i in range(args.runs):
            for checkout in args.checkout:  # alternate: each pair shares the moment's load
                rows.append(run_one(checkout.resolve(), Path(scratch), i))
                print(json.dumps(rows[-1]), flush=True)
    for checkout in args.checkout:
        times = [r["to_first_step_s"] for r in rows if r["checkout"] == str(checkout.resolve())]
        print(f"{checkout}: to first step {statistics.median(times):.2f} s median of {times}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
