"""VinePPO vs PPO on the arith task: gold accuracy vs gradient steps and vs wall-clock.

    .venv/bin/python -m bench.vineppo_vs_ppo [--steps 50] [--every 10] [--seeds 0] [--set KEY=VALUE ...]

A rerun with the same --out, --steps and --every skips the (arm, seed) runs already in its JSON.

VinePPO is `configs/arith_vineppo.yaml`; PPO is `configs/arith.yaml` with `loss.name=ppo loss.beta=0.05`
(value model, GAE; the other PPO options at their defaults, as in configs/quickstart_ppo.yaml). Both
get the same steps, prompts per step, samples, learning rate, seed and staleness bound, and a gold
evaluation (exact answer on 128 held-out prompts) every `--every` steps. Wall-clock at step v is the
training loop's elapsed time at that step minus the evaluations before it, so that evaluation
(the same cost for both) is not charged to either loss.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from async_rlhf.cli.arguments import non_negative_int, positive_int
from bench.common import RESULTS, ROOT, save_figure
from bench.runs import earlier_runs, pyplot, save_json, train

ARMS = {"vineppo": ("configs/arith_vineppo.yaml", []),
        "ppo": ("configs/arith.yaml", ["loss.name=ppo", "loss.beta=0.05"])}


def curve(run_dir: Path) -> list[dict]:
    """(version, gold accuracy, seconds of training up to that version) at every evaluation."""
    elapsed = {0: 0.0}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        elapsed[record["step"]] = record["elapsed_s"]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    points = []
    for ev in evals:
        v = ev["version"]
        # what evaluations held training up (they run beside it; records before eval_blocking_s: all of eval_s)
        eval_before = sum(e.get("eval_blocking_s", e["eval_s"]) for e in evals if 0 < e["version"] < v)
        points.append({"version": v, "gold": ev["gold_reward"], "train_s": round(elapsed[v] - eval_before, 2)})
    return points


def one_run(arm: str, seed: int, steps: int, every: int, runs_dir: Path, overrides: list[str]) -> dict:
    config, extra = ARMS[arm]
    run_dir = runs_dir / f"{arm}-seed{seed}"
    s = train(ROOT / config, [*extra, *overrides, f"seed={seed}", f"learner.steps={steps}", f"eval.every={every}"],
              run_dir)
    return {"arm": arm, "seed": seed, "curve": curve(run_dir), "wall_s": s["wall_s"], "eval_s": s["eval_s"],
            "gen_busy_s": s["gen_busy_s"], "learn_busy_s": s["learn_busy_s"],
            "mc_gen_share": s.get("mc_gen_share"), "final_gold_reward": s["final_gold_reward"],
            "final_kl": s["final_kl"], "process_s": s["process_s"], "load_avg_1m": s["load_avg_1m"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--every", type=positive_int, default=10)
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=sorted(ARMS))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_vineppo_vs_ppo")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench_vineppo_vs_ppo")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for both arms, e.g. model.embedded.sft_steps=150 (a quicker warm start)")
    args = parser.parse_args(argv)
    runs = earlier_runs(args.out.with_suffix(".json"), steps=args.steps, eval_every=args.every)
    done = {(r["arm"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            runs.append(one_run(arm, seed, args.steps, args.every, args.runs_dir, args.set))
            save_json(args.out, {"steps": args.steps, "eval_every": args.every, "set": args.set, "runs": runs})
            r = runs[-1]
            print(f"{arm} seed {seed}: gold {r['curve'][0]['gold']:.3f} -> {r['final_gold_reward']:.3f}, "
                  f"train time {r['curve'][-1]['train_s']:.0f}s", flush=True)
    result = {"steps": args.steps, "eval_every": args.every, "set": args.set, "runs": runs}
    save_json(args.out, result)
    plot(args.out.with_suffix(".png"), runs)
    return result


def mean_curve(runs: list[dict]) -> list[dict]:
    """Per evaluated version: mean and sd of gold over the runs, and their mean training seconds."""
    import statistics

    versions = sorted({p["version"] for r in runs for p in r["curve"]})
    rows = []
    for v in versions:
        points = [p for r in runs for p in r["curve"] if p["version"] == v]
        golds = [p["gold"] for p in points]
        rows.append({"version": v, "gold": statistics.mean(golds),
                     "sd": statistics.stdev(golds) if len(golds) > 1 else 0.0,
                     "train_s": statistics.mean(p["train_s"] for p in points), "n": len(points)})
    return rows


def plot(png: Path, runs: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"vineppo": "#4c72b0", "ppo": "#dd8452"}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        mine = [r for r in runs if r["arm"] == arm]
        mean = mean_curve(mine)
        for ax, x in zip(axes, ("version", "train_s")):
            for r in mine:  # each seed, faint
                ax.plot([p[x] for p in r["curve"]], [p["gold"] for p in r["curve"]], color=colors[arm], alpha=0.25)
            ax.errorbar([m[x] for m in mean], [m["gold"] for m in mean], yerr=[m["sd"] for m in mean], marker="o",
                        capsize=3, color=colors[arm], label=f"{arm} (mean ± sd of {len(mine)} seed(s))")
    axes[0].set_xlabel("gradient steps")
    axes[1].set_xlabel("training wall-clock (s, evaluations excluded)")
    for ax in axes:
        ax.set_ylabel("gold accuracy (arith, exact answer)")
        ax.legend()
    save_figure(fig, png, "VinePPO vs PPO on arith")


if __name__ == "__main__":
    main()
