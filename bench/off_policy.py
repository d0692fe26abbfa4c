"""Off-policy robustness (the paper's Figures 4/5 at toy scale): final gold reward and KL vs staleness N.

    .venv/bin/python -m bench.off_policy [--losses online_dpo ppo rloo] [--staleness 1 2 4 8 16]
                                         [--seeds 0 1 2] [--steps 40] [--mode fixed|bound]

Each run is a short quickstart run (`configs/quickstart.yaml`, `_ppo`, `_rloo`) with
`seed=S queue.max_staleness=N queue.staleness_mode=MODE learner.steps=STEPS eval.every=0`. The JSON is
rewritten after every run and a rerun with the same --out skips the (mode, loss, N, seed) runs already
in it, so the sweep can be stopped and continued. With --mode fixed (the default, the paper's setting)
step t trains on samples of version max(0, t - N): from step N on every sample is exactly N versions
old. With --mode bound N is only a bound, and the staleness a run reaches depends on how far the
generator gets ahead of the learner. Either way each run records the mean and the maximum staleness
of the samples it trained on (from the queue's histogram).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from async_rlhf.cli.arguments import non_negative_int, positive_int
from bench.common import RESULTS, ROOT, save_figure
from bench.runs import earlier_runs, mean_sd, pyplot, save_json, train

CONFIGS = {"online_dpo": "configs/quickstart.yaml", "ppo": "configs/quickstart_ppo.yaml",
           "rloo": "configs/quickstart_rloo.yaml", "proximal_rloo": "configs/quickstart_proximal_rloo.yaml"}


def mean_staleness(histogram: dict[str, int]) -> float:
    total = sum(histogram.values())
    return sum(int(k) * v for k, v in histogram.items()) / total if total else float("nan")


def one_run(mode: str, loss: str, bound: int, seed: int, steps: int, runs_dir: Path) -> dict:
    run_dir = runs_dir / f"{mode}-{loss}-N{bound}-seed{seed}"
    s = train(ROOT / CONFIGS[loss], [f"seed={seed}", f"queue.max_staleness={bound}", f"queue.staleness_mode={mode}",
                                     f"learner.steps={steps}", "eval.every=0"], run_dir)
    return {"mode": mode, "loss": loss, "max_staleness": bound, "seed": seed,
            "initial_gold_reward": s["initial_gold_reward"],
            "final_gold_reward": s["final_gold_reward"], "final_kl": s["final_kl"],
            "mean_staleness": round(mean_staleness(s["staleness_histogram"]), 3),
            "max_staleness_seen": s["max_staleness_seen"], "staleness_histogram": s["staleness_histogram"],
            "dropped_stale": s["dropped_stale"],
            "wall_s": s["wall_s"], "process_s": s["process_s"], "load_avg_1m": s["load_avg_1m"]}


def run_mode(run: dict) -> str:
    return run.get("mode", "bound")  # runs recorded before --mode existed used the bound


def table(runs: list[dict], mode: str) -> list[dict]:
    """Mean ± sd over seeds for each (loss, N) of one mode: runs of the other mode never mix in."""
    runs = [r for r in runs if run_mode(r) == mode]
    rows = []
    for loss in sorted({r["loss"] for r in runs}):
        for bound in sorted({r["max_staleness"] for r in runs if r["loss"] == loss}):
            rs = [r for r in runs if r["loss"] == loss and r["max_staleness"] == bound]
            rows.append({"mode": mode, "loss": loss, "max_staleness": bound, "seeds": len(rs),
                         **{k: mean_sd([r[k] for r in rs]) for k in
                            ("final_gold_reward", "final_kl", "mean_staleness", "process_s")}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--staleness", type=non_negative_int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--mode", choices=["fixed", "bound"], default="fixed",
                        help="queue.staleness_mode: fixed = exactly N versions old from step N on; bound = at most N")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_off_policy")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench_off_policy")
    args = parser.parse_args(argv)
    runs = earlier_runs(args.out.with_suffix(".json"))  # any steps: entries are keyed by mode, loss, N, seed
    done = {(run_mode(r), r["loss"], r["max_staleness"], r["seed"]) for r in runs}
    # Seed-major, then N: a partial sweep has every loss and bound at one seed before a second seed.
    for seed in args.seeds:
        for bound in args.staleness:
            for loss in args.losses:
                if (args.mode, loss, bound, seed) in done:
                    continue
                runs.append(one_run(args.mode, loss, bound, seed, args.steps, args.runs_dir))
                result = {"steps": args.steps, "mode": args.mode, "runs": runs, "table": table(runs, args.mode)}
                save_json(args.out, result)
                r = runs[-1]
                print(f"{args.mode} {loss} N={bound} seed {seed}: gold {r['final_gold_reward']:.3f}, "
                      f"KL {r['final_kl']:.3f}, "
                      f"mean staleness {r['mean_staleness']:.2f}", flush=True)
    result = {"steps": args.steps, "mode": args.mode, "runs": runs, "table": table(runs, args.mode)}
    save_json(args.out, result)
    plot(args.out.with_suffix(".png"), result["table"], args.mode)
    return result


def plot(png: Path, rows: list[dict], mode: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for loss in sorted({r["loss"] for r in rows}):
        rs = [r for r in rows if r["loss"] == loss]
        xs = [r["max_staleness"] for r in rs]
        for ax, key in zip(axes, ("final_gold_reward", "final_kl")):
            ax.errorbar(xs, [r[key][0] for r in rs], yerr=[r[key][1] for r in rs], marker="o", capsize=3, label=loss)
    for ax, label in zip(axes, ("final gold reward", "final KL to the reference")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_staleness N")
        ax.set_ylabel(label)
        ax.legend()
    save_figure(fig, png, f"off-policy robustness, staleness_mode={mode} (mean ± sd over seeds)")


if __name__ == "__main__":
    main()
