"""Async vs sync: wall-clock at equal episodes for max_staleness N = 0 (synchronous) vs N = 1, 2, 4.

    .venv/bin/python -m bench.async_vs_sync [--staleness 0 1 2 4] [--seeds 0 1 2] [--steps 60]

Every run is `async-rlhf train configs/quickstart.yaml seed=S queue.max_staleness=N learner.steps=STEPS
eval.every=0`: the same prompts, episodes and steps; only the staleness bound differs. Cores
(async_rlhf/cluster/resources.py, `resources.pin_cores: auto`): at N = 0 the phases never overlap, so the
generator and the learner each get both cores; at N >= 1 the generator process (and its vLLM engine
process) is pinned to core 0 and the learner to core 1, so they can run at once without fighting.

Per run, from its timeline.jsonl: G = seconds the generator side was busy (weight load, generation,
reward scoring), T = seconds the learner side was busy (step, weight save and publication); wall =
the training loop's wall-clock (setup and the final evaluation excluded). Per seed, against the N = 0
run: ideal speedup = (G0 + T0) / max(G0, T0), what perfect overlap of the synchronous run's phases
would give; measured speedup = wall0 / wallN; overlap efficiency = measured / ideal (goal >= 0.95).
Also per run: bottleneck share = max(G, T) / wall, the run's own overlap (1.0 = the busier side never
waited), which does not depend on the phases running at the same speed in the N = 0 run.
Writes the JSON after every run (a rerun with the same --out and --steps skips the runs already in it),
a bar plot, and a Gantt chart of one N = 1 run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from async_rlhf.cli.arguments import non_negative_int, positive_int
from async_rlhf.outputs.timeline import busy_seconds, read_timeline
from bench.common import RESULTS, ROOT, save_figure
from bench.runs import earlier_runs, mean_sd, pyplot, save_json, train

GEN_SIDE = {"weight_sync", "generation", "mc_rollouts", "reward"}
LEARN_SIDE = {"learn", "publish"}
GOAL = 0.95
DERIVED = ("ideal_speedup", "measured_speedup", "overlap_efficiency", "bottleneck_share")


def one_run(config: Path, seed: int, bound: int, steps: int, runs_dir: Path) -> dict:
    run_dir = runs_dir / f"N{bound}-seed{seed}"
    summary = train(config, [f"seed={seed}", f"queue.max_staleness={bound}", f"learner.steps={steps}",
                             "eval.every=0"], run_dir)
    events = read_timeline(run_dir / "timeline.jsonl")
    return {"seed": seed, "max_staleness": bound, "run_dir": str(run_dir), "wall_s": summary["wall_s"],
            "G_s": round(busy_seconds(events, GEN_SIDE), 3), "T_s": round(busy_seconds(events, LEARN_SIDE), 3),
            "gen_busy_s": summary["gen_busy_s"], "learn_busy_s": summary["learn_busy_s"],
            "episodes": summary["episodes"], "cores_pinned": summary["cores_pinned"],
            "initial_gold_reward": summary["initial_gold_reward"], "final_gold_reward": summary["final_gold_reward"],
            "final_kl": summary["final_kl"], "max_staleness_seen": summary["max_staleness_seen"],
            "load_avg_1m": summary["load_avg_1m"], "process_s": summary["process_s"]}


def speedups(runs: list[dict]) -> list[dict]:
    """Each run with its speedup against the same seed's N = 0 run (when that run exists)."""
    sync = {r["seed"]: r for r in runs if r["max_staleness"] == 0}
    out = []
    for r in runs:
        # The run's own overlap: 1.0 when the busier side never waited (wall == max(G, T)).
        r = {**r, "bottleneck_share": round(max(r["G_s"], r["T_s"]) / r["wall_s"], 3)}
        base = sync.get(r["seed"])
        if base is None:
            out.append(r)
            continue
        ideal = (base["G_s"] + base["T_s"]) / max(base["G_s"], base["T_s"])
        measured = base["wall_s"] / r["wall_s"]
        out.append({**r, "ideal_speedup": round(ideal, 3), "measured_speedup": round(measured, 3),
                    "overlap_efficiency": round(measured / ideal, 3)})
    return out


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for bound in sorted({r["max_staleness"] for r in runs}):
        rs = [r for r in runs if r["max_staleness"] == bound]
        row = {"max_staleness": bound, "seeds": len(rs)}
        for key in ("wall_s", "G_s", "T_s", "ideal_speedup", "measured_speedup", "overlap_efficiency",
                    "bottleneck_share", "final_gold_reward", "final_kl"):
            row[key] = mean_sd([r.get(key) for r in rs])
        rows.append(row)
    return rows


