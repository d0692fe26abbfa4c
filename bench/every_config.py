"""Async vs sync on every CPU config in configs/: the loop's wall-clock at N = 1 against N = 0, equal episodes.

    async-rlhf bench every_config [--steps 40] [--configs quickstart arith ...]

Each config runs twice, `queue.max_staleness=0` then `=1`, with `learner.steps=STEPS eval.every=0
api.enabled=false` (plus the overrides in EXTRA: SmolLM2 trains on VADER, not a learned proxy, with fewer
steps and eval prompts; the BYO example on the embedded model exported as a checkpoint). The speedup is
N = 0's loop `wall_s` over N = 1's (issue 17's target: at least 1.0 on every config). One run per arm on a
shared machine is noisy: repeat with --repeats and read the spread. configs/paper/ are GPU configs.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from async_rlhf.cli.arguments import positive_int
from bench.common import RESULTS, ROOT
from bench.runs import earlier_runs, save_json, train

SMOLLM2 = ["reward.learned=null", "task.eval_prompts=16"]
EXTRA: dict[str, list[str]] = {"smollm2_gold_proxy": SMOLLM2}
STEPS: dict[str, int] = {"smollm2_gold_proxy": 6}  # ~20 s a step: the whole sweep stays under an hour
KEYS = ("wall_s", "gen_busy_s", "learn_busy_s", "learn_wide_s", "final_gold_reward", "load_avg_1m")


def cpu_configs() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def overrides(name: str, steps: int, model_dir: Path) -> list[str]:
    extra = [f"model.path={model_dir}"] if name == "byo_example" else EXTRA.get(name, [])
    return [f"learner.steps={STEPS.get(name, steps)}", "eval.every=0", "api.enabled=false", *extra]


def exported_model(runs_dir: Path) -> Path:
    """The embedded sort model as an HF checkpoint, what configs/byo_example.yaml trains (README)."""
    from async_rlhf.cli.main import main as cli

    out = runs_dir / "tiny-sort"
    if not (out / "config.json").is_file() and cli(["export-model", str(out)]) != 0:
        raise RuntimeError("async-rlhf export-model failed")
    return out


def one_run(name: str, bound: int, repeat: int, args: argparse.Namespace, model_dir: Path) -> dict:
    run_dir = args.runs_dir / f"{name}-N{bound}-r{repeat}"
    summary = train(ROOT / "configs" / f"{name}.yaml",
                    [f"queue.max_staleness={bound}", *overrides(name, args.steps, model_dir)], run_dir)
    return {"config": name, "max_staleness": bound, "repeat": repeat, **{k: summary.get(k) for k in KEYS}}


def table(runs: list[dict]) -> list[dict]:
    """Per config: median loop of each arm and their ratio (sync / async: above 1 means async is faster)."""
    rows = []
    for name in sorted({r["config"] for r in runs}):
        walls = {n: [r["wall_s"] for r in runs if r["config"] == name and r["max_staleness"] == n] for n in (0, 1)}
        if walls[0] and walls[1]:
            sync, asyn = statistics.median(walls[0]), statistics.median(walls[1])
            rows.append({"config": name, "sync_wall_s": sync, "async_wall_s": asyn, "speedup": round(sync / asyn, 3),
                         "runs": len(walls[0]) + len(walls[1])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=cpu_configs(), choices=cpu_configs())
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--repeats", type=positive_int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_every_config")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench_every_config")
    args = parser.parse_args(argv)
    runs = earlier_runs(args.out.with_suffix(".json"), steps=args.steps)
    done = {(r["config"], r["max_staleness"], r["repeat"]) for r in runs}
    model_dir = exported_model(args.runs_dir)
    for repeat in range(args.repeats):
        for name in args.configs:
            for bound in (0, 1):
                if (name, bound, repeat) not in done:
                    runs.append(one_run(name, bound, repeat, args, model_dir))
                    save_json(args.out, {"steps": args.steps, "runs": runs, "table": table(runs)})
                    print(f"{name} N={bound}: loop {runs[-1]['wall_s']:.1f} s", flush=True)
    result = {"steps": args.steps, "runs": runs, "table": table(runs)}
    save_json(args.out, result)
    for row in result["table"]:
        print(f"{row['config']}: sync {row['sync_wall_s']:.1f} s, async {row['async_wall_s']:.1f} s, "
              f"{row['speedup']:.2f}x")
    return result
