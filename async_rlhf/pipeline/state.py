"""The run's mutable state, shared by the loop and its roles, and read through `view.RunView`.

Plain data only: nothing here imports the controller or a role, so checkpoints (`pipeline.resume`), the
read-only view and every role can use these types without a cycle.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING, Any

from async_rlhf.cluster.resources import CorePlan
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.vineppo import MCCost
from async_rlhf.rollout import Prompt, RolloutGroup
from learners.advantages.monte_carlo import MCRequest

if TYPE_CHECKING:  # transformers' import only where a task is built
    from async_rlhf.tasks.builtin import Task


class RunPhase(str, Enum):
    """Where a run is; the values are what /status and the control endpoints report."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (RunPhase.FINISHED, RunPhase.FAILED)


@dataclass
class Chunk:
    """One `generate` call queued on a generator, held until its result (or the actor's death) is handled."""

    ref: Any  # ObjectRef of the generation
    prompts: list[Prompt]  # re-issued, unchanged, if the actor dies
    leased_version: int | None  # released exactly once, when the chunk is handled (None: starting weights only)
    sent_to: int = 0  # its generator's restarts when it was sent: which of its processes holds the call
    sent_at: float = field(default_factory=live_clock.now)


@dataclass
class GeneratorSlot:
    """The loop's view of one generator actor."""

    handle: Any
    generator_id: int
    # In flight, oldest first: Ray runs an actor's calls in order, so the next is queued before the previous
    # returns and the engine never waits for the controller (generation.chunks_in_flight of them at most).
    chunks: list[Chunk] = field(default_factory=list)
    restarts: int = 0  # counted when the actor answers again from a new process
    pid: int = 0
    probe: Any = None  # ObjectRef of an info() call while recovering from a death
    probe_at: float = 0.0  # live_clock time the probe was sent
    probe_pid: int = 0  # the process Ray had the generator alive in when the probe was sent (0: none)
    recovering: bool = False
    died_running: str | None = None  # the reward its last dead process was running (reward_models/scoring_marks.py)
    not_before: float = 0.0  # next probe no earlier than this (live_clock)
    version: int = 0  # weights version of its last finished batch
    busy_s: float = 0.0
    tokens: int = 0
    batches_sent: int = 0  # training batches sent to it (an evaluation waiting for it counts them)
    # live_clock time of its last answer, or of its first call after it was idle (pipeline/generator_hangs.py)
    answered_at: float = field(default_factory=live_clock.now)

    @property
    def busy(self) -> bool:
        return bool(self.chunks)


@dataclass
class LearnerJob:
    train_ref: Any
    save_ref: Any
    batch: list[RolloutGroup]
    version: int  # the version this step will publish
    dispatched_at: float  # live_clock


@dataclass
class LoopState:
    """What a learner failover rolls back (in place, so every holder keeps seeing the live state)."""

    steps_taken: int = 0  # batches handed to the learner
    outstanding: int = 0  # groups issued to generators, not yet taken or dropped
    next_prompt: int = 0  # index into the task's train stream (resumable)
    first_version: int = 0  # the oldest weights fixed delay can sample with (the resumed step)
    learner_job: LearnerJob | None = None
    learner_idle_since: float = 0.0
    reward_jobs: dict = field(default_factory=dict)  # ObjectRef -> GenerationResult
    reissue: deque = field(default_factory=deque)  # (prompt chunk, weights version) of generators that died
    last_progress: float = field(default_factory=live_clock.now)  # last learner step (or start)
    nonfinite_run: int = 0  # consecutive learner steps skipped for a non-finite loss
    nonfinite_total: int = 0
    unrewarded_run: int = 0  # consecutive learner steps whose batch had no usable train reward
    tied_run: int = 0  # consecutive learner steps whose every group scored alike (watchdogs.py)
    reward_signal_seen: bool = False  # a step whose completions' rewards differed, in this run

    def start_clocks(self) -> None:
        """The learner's idle time and its stall clock (watchdogs.py) count from now."""
        self.learner_idle_since = time.perf_counter()
        self.last_progress = live_clock.now()

    def reset(self, first_version: int, learner_idle_since: float) -> None:
        fresh = LoopState(first_version=first_version, learner_idle_since=learner_idle_since)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class GapTally:
    """Each step's logprob_gap / logprob_gap_fresh (learner vs behaviour log-probs), for summary.json.
    NaN steps (nothing trained, or no staleness-0 sample) are left out; counted since this process started."""

    gaps: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)

    def add(self, metrics: dict) -> None:
        for values, key in ((self.gaps, "logprob_gap"), (self.fresh, "logprob_gap_fresh")):
            if not math.isnan(metrics.get(key, math.nan)):
                values.append(metrics[key])

    def summary(self) -> dict:
        return {"logprob_gap_mean": sum(self.gaps) / len(self.gaps) if self.gaps else None,
                "logprob_gap_fresh_max": max(self.fresh, default=None)}


@dataclass
class RunStats:
    """Counters and figures the status, metrics and summary report; restarts survive a rollback."""

    phase: RunPhase = RunPhase.CREATED
    heartbeat: float = field(default_factory=time.monotonic)  # the loop's last iteration
    last_step: dict = field(default_factory=dict)  # the newest metrics.jsonl record
    gap_tally: GapTally = field(default_factory=GapTally)
    mc_cost: MCCost = field(default_factory=MCCost)
    reward_counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "timed_out": 0})
    reward_restarts: int = 0
    learner_restarts: int = 0  # dead learners replaced from a checkpoint in this process (failover.py)
    checkpoint_failures: int = 0  # checkpoints that could not be written (a full disk); the run went on


@dataclass
class Components:
    """The run's workers and what they were built from; filled in by `builder.ComponentBuilder` at start.

    Until then the handles are None: nothing but the builder reads them before the run has started."""

    learner: Any = None  # a Learner actor or a LearnerGroup (learners/group.py)
    reward: Any = None  # the RewardService actor
    evaluator: Evaluator | None = None
    task: "Task | None" = None
    plan: CorePlan | None = None
    policy_dir: str = ""
    scratch_dir: str = ""  # the run's directory for workers' files under weight_sync.shm_root (builder.py)
    mc_request: MCRequest | None = None  # set when the loss needs MC values (vineppo)
    inputs: dict[str, str] = field(default_factory=dict)  # the given model dirs' prints as the run started with them

    def require_task(self) -> "Task":
        return _started(self.task, "the task")

    def require_plan(self) -> CorePlan:
        return _started(self.plan, "the core plan")

    def require_evaluator(self) -> Evaluator:
        return _started(self.evaluator, "the evaluator")


def _started(part: Any, what: str) -> Any:
    """A part the builder sets at start; reading it earlier is a bug in the loop, never a user error."""
    if part is None:
        raise RuntimeError(f"{what} is read before the run has started")
    return part
