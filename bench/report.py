"""Markdown tables of the run-level benchmarks' JSON results (pasted into docs/benchmarks.md).

    .venv/bin/python -m bench.report [--results docs/results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS


def pm(pair: list[float], digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def async_vs_sync(result: dict) -> str:
    lines = ["| N | seeds | loop wall s | G s | T s | ideal speedup | measured speedup | overlap efficiency | "
             "max(G,T)/wall | final gold |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['max_staleness']} | {r['seeds']} | {pm(r['wall_s'], 1)} | {pm(r['G_s'], 1)} | "
                     f"{pm(r['T_s'], 1)} | {pm(r['ideal_speedup'], 2)} | {pm(r['measured_speedup'], 2)} | "
                     f"{pm(r['overlap_efficiency'], 2)} | {pm(r['bottleneck_share'], 2)} | "
                     f"{pm(r['final_gold_reward'])} |")
    return "\n".join(lines)


def off_policy(result: dict) -> str:
    lines = ["| loss | N | seeds | final gold | final KL | mean staleness trained on | s per run |",
             "|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['loss']} | {r['max_staleness']} | {r['seeds']} | {pm(r['final_gold_reward'])} | "
                     f"{pm(r['final_kl'])} | {pm(r['mean_staleness'], 2)} | {pm(r['process_s'], 0)} |")
    return "\n".join(lines)


def vineppo_vs_ppo(result: dict) -> str:
    lines = ["| loss | seed | gold by step (step: gold @ training s) | loop wall s | eval s | MC share of generation |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        curve = ", ".join(f"{p['version']}: {p['gold']:.3f} @ {p['train_s']:.0f}" for p in r["curve"])
        share = f"{r['mc_gen_share']:.2f}" if r.get("mc_gen_share") is not None else "—"
        lines.append(f"| {r['arm']} | {r['seed']} | {curve} | {r['wall_s']:.0f} | {r['eval_s']:.0f} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name, render in (("async_vs_sync", async_vs_sync), ("off_policy", off_policy),
                         ("vineppo_vs_ppo", vineppo_vs_ppo)):
        path = args.results / f"bench_{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            print(f"## {name} (load average at the end: {result['load_avg_1m_now']:.1f})\n\n{render(result)}\n")


if __name__ == "__main__":
    main()
