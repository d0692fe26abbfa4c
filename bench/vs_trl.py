"""TRL's OnlineDPOTrainer against this project on the same task, policy, reward and hyperparameters (issue 17).

    async-rlhf bench vs_trl [--config configs/quickstart.yaml] [--steps 200] [--prompts 16] [--every 25]
                            [--set key=value ...] [--repeats N] [--target-gold G] [--trl-threads T]

Both arms get the config with `learner.steps`, `generation.prompts_per_step`, `eval.every`,
`generation.samples_per_prompt=2` (TRL's online DPO samples two) and `loss.name=online_dpo`, plus the
`--set` overrides, and start from the same policy checkpoint (the embedded one is built first, outside
both clocks):
- TRL: `python -m bench.trl_online_dpo` (bench/trl_online_dpo.py) in its own process; its callback saves
  the weights at our evaluation points and notes the time;
- ours: `async-rlhf train CONFIG ...`, the normal CLI; its eval.jsonl has the gold curve (`wall_s`,
  `eval_s`, `episodes` on every record).
One after the other, never side by side (they would share the two cores); with `--repeats N`, N runs of
each arm, alternating which goes first, so that a burst of load from elsewhere on a shared machine does
not always land on the same arm (the summary holds medians over the repeats). Each finished arm leaves
`arm.json` in its run directory; a rerun with the same settings and --runs-dir keeps those arms and runs
the rest, so a stopped bench loses only the arm it was in. Then one evaluator
(bench/policy_eval.py: our generator and the run's gold scorer on the held-out eval prompts, sampled as a
run's evaluation samples) scores the starting policy, TRL's snapshots and both final policies.

Reported per arm:
- whole process time (launch to exit, measured here), and the same less the time spent evaluating inside
  the run (ours: its evaluations; TRL: its snapshot writes);
- steady-state s/step: the median time between consecutive step ends;
- the gold curve against the training clock (seconds since the process started, less the in-run
  evaluation time before the point) and against episodes; the time to a target gold (default: the lower
  of the two arms' last gold, so both reach it) at the first evaluation point at or above it;
- the final gold by the one evaluator (ours also by its own in-run evaluation, a consistency check).
Writes `<out>.json` and `<out>.png` (gold against the training clock and against episodes, both curves).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from async_rlhf.cli.arguments import positive_int
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.policies.embedded import ensure_policy
from bench.common import RESULTS, ROOT, save_figure
from bench.policy_eval import GoldEvaluator
from bench.runs import RUN_TIMEOUT_S, pyplot, save_json, train

ARMS = ("trl", "ours")
COLORS = {"trl": "#c44e52", "ours": "#4c72b0"}


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """What both arms run with (the config's other settings are shared as they are)."""
    return [f"learner.steps={args.steps}", f"generation.prompts_per_step={args.prompts}",
            "generation.samples_per_prompt=2", f"eval.every={args.every}", "loss.name=online_dpo", *args.set]


def check_comparable(cfg: RunConfig) -> None:
    """TRL gets the train reward as a Python function (a rule scorer or your own), not a served or learned
    model."""
    if cfg.reward.learned is not None or cfg.reward.remote is not None:
        raise SystemExit("vs_trl: the train reward must be a rule scorer or a function; add --set "
                         "reward.learned=null (and reward.remote=null)")


def run_trl(config: Path, overrides: list[str], policy: Path, out: Path, threads: int | None) -> dict:
    """TRL's arm in its own process; its clock.json plus the whole-process time measured here."""
    cmd = [sys.executable, "-m", "bench.trl_online_dpo", str(config), *overrides, "--policy", str(policy),
           "--out", str(out), *(["--threads", str(threads)] if threads else [])]
    out.mkdir(parents=True)
    start = time.perf_counter()
    with (out / "trl.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    process_s = round(time.perf_counter() - start, 2)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed: {(out / 'trl.log').read_text()[-3000:]}")
    clock = json.loads((out / "clock.json").read_text())
    return {**clock, "process_s": process_s, "load_avg_1m": os.getloadavg()[0]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_step_s(step_ends: list[float]) -> float:
    """Steady state: the median gap between consecutive step ends (fill-up and evaluation steps are outliers)."""
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return round(statistics.median(gaps), 4) if gaps else float("nan")


def ours_curve(evals: list[dict]) -> list[dict]:
    """Gold per evaluation, on the training clock: wall_s less what evaluations held the loop up before it
    started. Evaluations overlap one another, so an earlier one's waiting can come after a later one's start:
    `eval_blocking_before_s` counts only what came before (older records: every earlier record's)."""
    points, spent = [], 0.0
    for e in evals:
        before = e.get("eval_blocking_before_s", spent)
        points.append({"version": e["version"], "episodes": e["episodes"], "wall_s": e["wall_s"],
                       "train_clock_s": round(e["wall_s"] - before, 3), "gold": e["gold_reward"]})
        spent += e.get("eval_blocking_s", e["eval_s"])
    return points


def trl_curve(points: list[dict], gold: dict[int, float]) -> list[dict]:
    return [{"version": p["version"], "episodes": p["episodes"], "wall_s": p["wall_s"],
             "train_clock_s": round(p["wall_s"] - p["save_s_before"], 3), "gold": gold[p["version"]]}
            for p in points]


def time_to(curve: list[dict], target: float) -> float | None:
    """Training-clock seconds at the first evaluation with gold >= target (None: never)."""
    return next((p["train_clock_s"] for p in curve if p["gold"] >= target), None)


def score_all(cfg: RunConfig, policy: Path, runs: list[dict]) -> tuple[float, list[dict]]:
    """The one evaluator: the starting policy, then per repeat each TRL snapshot and our final policy."""
    evaluator = GoldEvaluator(cfg, policy)
    try:
        start = evaluator.score(None)
        golds = [{"trl": {0: start, **{p["version"]: evaluator.score(Path(p["snapshot"]))
                                       for p in run["trl"]["points"][1:]}},
                  "ours": evaluator.score(Path(run["ours"]["run_dir"]) / "final")} for run in runs]
    finally:
        evaluator.close()
    return start, golds


def trl_arm(trl: dict, by_version: dict[int, float], steps: int) -> dict:
    loop_s = trl["train_end_s"] - trl["train_begin_s"]
    return {"process_s": trl["process_s"], "in_run_eval_s": trl["save_s"],
            "net_process_s": round(trl["process_s"] - trl["save_s"], 2),
            "loop_s": round(loop_s, 2), "net_loop_s": round(loop_s - trl["save_s"], 2),
            "s_per_step": median_step_s([trl["train_begin_s"], *trl["step_end_s"]]),
            "final_gold": by_version[steps], "curve": trl_curve(trl["points"], by_version),
            "torch_threads": trl["torch_threads"], "load_avg_1m": trl["load_avg_1m"]}


def ours_arm(summary: dict, final_gold: float, steps: int) -> dict:
    run_dir = Path(summary["run_dir"])
    evals = read_jsonl(run_dir / "eval.jsonl")
    # what the run waited for (evaluations run beside training; records before eval_blocking_s: all of eval_s)
    in_loop = summary.get("eval_blocking_loop_s",
                          sum(e.get("eval_blocking_s", e["eval_s"]) for e in evals if 0 < e["version"] < steps))
    in_run = sum(e.get("eval_blocking_s", e["eval_s"]) for e in evals)
    steps_log = read_jsonl(run_dir / "metrics.jsonl")
    ends = [r["elapsed_s"] for r in steps_log]
    # Ours skips a pair whose two samples scored the same (no preference); TRL trains on it (first = chosen).
    tied = sum(r.get("skipped_ties", 0) for r in steps_log) / max(1, sum(len(r["prompt_ids"]) for r in steps_log))
    return {"process_s": summary["process_s"], "in_run_eval_s": round(in_run, 2),
            "net_process_s": round(summary["process_s"] - in_run, 2),
            "loop_s": summary["wall_s"], "net_loop_s": round(summary["wall_s"] - in_loop, 2),
            "s_per_step": median_step_s([0.0, *ends]), "final_gold": final_gold,
            "final_gold_in_run": evals[-1]["gold_reward"], "start_gold_in_run": evals[0]["gold_reward"],
            "curve": ours_curve(evals), "tied_share": round(tied, 3),
            "max_staleness_seen": summary["max_staleness_seen"],
            "cores_pinned": summary["cores_pinned"], "load_avg_1m": summary["load_avg_1m"]}


def with_target(runs: list[dict], target: float | None) -> float:
    """Each arm's time to the target gold; the default target is the lowest last gold of any run, so all reach it."""
    target = min(r[a]["curve"][-1]["gold"] for r in runs for a in ARMS) if target is None else target
    for run in runs:
        for arm in ARMS:
            run[arm]["time_to_target_s"] = time_to(run[arm]["curve"], target)
    return target


SUMMED = ("process_s", "net_process_s", "net_loop_s", "s_per_step", "time_to_target_s", "final_gold")


def summarize(runs: list[dict]) -> dict:
    """Per arm, the median of each number over the repeats (time to target: over the runs that reached it)."""
    out = {}
    for arm in ARMS:
        values = {key: [r[arm][key] for r in runs if r[arm][key] is not None] for key in SUMMED}
        out[arm] = {key: round(statistics.median(v), 4) if v else None for key, v in values.items()}
        out[arm]["reached_target"] = len(values["time_to_target_s"])
    return out


def run_ours(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> dict:
    return {**train(args.config, overrides, run_dir), "run_dir": str(run_dir)}


DONE = "arm.json"  # an arm's raw result, written when it finished: a rerun with the same --runs-dir keeps it


def run_arm(args: argparse.Namespace, overrides: list[str], policy: Path, arm: str, repeat: int) -> dict:
    """One arm of one repeat, or its result from an earlier, stopped bench with the same settings."""
    run_dir = args.runs_dir / f"{arm}-{repeat}"
    key = {"config": str(args.config), "overrides": overrides,
           "trl_threads": args.trl_threads if arm == "trl" else None}
    done = run_dir / DONE
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        print(f"vs_trl: repeat {repeat}, {arm}: kept from an earlier bench ({done})", flush=True)
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # neither arm may find an older run's files
    print(f"vs_trl: repeat {repeat}, {arm} ...", flush=True)
    raw = (run_trl(args.config, overrides, policy, run_dir, args.trl_threads) if arm == "trl"
           else run_ours(args, overrides, run_dir))
    done.write_text(json.dumps({**raw, "key": key}) + "\n")
    print(f"vs_trl: repeat {repeat}, {arm} done in {raw['process_s']:.1f}s", flush=True)
    return raw


def run_pair(args: argparse.Namespace, overrides: list[str], policy: Path, repeat: int) -> dict:
    """One repeat: both arms, one after the other; odd repeats start with ours, so neither always goes first."""
    order = ARMS if repeat % 2 == 0 else ARMS[::-1]
    return {"order": list(order), **{arm: run_arm(args, overrides, policy, arm, repeat) for arm in order}}


def run_arms(args: argparse.Namespace, cfg: RunConfig, overrides: list[str], policy: Path) -> dict:
    raws = [run_pair(args, overrides, policy, r) for r in range(args.repeats)]
    print("vs_trl: scoring every policy with one evaluator ...", flush=True)
    start, golds = score_all(cfg, policy, raws)
    runs = [{"repeat": i, "order": raw["order"], "trl": trl_arm(raw["trl"], gold["trl"], args.steps),
             "ours": ours_arm(raw["ours"], gold["ours"], args.steps)} for i, (raw, gold) in enumerate(zip(raws, golds))]
    return {"start_gold": start, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--prompts", type=positive_int, default=16, help="prompts per step")
    parser.add_argument("--every", type=positive_int, default=25, help="evaluation points: every N steps, and the last")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides, for both arms")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs of each arm, alternating which goes first")
    parser.add_argument("--target-gold", type=float, default=None)
    parser.add_argument("--trl-threads", type=positive_int, default=None,
                        help="torch threads of the TRL process (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_vs_trl")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench_vs_trl")
    args = parser.parse_args(argv)
    overrides = shared_overrides(args)
    cfg = load_config(args.config, overrides)
    check_comparable(cfg)
    policy = Path(ensure_policy(cfg))  # built (or found in the cache) before either clock starts
    started = time.perf_counter()
    result = run_arms(args, cfg, overrides, policy)
    target = with_target(result["runs"], args.target_gold)
    result = {"config": str(args.config), "overrides": overrides, "policy": str(policy), "target_gold": target,
              "repeats": args.repeats, "bench_s": round(time.perf_counter() - started, 1),
              "summary": summarize(result["runs"]), **result}
    save_json(args.out, result)
    plot(args.out.with_suffix(".png"), result, Path(args.config).stem)
    print(table(result))
    return result


def fmt(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    """Medians over the repeats, then each run (the rows docs/benchmarks.md shows)."""
    rows = ["| arm | run | whole process s | less in-run eval s | loop s | s/step | time to gold "
            f"{result['target_gold']:.3f} s | final gold |", "|---|---|---|---|---|---|---|---|"]
    labelled = [("median", result["summary"])] + [(str(r["repeat"]), r) for r in result["runs"]]
    for name in ARMS:
        for label, source in labelled:
            a = source[name]
            rows.append(f"| {name} | {label} | {fmt(a['process_s'])} | {fmt(a['net_process_s'])} | "
                        f"{fmt(a['net_loop_s'])} | {fmt(a['s_per_step'], 3)} | {fmt(a['time_to_target_s'])} | "
                        f"{fmt(a['final_gold'], 3)} |")
    return "\n".join(rows)


def plot(png: Path, result: dict, title: str) -> None:
    plt = pyplot()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name in ARMS:
        label = "TRL OnlineDPOTrainer" if name == "trl" else "async-rlhf"
        for run in result["runs"]:
            curve = run[name]["curve"]
            gold = [p["gold"] for p in curve]
            first = run["repeat"] == 0
            ax_t.plot([p["train_clock_s"] for p in curve], gold, "o-", color=COLORS[name], alpha=0.8,
                      label=label if first else None)
            ax_e.plot([p["episodes"] for p in curve], gold, "o-", color=COLORS[name], alpha=0.8)
    for ax in (ax_t, ax_e):
        ax.axhline(result["target_gold"], color="#999999", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("seconds since process start, in-run evaluation excluded")
    ax_e.set_xlabel("episodes (samples trained)")
    ax_t.set_ylabel("gold reward (held-out prompts)")
    ax_t.legend(loc="lower right")
    save_figure(fig, png, f"TRL vs async-rlhf, online DPO, {title} ({result['repeats']} run(s) each)")


if __name__ == "__main__":
    main()
