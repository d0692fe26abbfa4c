"""Curves of one or several runs from their JSONL files (`async-rlhf plot RUN_DIR... --out FILE.png`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from async_rlhf.config.base import ConfigError

# (title, metrics.jsonl key, eval.jsonl key drawn as markers on the same axes, y label)
PANELS = (
    ("reward", "reward_mean", "gold_reward", "train reward (line), gold eval (markers)"),
    ("KL to reference", "kl", "kl", "nats / sequence"),
    ("staleness", "staleness_mean", None, "versions (batch mean)"),
    ("generation throughput", "gen_tokens_per_s", None, "tokens / s (cumulative)"),
)


def series(records: list[dict], key: str) -> list[float]:
    """Values for plotting; a missing or None value (e.g. a step with no usable pair) is a gap."""
    return [float("nan") if r.get(key) is None else r[key] for r in records]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's JSONL file. A last line cut short (a run killed while writing it) is left out;
    a bad line anywhere else is a one-line error naming it."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not line.rstrip().endswith("}"):
                break
            raise ConfigError(f"plot error: line {number} of '{path}' is not a JSON record; fix or remove it") from None
    return records


def check_out(out: Path) -> Path:
    """The image file to write: a directory is refused and a name without a suffix gets .png (matplotlib would
    add it while the command printed the name without it); a suffix matplotlib cannot write is refused."""
    if out.is_dir():
        raise ConfigError(f"plot error: --out '{out}' is a directory; give a file name such as {out / 'runs.png'}")
    out = out if out.suffix else out.with_suffix(".png")
    quiet_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(f"plot error: --out '{out}': matplotlib cannot write '{out.suffix}'; use one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run directory written by `async-rlhf train`."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"plot error: no metrics.jsonl in '{run_dir}'; "
                          "pass run directories written by async-rlhf train")
    evals = run_dir / "eval.jsonl"
    return read_jsonl(metrics), read_jsonl(evals) if evals.is_file() else []


def quiet_matplotlib() -> None:
    """Before matplotlib's first import: an unwritable config directory ($MPLCONFIGDIR, $XDG_CACHE_HOME) costs it
    only a temporary one, yet it put two lines of warning on the run's terminal."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def pyplot() -> Any:
    quiet_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Reward, KL, staleness and throughput of every run on one 2x2 figure, one colour per run; returns the file
    written."""
    out = check_out(out)
    runs = [(str(d), *load_run(d)) for d in run_dirs]  # all read first: a bad directory fails before drawing
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for i, (label, steps, evals) in enumerate(runs):
        color = f"C{i}"
        x = [r["step"] for r in steps]
        for ax, (title, key, eval_key, ylabel) in zip(axes.flat, PANELS):
            ax.plot(x, series(steps, key), color=color, alpha=0.8, label=label)
            if eval_key and evals:
                ax.plot(series(evals, "version"), series(evals, eval_key), "o--", color=color, alpha=0.9)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("learner step (policy version)")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
