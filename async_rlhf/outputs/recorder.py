"""RunRecorder: everything a run leaves in its directory (config, metrics, summary, plot), and the
same step and eval records to the metric sinks (TensorBoard, W&B) the config enables."""
from __future__ import annotations

import json
import math
import os
import threading
from itertools import accumulate
from pathlib import Path
from typing import Any

from async_rlhf.config.run import RunConfig, dump_config
from async_rlhf.failures import naming
from async_rlhf.outputs.line_log import DiskNotice, LineLog, say
from async_rlhf.outputs.plots import pyplot
from async_rlhf.outputs.plots import series as _series
from async_rlhf.outputs.run_dir_keeper import RunDirKeeper
from async_rlhf.outputs.sinks import MetricSink

PLOTTED = ("step", "reward_mean", "kl")  # what reward.png needs of each step; the rest lives in metrics.jsonl only


class RunRecorder:
    def __init__(self, run_dir: Path, sinks: list[MetricSink] | None = None) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.disk = DiskNotice()  # shared with the run's timeline (pipeline/controller.py)
        self.keeper = RunDirKeeper(run_dir)  # likewise; settled once the run holds its directory
        self.metrics_log = LineLog(self.metrics_path, self.disk, self.keeper)
        self.eval_log = LineLog(self.eval_path, self.disk, self.keeper)
        self.steps: list[dict] = []  # PLOTTED keys only: a long run's full records would grow without bound
        self.step_offsets: list[int] = []  # where each step's line starts in metrics.jsonl, for /history
        self.evals: list[dict] = []
        self.episodes = 0  # samples trained so far (the last step's `episodes`), stamped on each eval record
        self.sinks: list[MetricSink] = list(sinks or [])
        self.keeper.remakes.append(self._start_over)
        self.cfg: RunConfig | None = None

    def save_config(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        dump_config(cfg, self.run_dir / "config.yaml")

    def _start_over(self) -> None:
        """The run directory made again (RunDirKeeper): its config as at the start, the logs empty but for the
        first evaluation, which the summary's starting reward and the figure start from."""
        if self.cfg is not None:
            self.save_config(self.cfg)
        self.steps, self.step_offsets, self.evals = [], [], self.evals[:1]
        for record in self.evals:
            self.eval_log.append(json_text(record))

    def add_sinks(self, sinks: list[MetricSink]) -> None:
        self.sinks.extend(sinks)

    def log_step(self, record: dict) -> None:
        self.keeper.ensure()  # before the counts: a directory made again starts them over
        self.steps.append(_plotted(record))
        self.episodes = record.get("episodes", self.episodes)
        self.step_offsets.append(self.metrics_log.append(json_text(record)))
        for sink in self.sinks:
            sink.log("train", record, record["step"])

    def log_eval(self, record: dict) -> None:
        """One line of eval.jsonl, with the samples trained so far (when the evaluation started, if the record
        says: it ran beside training): gold against episodes needs no other file."""
        record = {**record, "episodes": record.get("episodes", self.episodes)}
        self.keeper.ensure()
        self.evals.append(record)
        self.eval_log.append(json_text(record))
        for sink in self.sinks:
            sink.log("eval", record, record["version"])

    def close(self) -> None:
        """Flush and close the sinks (idempotent)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def step_records(self, since: int = 0, limit: int | None = None) -> list[dict]:
        """Whole step records from `since` on, at most `limit` of them, read back from metrics.jsonl between those
        steps' lines (HTTP /history polls it; only those bytes are read). The loop's thread appends meanwhile: a
        last line not yet ended is not read."""
        if since >= len(self.step_offsets):
            return []
        end = since + limit if limit is not None and since + limit < len(self.step_offsets) else None
        with self.metrics_path.open("rb") as fh:
            fh.seek(self.step_offsets[since])
            data = fh.read() if end is None else fh.read(self.step_offsets[end] - self.step_offsets[since])
            lines = data.split(b"\n")[:-1]  # the part after the last newline is unfinished
        return [record for record in _parsed(None, [line.decode(errors="replace") for line in lines]) if record]

    def sync(self) -> None:
        """Both logs on disk, before a checkpoint (itself fsynced) counts their lines: after a power loss a log
        shorter than its checkpoint's count would make --resume fail. Lines held for want of space raise."""
        for log in (self.metrics_log, self.eval_log):
            log.require_on_disk()
        for path in (self.metrics_path, self.eval_path):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())

    def write_summary(self, summary: dict) -> None:
        """summary.json, after every line held for want of space (the run's last write: all must be on disk)."""
        for log in (self.metrics_log, self.eval_log):
            log.require_on_disk()
        self.keeper.ensure()
        path = self.run_dir / "summary.json"
        with naming(path):
            path.write_text(json_text(summary, indent=2) + "\n")

    def truncate(self, metrics_lines: int, eval_lines: int) -> None:
        """Resume: keep the first lines of each log (those a checkpoint counted), drop what came after it."""
        lines = self._keep(self.metrics_path, metrics_lines)
        records = _parsed(self.metrics_path, lines)
        self.steps = [_plotted(record) for record in records]
        ends = list(accumulate(len(line.encode()) + 1 for line in lines))
        self.step_offsets = [0, *ends[:-1]] if lines else []
        self.episodes = next((r["episodes"] for r in reversed(records) if "episodes" in r), 0)
        self.evals = _parsed(self.eval_path, self._keep(self.eval_path, eval_lines))
        for log in (self.metrics_log, self.eval_log):
            log.sync_to_disk()

    @staticmethod
    def _keep(path: Path, lines: int) -> list[str]:
        kept = path.read_text().splitlines()[:lines] if path.is_file() else []
        if len(kept) < lines:
            raise ValueError(f"{path} has {len(kept)} lines, fewer than the {lines} the checkpoint counted")
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        return kept

    def warm_plot(self) -> None:
        """Import matplotlib (~0.3 s) in the background, for a caller about to wait (the final evaluation):
        plot() then finds it imported, or waits on the import lock for the rest."""
        threading.Thread(target=pyplot, name="warm-plot", daemon=True).start()

    def plot_at_end(self) -> None:
        """reward.png, a run's last file: a disk that cannot take it does not fail a run whose results are in."""
        try:
            self.plot()
        except OSError as exc:
            say(f"warning: reward.png not written ({exc}); `async-rlhf plot {self.run_dir} --out FILE` draws it")

    def plot(self) -> Path:
        """reward.png: training (proxy) reward, gold evaluations (and win-rate) over steps; KL to the reference."""
        plt = pyplot()
        fig, (ax_r, ax_kl) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        steps = _series(self.steps, "step")
        ax_r.plot(steps, _series(self.steps, "reward_mean"), label="train reward (proxy), batch mean", alpha=0.7)
        if self.evals:
            ax_r.plot(_series(self.evals, "version"), _series(self.evals, "gold_reward"), "o-",
                      label="gold reward (eval)")
            if any(r.get("win_rate") is not None for r in self.evals):
                ax_r.plot(_series(self.evals, "version"), _series(self.evals, "win_rate"), "s--",
                          label="win-rate vs reference (eval)")
            if any(r.get("win_rate_vs_initial") is not None for r in self.evals):
                ax_r.plot(_series(self.evals, "version"), _series(self.evals, "win_rate_vs_initial"), "d:",
                          label="gold win-rate vs starting policy (eval)")
        ax_r.set_ylabel("reward")
        ax_r.legend(loc="lower right")
        ax_r.grid(alpha=0.3)
        ax_kl.plot(steps, _series(self.steps, "kl"), color="tab:red", alpha=0.5, label="train batch (chosen+rejected)")
        if self.evals:
            versions = _series(self.evals, "version")
            ax_kl.plot(versions, _series(self.evals, "kl"), "o-", color="darkred",
                       label="eval samples (current policy)")
        ax_kl.legend(loc="upper left")
        ax_kl.set_ylabel("KL to reference (nats/seq)")
        ax_kl.set_xlabel("learner step (policy version)")
        ax_kl.grid(alpha=0.3)
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
        out = self.run_dir / "reward.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def json_text(value: Any, indent: int | None = None) -> str:
    """JSON of `value` with NaN and infinities as null, as the HTTP API gives them: Python writes NaN, which is
    not JSON (JavaScript, DuckDB and Go refuse the line). A step where every pair tied has a NaN loss."""
    return json.dumps(json_ready(value), indent=indent, allow_nan=False)


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float as None (null), in dicts, lists and tuples: what JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _parsed(path: Path | None, lines: list[str]) -> list[dict]:
    """The records of a log's lines, one per line: a line that is not a JSON object (damaged by hand or by the disk)
    is an empty record, so that counts and offsets still match the file, and said once for `path`."""
    records: list[dict] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {})
    bad = [number for number, (line, record) in enumerate(zip(lines, records), 1) if line.strip() and not record]
    if bad and path is not None:
        say(f"warning: line {bad[0]} of {path} is not a JSON record ({len(bad)} such line(s)): kept as it is, and "
            f"left out of the run's figures")
    return records


def _plotted(record: dict) -> dict:
    return {k: record.get(k) for k in PLOTTED}
