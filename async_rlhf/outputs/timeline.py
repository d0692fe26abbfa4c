"""Per-event timeline of a run: when each generation, weight load, reward call and learner step ran.

One JSON line per finished event in `<run_dir>/timeline.jsonl`: `{"kind", "worker", "start", "end",
"version"}`, times in seconds of wall clock (time.time(), shared by every process on the machine)
since the controller started. It is what shows whether generation and learning really overlapped
(bench/async_vs_sync.py draws it as a Gantt chart). Writing one short line per event costs
microseconds next to events that take tens of milliseconds, so it is always on.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Literal

from async_rlhf.outputs.line_log import DiskNotice, LineLog
from async_rlhf.outputs.run_dir_keeper import RunDirKeeper

Kind = Literal["weight_sync", "generation", "mc_rollouts", "reward", "learn", "publish", "eval"]


class Timeline:
    def __init__(self, path: Path, disk: DiskNotice | None = None, keeper: RunDirKeeper | None = None) -> None:
        self.path = path
        self.origin = time.time()
        self.disk = disk  # the run's: one warning for all its logs when the disk is full
        self.keeper = keeper  # the run's: its directory made again if it was removed
        self._log: LineLog | None = None  # made on the first event

    def add(self, kind: Kind, worker: str, start: float, end: float, version: int | None = None) -> None:
        """Record an event from wall-clock `start` to `end` (time.time() values)."""
        if end <= start:
            return  # e.g. no weight load before this batch
        if self._log is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a line per event, written at once: a crash keeps them
            self._log = LineLog(self.path, self.disk, self.keeper)
        event = {"kind": kind, "worker": worker, "start": round(start - self.origin, 4),
                 "end": round(end - self.origin, 4), "version": version}
        self._log.append(json.dumps(event))

    def close(self) -> None:
        """Lines held for want of space are written if the disk takes them now. The timeline is diagnostics and this
        runs in the run's shutdown: a disk still full (or a directory gone) loses them, never the shutdown."""
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.write_held()
        self._log = None


def read_timeline(path: Path) -> list[dict]:
    """The events of a run's timeline.jsonl, in the order they were recorded."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def busy_seconds(events: list[dict], kinds: set[str]) -> float:
    """Seconds covered by events of `kinds`, overlaps between them counted once."""
    spans = sorted((e["start"], e["end"]) for e in events if e["kind"] in kinds)
    total, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            total += (cur_end - cur_start) if cur_end is not None else 0.0
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + ((cur_end - cur_start) if cur_end is not None else 0.0)


def record_generation(timeline: Timeline, result) -> None:
    """A GenerationResult's weight load, generation and MC rollouts, timed inside the generator."""
    worker = f"generator{result.generator_id}"
    gen_start = result.started_at + result.sync_s
    timeline.add("weight_sync", worker, result.started_at, gen_start, result.policy_version)
    timeline.add("generation", worker, gen_start, gen_start + result.gen_s, result.policy_version)
    if result.mc is not None:  # sampled right after the responses, in the same call
        end = gen_start + result.gen_s
        timeline.add("mc_rollouts", worker, end, end + result.mc.gen_s, result.policy_version)


def record_learner_step(timeline: Timeline, started_at: float, step_s: float, version: int) -> None:
    """The learner step (from `started_at`, wall clock, for its own `step_s`) and the weight save + publication
    after it, ending now. Calls queued on the learner before the step (an evaluation's KL) are not in either."""
    timeline.add("learn", "learner", started_at, started_at + step_s, version)
    timeline.add("publish", "learner", started_at + step_s, time.time(), version)