def summarize(args: argparse.Namespace, runs: list[dict]) -> dict:
    return {"config": str(args.config), "steps": args.steps, "goal_overlap_efficiency": GOAL,
            "runs": speedups(runs), "table": table(speedups(runs))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    parser.add_argument("--staleness", type=non_negative_int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_async_vs_sync")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench_async_vs_sync")
    args = parser.parse_args(argv)
    runs = [{k: v for k, v in r.items() if k not in DERIVED}  # recomputed below with the new runs
            for r in earlier_runs(args.out.with_suffix(".json"), steps=args.steps)]
    done = {(r["seed"], r["max_staleness"]) for r in runs}
    for seed in args.seeds:  # seed-major: a partial sweep still has complete N = 0 vs N > 0 comparisons
        for bound in args.staleness:
            if (seed, bound) in done:
                continue
            runs.append(one_run(args.config, seed, bound, args.steps, args.runs_dir))
            save_json(args.out, summarize(args, runs))
            print(f"seed {seed} N={bound}: wall {runs[-1]['wall_s']:.1f}s, gold {runs[-1]['final_gold_reward']:.3f}",
                  flush=True)
    result = summarize(args, runs)
    save_json(args.out, result)
    plot(args.out.with_suffix(".png"), result["table"])
    gantt_of = next((r for r in runs if r["max_staleness"] == 1), runs[-1])
    gantt(Path(gantt_of["run_dir"]) / "timeline.jsonl", args.out.with_name(args.out.name + "_gantt.png"))
    return result


def plot(png: Path, rows: list[dict]) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"N={r['max_staleness']}" for r in rows]
    for offset, key, label in ((-0.2, "ideal_speedup", "ideal (G0+T0)/max"), (0.2, "measured_speedup", "measured")):
        vals = [r[key] for r in rows]
        ax1.bar([i + offset for i in range(len(rows))], [v[0] for v in vals], 0.4, yerr=[v[1] for v in vals],
                label=label, capsize=3)
    ax1.set_xticks(range(len(rows)), labels)
    ax1.set_ylabel("speedup vs N=0 (wall-clock)")
    ax1.legend()
    gold = [r["final_gold_reward"] for r in rows]
    ax2.bar(labels, [g[0] for g in gold], yerr=[g[1] for g in gold], capsize=3, color="#55a868")
    ax2.set_ylabel("final gold reward")
    ax2.set_ylim(0, 1)
    save_figure(fig, png, "async vs sync, same episodes (mean ± sd over seeds)")


COLORS = {"generation": "#4c72b0", "weight_sync": "#c44e52", "mc_rollouts": "#8172b2", "reward": "#dd8452",
          "learn": "#55a868", "publish": "#937860", "eval": "#999999"}


def gantt(timeline_path: Path, png: Path, seconds: float = 10.0) -> None:
    """The first `seconds` of the loop, one row per worker, one colour per kind of event."""
    events = read_timeline(timeline_path)
    loop_start = min(e["start"] for e in events if e["kind"] in LEARN_SIDE | {"generation"})
    shown = [e for e in events if e["start"] < loop_start + seconds and e["kind"] != "eval"]
    workers = sorted({e["worker"] for e in shown})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(workers) + 1.5))
    for e in shown:
        ax.barh(workers.index(e["worker"]), e["end"] - e["start"], left=e["start"] - loop_start,
                color=COLORS[e["kind"]], edgecolor="none")
    ax.set_yticks(range(len(workers)), workers)
    ax.set_xlabel("seconds since the first step's generation")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for k, c in COLORS.items() if k != "eval"],
              labels=[k for k in COLORS if k != "eval"], ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    ax.set_title(f"timeline of {timeline_path.parent.name}")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
