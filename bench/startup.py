"""Start-up: seconds from `async-rlhf train` to the first learner step, timed from outside the process.

    .venv/bin/python bench/startup.py [--runs 3] [--checkout DIR ...] [--out FILE]

Each run is `async-rlhf train configs/quickstart.yaml learner.steps=20 eval.every=0 api.enabled=false`
(console script of this venv, caches warm). The clock starts just before the process is spawned and stops
when metrics.jsonl holds its first line (the first learner step), polled every 10 ms; the CPU seconds of
the run's processes (driver, Ray, actors) up to then are read from /proc at that moment. Several checkouts
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

from async_rlhf.cli.arguments import positive_int

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["learner.steps=20", "eval.every=0", "api.enabled=false"]


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and every process under it (Ray's GCS, raylet and workers are children of the
    driver): the work start-up cost, which noise from other programs on the machine does not change."""
    parent, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parent[pid], cpu[pid] = int(fields[1]), sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    tree, grew = {root}, True
    while grew:
        before = len(tree)
        tree |= {pid for pid, ppid in parent.items() if ppid in tree}
        grew = len(tree) > before
    return sum(cpu.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def first_step_s(checkout: Path, run_dir: Path) -> tuple[float, float]:
    """Spawn one run from `checkout`; seconds until its first metrics line (the run then finishes), and the
    CPU seconds its processes had used by then."""
    cli = Path(sys.executable).with_name("async-rlhf")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [str(cli), "train", str(checkout / "configs/quickstart.yaml"), *ARGS, "--run-dir", str(run_dir)]
    metrics = run_dir / "metrics.jsonl"
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        time.sleep(0.01)
    seen, cpu = time.time() - start, tree_cpu_s(proc.pid)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seen, cpu


def run_one(checkout: Path, scratch: Path, i: int) -> dict:
    run_dir = scratch / f"{checkout.name}-{i}"
    seen, cpu = first_step_s(checkout, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {k: v for k, v in summary.items() if k.startswith("setup")}
    return {"checkout": str(checkout), "run": i, "to_first_step_s": round(seen, 2), "cpu_s": round(cpu, 1),
            "load_1min": os.getloadavg()[0], **phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=3)
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
        mine = [r for r in rows if r["checkout"] == str(checkout.resolve())]
        times, cpu = [r["to_first_step_s"] for r in mine], [r["cpu_s"] for r in mine]
        print(f"{checkout}: to first step {statistics.median(times):.2f} s median of {times}; "
              f"CPU {statistics.median(cpu):.1f} s median of {cpu}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
