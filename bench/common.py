"""Pieces the micro-benchmarks share: model builders, repeated timing, result files.

Every benchmark writes `<out>.json` (all raw samples plus the summary) and `<out>.png`. Timings are
medians over repetitions, and the two sides of a ratio are measured alternately in the same process,
so that noise from other work on a shared machine hits both sides alike.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from async_rlhf.cli.arguments import positive_int

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# Llama shapes for the size sweeps: (hidden, intermediate, layers, heads). "tiny" is the quickstart policy.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 512, 2, 2),
    "small": (256, 1024, 4, 4),
    "medium": (512, 2048, 6, 8),
    "large": (768, 3072, 8, 12),
}


@dataclass
class Sample:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def build_policy(size: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama of `size` with the embedded tokenizer, saved as an HF checkpoint."""
    import torch

    from async_rlhf.config.model import EmbeddedModelConfig
    from async_rlhf.policies.embedded import build_model, build_tokenizer
    from async_rlhf.policies.quiet_transformers import quiet_transformers

    if (out / "config.json").is_file():
        return out
    hidden, inter, layers, heads = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    emb = EmbeddedModelConfig(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads)
    with quiet_transformers():
        build_model(emb, len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Sample]:
    """Time each callable `repeats` times, interleaved A, B, A, B, ... after `warmup` untimed rounds.

    A callable that returns a float has timed itself (e.g. inside a Ray actor): that number is used.
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples = {name: Sample(name, []) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            timed = fn()
            elapsed = time.perf_counter() - start
            samples[name].seconds.append(timed if isinstance(timed, float) else elapsed)
    return samples


def write_result(out: Path, result: dict) -> Path:
    """`out.json` with the result; returns the path of the PNG to draw next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # The 1-minute load average at the end says how quiet the machine was while measuring.
    result = {**result, "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return out.with_suffix(".png")


def bar_plot(png: Path, title: str, labels: list[str], values: list[float], ylabel: str,
             goal: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, values, color="#4c72b0")
    if goal is not None:
        ax.axhline(goal, color="#c44e52", linestyle="--", label=f"goal {goal:g}")
        ax.legend()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    save_figure(fig, png)


def save_figure(fig: Any, png: Path, title: str | None = None) -> None:
    """Lay out, write and close a benchmark figure (closed, so sweeps do not pile figures up)."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def ratio_main(argv: list[str] | None, doc: str, measure: Callable[..., dict], name: str, repeats: int,
               title: str) -> dict:
    """CLI of a two-sided tokens/s benchmark: parse, measure in a temp dir, write JSON + bar plot, print."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--prompts", type=positive_int, default=16)
    parser.add_argument("--samples", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=repeats)
    parser.add_argument("--out", type=Path, default=RESULTS / f"bench_{name}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result = measure(args.size, args.prompts, args.samples, args.repeats, Path(tmp))
    tps = result["tokens_per_s"]
    bar_plot(write_result(args.out, result), f"{title} ({args.size} model, 1 core)", list(tps), list(tps.values()),
             "tokens/s")
    sides = ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items())
    print(f"{sides}; ratio {result['ratio']:.3f} (goal >= {result['goal']})")
    return result


def start_bench_ray() -> None:
    """The benchmark's own 2-CPU Ray, started as a run starts its local one: quiet on the terminal, and a temp
    directory Ray cannot use said in one line first (exit 2)."""
    from async_rlhf.cluster.local_ray import init_local_ray
    from async_rlhf.config.base import ConfigError
    from async_rlhf.config.run import RunConfig
    from async_rlhf.config.runtime import check_ray_temp_dir
    from async_rlhf.pipeline.startup import ray_init_kwargs

    try:
        check_ray_temp_dir(os.environ)
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None
    init_local_ray(**ray_init_kwargs(RunConfig(resources={"num_cpus": 2}), cores=2))
