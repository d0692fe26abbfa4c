"""RunView: the typed, read-only view of a run that the status, metrics, summary and HTTP API read.

It holds the run's live parts and answers questions about them; it never changes them and knows nothing of
the controller, so the readers (`pipeline.status`, `api`, `pipeline.summary`, checkpoints) import no loop.
Read from the API thread while the loop runs: every answer is a copy in plain builtins or a frozen record,
so a reading may be a few milliseconds inconsistent across answers but never raises.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.queue import QueueCounters, RolloutQueue
from async_rlhf.pipeline.startup import StartupClock
from async_rlhf.pipeline.state import Components, LoopState, RunPhase, RunStats
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.vineppo import MCCost


@dataclass(frozen=True)
class GeneratorReading:
    """One generator as the status reports it."""

    generator_id: int
    version: int
    busy: bool
    in_flight: int  # chunks queued on it (generation.chunks_in_flight at most)
    busy_s: float
    tokens: int
    restarts: int


class RunView:
    def __init__(self, cfg: RunConfig, run_dir: Path, state: LoopState, stats: RunStats, queue: RolloutQueue,
                 timing: Timing, recorder: RunRecorder, control: RunControl, pool: GeneratorPool, parts: Components,
                 startup: StartupClock) -> None:
        self._cfg = cfg
        self._run_dir = run_dir
        self._state = state
        self._stats = stats
        self._queue = queue
        self._timing = timing
        self._recorder = recorder
        self._control = control
        self._pool = pool
        self._parts = parts
        self._startup = startup

    # ---- the run and its configuration --------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def total_steps(self) -> int:
        return self._cfg.learner.steps

    @property
    def staleness_mode(self) -> str:
        return self._cfg.queue.staleness_mode

    @property
    def configured_max_staleness(self) -> int:
        return self._cfg.queue.max_staleness

    @property
    def samples_per_prompt(self) -> int:
        return self._cfg.generation.samples_per_prompt

    @property
    def phase(self) -> RunPhase:
        return self._stats.phase

    @property
    def paused(self) -> bool:
        return self._control.paused

    @property
    def heartbeat_age_s(self) -> float:
        return time.monotonic() - self._stats.heartbeat

    # ---- progress -----------------------------------------------------------------------
    @property
    def published_version(self) -> int:
        """The newest weights the learner published (0 before the first step)."""
        return self._pool.broker.latest_version

    @property
    def steps_taken(self) -> int:
        """Batches handed to the learner, the one it is training included."""
        return self._state.steps_taken

    @property
    def learner_busy(self) -> bool:
        return self._state.learner_job is not None

    @property
    def nonfinite_total(self) -> int:
        return self._state.nonfinite_total

    @property
    def elapsed_s(self) -> float:
        return self._timing.elapsed("loop_s")

    def seconds(self, key: str) -> float:
        """A Timing total (gen_busy_s, learn_busy_s, tokens_generated, ...)."""
        return self._timing.get(key)

    @property
    def last_step(self) -> dict:
        return dict(self._stats.last_step)

    def history(self, since: int = 0, limit: int | None = None) -> dict:
        """Step records from `since` on (at most `limit`), every evaluation, and where the next page starts."""
        steps = self._recorder.step_records(since, limit)
        logged = len(self._recorder.step_offsets)
        return {"steps": steps, "evals": list(self._recorder.evals), "next_since": since + len(steps),
                "more": since + len(steps) < logged}

    # ---- queue --------------------------------------------------------------------------
    @property
    def max_staleness(self) -> int:
        return self._queue.max_staleness

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queue_counters(self) -> QueueCounters:
        counters = self._queue.counters
        return replace(counters, staleness=Counter(counters.staleness))

    def queue_snapshot(self) -> dict:
        return self._queue.snapshot()

    # ---- workers ------------------------------------------------------------------------
    @property
    def generators(self) -> tuple[GeneratorReading, ...]:
        return tuple(GeneratorReading(s.generator_id, s.version, s.busy, len(s.chunks), s.busy_s, s.tokens,
                                      s.restarts)
                     for s in list(self._pool.slots))

    @property
    def learner_restarts(self) -> int:
        return self._stats.learner_restarts

    @property
    def checkpoint_failures(self) -> int:
        return self._stats.checkpoint_failures

    @property
    def reward_counts(self) -> dict[str, int]:
        return dict(self._stats.reward_counts)

    @property
    def reward_restarts(self) -> int:
        return self._stats.reward_restarts

    @property
    def cores_pinned(self) -> bool:
        return bool(self._parts.plan and self._parts.plan.pinned)

    # ---- what the summary adds ------------------------------------------------------------
    @property
    def has_mc_values(self) -> bool:
        return self._parts.mc_request is not None

    @property
    def mc_cost(self) -> MCCost:
        return replace(self._stats.mc_cost)

    def mc_record(self) -> dict:
        """VinePPO's MC cost so far (cumulative), or nothing for losses without MC values."""
        return self._stats.mc_cost.record(self._timing.get("gen_busy_s")) if self.has_mc_values else {}

    def gap_summary(self) -> dict:
        return self._stats.gap_tally.summary()

    def startup_summary(self) -> dict:
        return self._startup.summary()

    def data_stats(self) -> list[dict]:
        """Rows read and skipped per table (task.name=dataset); none for the built-in tasks."""
        return [asdict(s) for s in getattr(self._parts.task, "stats", [])]
