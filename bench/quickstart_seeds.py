"""Quickstart over seeds and staleness bounds: the numbers behind the README's results table.

    .venv/bin/python bench/quickstart_seeds.py [--seeds 0 1 2] [--bounds 0 1] [--out docs/results/quickstart_seeds.json]

Runs `async-rlhf train configs/quickstart.yaml seed=S queue.max_staleness=N` for each pair, one
after another (the runs would otherwise share the two cores), and writes every summary plus a
mean/std table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from async_rlhf.cli.arguments import non_negative_int

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("initial_gold_reward", "final_gold_reward", "final_kl", "wall_s", "gen_busy_s", "learn_busy_s",
          "wait_s", "weight_sync_s", "setup_s", "max_staleness_seen", "dropped_stale")


def run_one(seed: int, bound: int, runs_dir: Path) -> dict:
    run_dir = runs_dir / f"seed{seed}-N{bound}"
    cmd = [sys.executable, "-m", "async_rlhf.cli", "train", str(ROOT / "configs/quickstart.yaml"),
           f"seed={seed}", f"queue.max_staleness={bound}", "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "max_staleness": bound, **{k: summary[k] for k in FIELDS}}


def table(rows: list[dict]) -> str:
    lines = ["| N | seeds | gold start | gold end | gain | KL end | loop wall s | gen busy s | learn busy s "
             "| learner wait s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bound in sorted({r["max_staleness"] for r in rows}):
        rs = [r for r in rows if r["max_staleness"] == bound]

        def ms(key: str, f=lambda r, k: r[k]) -> str:
            vals = [f(r, key) for r in rs]  # noqa: B023 (called in this iteration only)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        gain = ms("gain", lambda r, k: r["final_gold_reward"] - r["initial_gold_reward"])
        lines.append(f"| {bound} | {len(rs)} | {ms('initial_gold_reward')} | {ms('final_gold_reward')} | {gain} | "
                     f"{ms('final_kl')} | {ms('wall_s')} | {ms('gen_busy_s')} | {ms('learn_busy_s')} | "
                     f"{ms('wait_s')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bounds", type=non_negative_int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/quickstart_seeds.json")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/quickstart_seeds")
    args = parser.parse_args()
    rows = [run_one(s, n, args.runs_dir) for n in args.bounds for s in args.seeds]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows, "table": table(rows)}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
