"""Metric sinks besides the JSONL files: TensorBoard event files and a Weights & Biases run.

Every sink gets the same records the JSONL files hold, under the same names: a learner step's
`reward_mean` is `train/reward_mean` (metrics.jsonl), an evaluation's `gold_reward` is
`eval/gold_reward` (eval.jsonl), at the step (policy version) the record belongs to. Only numbers
are sent (lists such as `prompt_ids` stay in the JSONL files).
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from async_rlhf.config.base import ConfigError
from async_rlhf.config.redaction import redacted
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import first_line
from async_rlhf.outputs.line_log import say

Kind = Literal["train", "eval"]
AXES: dict[str, str] = {"train": "train/step", "eval": "eval/version"}  # W&B's x axis of each kind's charts


class MetricSink(Protocol):
    def log(self, kind: Kind, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(kind: Kind, record: dict) -> dict[str, float]:
    """`kind/name` -> value for every number of a record (booleans as 0/1, NaN kept as a gap)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and (isinstance(value, bool) or not math.isinf(value)):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardSink:
    """Event files in `log_dir`, readable by TensorBoard (and its EventAccumulator), written in this thread: torch's
    SummaryWriter writes from a thread of its own, whose failure (a full disk) printed a traceback on the run's
    terminal and then failed the run at the next step. A write that fails stops this sink, said once, with what it
    wrote kept whole (metrics.jsonl and eval.jsonl keep every record)."""

    def __init__(self, log_dir: Path) -> None:
        # the `tensorboard` package (logging.tensorboard's check): imported only by runs that log to it
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.event, self.summary = Event, Summary
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.file: BinaryIO | None = self.path.open("ab")
        self.records = RecordWriter(self.file)
        self.written = 0  # bytes of whole records in the file
        self._write(self.event(wall_time=time.time(), file_version="brain.Event:2"))

    def log(self, kind: Kind, record: dict, step: int) -> None:
        values = [self.summary.Value(tag=tag, simple_value=value) for tag, value in scalars(kind, record).items()]
        self._write(self.event(wall_time=time.time(), step=step, summary=self.summary(value=values)))

    def _write(self, event: Any) -> None:
        """One record, flushed: a user watching the run sees each step as it lands."""
        if self.file is None:
            return
        try:
            self.records.write(event.SerializeToString())
            self.file.flush()
            self.written = self.file.tell()
        except OSError as exc:
            self.close()
            with contextlib.suppress(OSError):
                os.truncate(self.path, self.written)  # a record cut short goes
            say(f"warning: TensorBoard events are no longer written to {self.path.parent} ({exc}); metrics.jsonl "
                f"and eval.jsonl keep every record")

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError):  # a buffer the disk cannot take: what is on disk is whole
                file.close()


class WandbSink:
    """A Weights & Biases run in `run_dir/wandb`; offline mode needs no account or network
    (`wandb sync run_dir/wandb/offline-run-*` uploads it later)."""

    def __init__(self, run_dir: Path, project: str, mode: Literal["offline", "online"], config: dict) -> None:
        import wandb

        # x_disable_meta: wandb would record the command line (sys.argv), where api.token=... or a reward URL's
        # password may stand; the run's config goes in redacted (`config`), the command line not at all.
        settings = wandb.Settings(silent=True, console="off", x_disable_meta=True)
        wandb.setup(settings=settings)  # its login, inside init, reads the process's settings: no terminal line
        try:
            self.run: Any = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_dir.name,
                                       config=config, settings=settings)
        except wandb.errors.Error as exc:  # no API key, no network, a refused key: before any worker starts
            raise ConfigError(f"config error: logging.wandb: W&B could not start its {mode} run: {first_line(exc)}; "
                              "log in with `wandb login` (or set WANDB_API_KEY) and check that this machine reaches "
                              "W&B, or set logging.wandb_mode=offline (`wandb sync` uploads it later)") from None
        # Each kind on its own x axis: an evaluation that ran beside training lands after later steps (the initial
        # one after step 1), and W&B drops a record logged with `step=` below its current step.
        for kind, axis in AXES.items():
            self.run.define_metric(axis)
            self.run.define_metric(f"{kind}/*", step_metric=axis)

    def log(self, kind: Kind, record: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(scalars(kind, record) | {AXES[kind]: float(step)})
        except Exception as exc:  # W&B's service process gone (killed, crashed): the training goes on without it
            self._stop(exc)

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
            self.run = None
        except Exception as exc:
            self._stop(exc)

    def _stop(self, exc: Exception) -> None:
        """W&B's service process died (found by hand: killed mid-run, the next `log` raised ConnectionResetError
        and failed the run, no checkpoint, and W&B's exit hook printed a traceback): said once, the sink stops,
        and W&B's own teardown (its exit hook with it) is done here."""
        import wandb

        self.run = None
        with contextlib.suppress(Exception):  # the service it would tell is the one gone
            wandb.teardown()
        say(f"warning: W&B stopped taking records ({first_line(exc)}); the run goes on, metrics.jsonl and eval.jsonl "
            "keep every record")


def make_sinks(cfg: RunConfig, run_dir: Path) -> list[MetricSink]:
    sinks: list[MetricSink] = []
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.logging.wandb:
        sinks.append(WandbSink(run_dir, cfg.logging.wandb_project, cfg.logging.wandb_mode, redacted(cfg)))
    return sinks
