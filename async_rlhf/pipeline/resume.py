"""Exact resume: what the controller keeps in a checkpoint, and the checks `train --resume` makes.

The learner's part (engines, frozen modules, its RNG and version) is `Learner.save_state`; this
module holds the controller's part: the prompt-stream position, the queued rollout groups with
their policy versions, the prompt chunks still to be re-issued, every counter, the driver's RNG
states and how many metrics/eval lines belonged to the run at that point.

Policy for rollouts (docs/reliability.md): a checkpoint is taken only while the learner is idle and
after the generations in flight have finished and been scored (they land in the queue), so the queue
is saved whole with the versions that sampled it and nothing is regenerated with other weights.
Prompts of a generator that died and had not been re-issued yet are saved and re-issued on resume;
per-prompt sampling seeds make that regeneration deterministic.
"""
from __future__ import annotations

import copy
import json
import pickle
import random
import shutil
import sys
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from async_rlhf.checkpoint.input_prints import changed_inputs, input_prints, model_dirs
from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.config.base import ConfigError
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.failures import room_on_disk, what_died
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.eval_schedule import EvalSchedule
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.learner_calls import LearnerHung, learner_answer
from async_rlhf.pipeline.queue import QueueCounters, RolloutQueue
from async_rlhf.pipeline.state import Components, LoopState, RunPhase, RunStats
from async_rlhf.pipeline.status import status_of
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.view import RunView
from async_rlhf.pipeline.vineppo import MCCost
from async_rlhf.rollout import Prompt, RolloutGroup
from async_rlhf.tasks.builtin import Task
from async_rlhf.tasks.dataset import DataPrint
from async_rlhf.weights.broker import WeightSyncBroker

STATE_FILE = "controller_state.pkl"
WEIGHTS_MARKER = "weights_location"  # run_dir file: where the run's broker keeps published weights
LEARNER_DIR = "learner"
REFUSED = "config error: --resume: "  # every refusal of a resume starts so
# Keys a resumed run may change: none of them alters what is trained or in which order.
MAY_CHANGE = ("run_dir", "learner.steps", "learner.stall_timeout_s", "learner.max_nonfinite_steps",
              "learner.max_restarts", "checkpoint.",
              "eval.", "api.", "resources.", "ray.", "weight_sync.", "model.cache_dir", "reward.timeout_s",
              "reward.remote.timeout_s", "reward.remote.retries", "reward.remote.backoff_s",
              "reward.remote.deadline_s", "reward.remote.url", "reward.learned.batch_size", "reward.learned.threads",
              "generation.max_restarts", "generation.kv_cache_gib", "generation.gpu_memory_utilization",
              "generation.eval_temperature", "task.eval_prompts", "logging.")


class Resumable(Protocol):
    """The parts of a run that a checkpoint saves and restores (the controller has them)."""

    cfg: RunConfig
    state: LoopState
    stats: RunStats
    queue: RolloutQueue
    timing: Timing
    recorder: RunRecorder
    control: RunControl
    pool: GeneratorPool
    evals: EvalSchedule
    parts: Components
    broker: WeightSyncBroker
    checkpoints: CheckpointStore
    view: RunView


@dataclass
class ControllerSnapshot:
    step: int  # learner version == steps taken (checkpoints are taken between steps)
    next_prompt: int
    queued: list[RolloutGroup]
    reissue: list[list[Prompt]]
    queue_counters: QueueCounters
    max_staleness: int  # the bound in force (it may have been changed over HTTP)
    reward_counts: dict[str, int]
    nonfinite_total: int
    nonfinite_run: int  # consecutive, towards learner.max_nonfinite_steps
    restarts: list[int]
    timing: dict[str, float]
    metrics_lines: int
    eval_lines: int
    rng: dict[str, Any]
    mc_cost: MCCost = field(default_factory=MCCost)  # VinePPO's running MC totals (zeros for other losses)
    unrewarded_run: int = 0  # consecutive steps without a usable train reward, towards reward.max_failed_steps
    evals_due: list[int] = field(default_factory=list)  # evaluations pending at the checkpoint: made on restore
    reward_signal_seen: bool = False  # see LoopState
    data: DataPrint | None = None  # a dataset task's prompts (Task.data_print), which a resume must find unchanged
    inputs: dict[str, str] = field(default_factory=dict)  # prints of the model directories given (input_prints.py)


def capture(c: Resumable) -> ControllerSnapshot:
    st = c.state
    return ControllerSnapshot(
        step=st.steps_taken, next_prompt=st.next_prompt, queued=c.queue.items(),
        reissue=[list(chunk) for chunk, _ in st.reissue],  # not the versions: only the restored one comes back
        queue_counters=c.queue.counters, max_staleness=c.queue.max_staleness,
        reward_counts=dict(c.stats.reward_counts), nonfinite_total=st.nonfinite_total, nonfinite_run=st.nonfinite_run,
        restarts=[g.restarts for g in c.pool.slots], timing=c.timing.snapshot(),
        metrics_lines=len(c.recorder.steps), eval_lines=len(c.recorder.evals),
        rng={"python": random.getstate(), "numpy": np.random.get_state()},
        mc_cost=replace(c.stats.mc_cost), unrewarded_run=st.unrewarded_run, evals_due=c.evals.due(),
        reward_signal_seen=st.reward_signal_seen, data=c.parts.require_task().data_print(),
        inputs=dict(c.parts.inputs),
    )


def starting_point(c: Resumable) -> ControllerSnapshot:
    """A fresh run at step 0, before its first batch: a learner that dies before the first checkpoint is replaced
    from here (failover.py). Version 0's evaluation, about to start, is made again then. A copy, as a checkpoint's
    pickle is: the counters it holds go on counting in the loop."""
    return copy.deepcopy(replace(capture(c), evals_due=[0]))


def save_snapshot(snapshot: ControllerSnapshot, directory: Path) -> None:
    with (directory / STATE_FILE).open("wb") as fh:
        pickle.dump(snapshot, fh)


def load_snapshot(directory: Path) -> ControllerSnapshot:
    with (directory / STATE_FILE).open("rb") as fh:
        return pickle.load(fh)  # our own file, verified against the manifest's checksum first


def check_same_inputs(ckpt: Checkpoint, cfg: RunConfig, task: Task) -> None:
    """What the config points to must be what the run trained with; refused before any worker starts."""
    snap = load_snapshot(ckpt.path)
    if changed := changed_inputs(getattr(snap, "inputs", {}), input_prints(cfg)):  # older checkpoints: none
        named = ", ".join(f"{key} ('{model_dirs(cfg)[key]}')" for key in changed)
        raise ConfigError(f"{REFUSED}the contents of {named} changed since the run's step {ckpt.step} "
                          "(a resume loads its reference model, or reward model, from there again); an exact resume "
                          "needs the same model: put it back, or start a new run")
    check_same_data(ckpt.step, getattr(snap, "data", None), task)


def check_same_data(step: int, then: DataPrint | None, task: Task) -> None:
    """A dataset whose files (or tokenizer) changed since the checkpoint would resume the prompt stream by index
    over other rows: prompts trained twice or never, without a word."""
    now = task.data_print()
    if then is None or now is None or then == now:
        return
    counts = (f"as many prompts ({now.train} train, {now.eval} eval) but other tokens or data"
              if (then.train, then.eval) == (now.train, now.eval) else
              f"{now.train} train and {now.eval} eval prompts, not {then.train} and {then.eval}")
    raise ConfigError(f"{REFUSED}task.dataset's prompts changed since the run's step {step} ({counts}): its "
                      "files, the tokenizer or the columns the reward functions take are not what the run trained "
                      "on; an exact resume needs the same prompts: put them back, or start a new run")


def restore(c: Resumable, snap: ControllerSnapshot) -> None:
    """Put the run back where the checkpoint left it (the learner is restored separately).

    Restart counts are not rolled back: they count processes that died, which a rollback does not undo."""
    st = c.state
    st.steps_taken, st.next_prompt = snap.step, snap.next_prompt
    st.nonfinite_total, st.nonfinite_run = snap.nonfinite_total, snap.nonfinite_run
    st.unrewarded_run, st.reward_signal_seen = snap.unrewarded_run, snap.reward_signal_seen
    c.queue.restore(snap.queued, snap.queue_counters)
    # Only the restored version is published after a resume: a re-issued chunk is sampled with it.
    st.reissue.extend((chunk, snap.step) for chunk in snap.reissue)
    st.outstanding = len(snap.queued) + sum(len(chunk) for chunk in snap.reissue)
    c.stats.reward_counts.update(snap.reward_counts)
    c.timing.roll_back(snap.timing)
    if snap.max_staleness != c.queue.max_staleness:
        c.control.request_max_staleness(snap.max_staleness)
    c.recorder.truncate(snap.metrics_lines, snap.eval_lines)
    random.setstate(snap.rng["python"])
    np.random.set_state(snap.rng["numpy"])
    c.stats.mc_cost = replace(snap.mc_cost)
    for version in getattr(snap, "evals_due", []):  # the checkpoint's version, published again (older pickles: none)
        c.evals.start(version)


def restore_checkpoint(c: Resumable, ckpt: Checkpoint) -> None:
    """Continue from `ckpt`: the learner's state, its weights published for the generators (which
    load them with their first batch), then the run's own state and logs."""
    timeout = c.cfg.learner.stall_timeout_s
    version = learner_answer(c.parts.learner.load_state.remote(str(ckpt.path.resolve() / LEARNER_DIR)),
                             "loading the checkpoint", timeout)
    if version > 0:
        publish_weights(c.parts.learner, c.broker, version, timeout)
    snap = load_snapshot(ckpt.path)
    restore(c, snap)
    for slot, restarts in zip(c.pool.slots, snap.restarts):  # a new process: the counts continue from the run's
        slot.restarts = restarts
    print(f"[async-rlhf] resumed from {ckpt.path} at step {version}", flush=True)


def publish_weights(learner: Any, broker: WeightSyncBroker, version: int, timeout_s: float) -> None:
    """The learner's current weights, published as `version` (the next one the broker expects)."""
    learner_answer(learner.save_weights.remote(broker.staging_location(version)), "publishing weights", timeout_s)
    broker.publish(version)


def broker_versions(cfg: RunConfig, resumed: int) -> tuple[int, int]:
    """(versions the broker keeps, the version it starts at) for a run starting at step `resumed`.

    It starts one below `resumed` because the starting weights are published (as version 0, or the restored
    version), so that a generator can go back to them: version 0's evaluation samples them beside the first
    steps, and fixed delay samples with versions down to latest - N (a re-issued chunk too), so there N + 2
    are kept (one more for the step in flight). After a resume only the restored version exists: steps up to
    resumed + N sample with it. Pushed weights (nccl, ipc) cannot go back: their version 0 is the generators'
    own start, never published.
    """
    if cfg.queue.staleness_mode == "fixed":
        return max(cfg.weight_sync.keep_versions, cfg.queue.max_staleness + 2), resumed - 1
    pushed = cfg.weight_sync.transport in PUSHED_TRANSPORTS
    return cfg.weight_sync.keep_versions, max(resumed - 1, 0) if pushed else resumed - 1


def take_checkpoints(c: Resumable) -> None:
    """Serve the checkpoint requests posted so far, all with one checkpoint; only while the learner is idle."""
    waiting = live(c.control.take_checkpoint_requests())
    if not waiting:
        return
    version = c.broker.latest_version
    # Not the try below: these handle the run's own events (a generator's or an evaluation's error, a learner hung in
    # an evaluation's KL pass), which must end or fail over the run as in the loop, not pass for a checkpoint that
    # could not be written. Its requesters hear of it now (the HTTP call, else, waits out its own timeout).
    try:
        c.evals.drain(before=version)  # older weights are gone after a resume: their evaluations are logged first
        c.pool.drain()  # generations in flight land in the queue first
    except Exception as exc:
        for future in waiting:
            future.set_exception(exc)
        raise
    try:
        with c.timing.span("checkpoint_s"):  # what checkpoints cost the run (summary.json)
            final = c.checkpoints.write(version, lambda directory: _fill_checkpoint(c, directory))
    except Exception as exc:  # reported to the requesters and on the terminal; the run goes on
        _checkpoint_failed(c, exc)
        for future in waiting:
            future.set_exception(exc)
        if isinstance(exc, LearnerHung):  # not the disk's fault: the loop's failover replaces the learner
            raise
        return
    for future in waiting:
        future.set_result({"path": str(final), "version": version})


def live(requests: list[Future]) -> list[Future]:
    """The requests someone still waits for, each now marked running so it can no longer be cancelled: an HTTP
    request that timed out cancelled its future, and answering a cancelled one raises (InvalidStateError)."""
    return [future for future in requests if future.set_running_or_notify_cancel()]


def _checkpoint_failed(c: Resumable, exc: Exception) -> None:
    c.stats.checkpoint_failures += 1
    newest = c.checkpoints.checkpoints()
    why = what_died(exc)
    if not isinstance(exc, LearnerHung):
        why += f"; {room_on_disk(c.checkpoints.root.parent)}"
    _warn(f"checkpoint at step {c.broker.latest_version} not written ({why}); the run goes on, newest checkpoint: "
          f"{newest[-1].path.name if newest else 'none'}")


def _fill_checkpoint(c: Resumable, directory: Path) -> None:
    learner, timeout = c.parts.learner, c.cfg.learner.stall_timeout_s
    # final/'s layout, loadable by transformers and vLLM
    learner_answer(learner.save_pretrained.remote(str(directory)), "saving a checkpoint", timeout)
    learner_answer(learner.save_state.remote(str(directory / LEARNER_DIR)), "saving a checkpoint", timeout)
    c.recorder.sync()  # the lines the snapshot counts are on disk before the checkpoint is sealed
    save_snapshot(capture(c), directory)
    (directory / "trainer_state.json").write_text(json.dumps(status_of(c.view).model_dump(), indent=2))


def fail_pending_checkpoints(control: RunControl, phase: RunPhase) -> None:
    for future in live(control.take_checkpoint_requests()):
        future.set_exception(RuntimeError(f"run ended ({phase.value}) before the checkpoint was taken"))


def claim_weights_location(run_dir: Path, location: Path) -> None:
    """Record where this run's published weights live, first removing those of an earlier process of
    the same run (killed, so it could not clean up; a run directory serves one process at a time)."""
    marker = run_dir / WEIGHTS_MARKER
    if marker.is_file():
        old = Path(marker.read_text().strip())
        if old.name.startswith("async-rlhf-"):  # never anything the broker did not create
            shutil.rmtree(old, ignore_errors=True)
    mark_weights_location(run_dir, location)


def mark_weights_location(run_dir: Path, location: Path) -> None:
    (run_dir / WEIGHTS_MARKER).write_text(str(location))


# ---- checks made by the CLI before anything starts ------------------------------------------

SECTION = object()  # stands for "this section is set" in a flattened config (e.g. reward.remote)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {prefix.rstrip("."): SECTION} if prefix else {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _lookup(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_difference(old: RunConfig, new: RunConfig) -> str | None:
    """The first key that differs and would break an exact resume, as a sentence; None if none does."""
    dumps = old.model_dump(mode="json"), new.model_dump(mode="json")
    a, b = _flat(dumps[0]), _flat(dumps[1])
    for key in sorted(set(a) | set(b)):
        may_change = any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)
        if a.get(key) != b.get(key) and not may_change:
            now, then = json.dumps(_lookup(dumps[1], key)), json.dumps(_lookup(dumps[0], key))
            return f"{key} is {now} but the run used {then}"
    return None


def _warn(message: str) -> None:
    print(f"[async-rlhf] warning: {message}", file=sys.stderr, flush=True)


def _steps_done(summary: Path) -> int:
    """The steps a finished run trained, from its summary.json; 0 without one, and 0 with one that cannot be read
    (said; its newest checkpoint then decides what is left)."""
    if not summary.is_file():
        return 0
    try:
        return int(json.loads(summary.read_text())["steps"])
    except (ValueError, KeyError, TypeError) as exc:
        _warn(f"{summary} cannot be read ({type(exc).__name__}: {exc}); going by the newest checkpoint")
        return 0


def saved_config(run_dir: Path) -> Path:
    """The config.yaml of the run in `run_dir` (its config as resolved at its start), or a ConfigError."""
    if not run_dir.is_dir():
        raise ConfigError(f"{REFUSED}run directory '{run_dir}' not found; pass the directory of an earlier run")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{REFUSED}'{run_dir}' holds no run (no config.yaml); pass the directory of an earlier "
                          "run")
    return run_dir / "config.yaml"


def find_resume_point(cfg: RunConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint `train --resume run_dir` continues from, or a ConfigError saying why there is none."""
    diff = config_difference(load_config(saved_config(run_dir)), cfg)
    if diff:
        raise ConfigError(f"{REFUSED}{diff}; a resumed run must keep it (start a new run to change it)")
    done = _steps_done(run_dir / "summary.json")
    if done >= cfg.learner.steps:
        raise ConfigError(f"{REFUSED}run '{run_dir}' already finished ({done} of learner.steps={cfg.learner.steps}); "
                          f"raise learner.steps to train further")
    latest = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last).latest_valid(_warn)
    if latest is None:
        raise ConfigError(f"{REFUSED}no valid checkpoint in '{run_dir / 'checkpoints'}'; start a new run "
                          f"(set checkpoint.every so that runs write them)")
    if latest.step > cfg.learner.steps:  # == is fine: a run killed after its last step only finishes
        raise ConfigError(f"{REFUSED}the newest valid checkpoint in '{run_dir / 'checkpoints'}' is at step "
                          f"{latest.step}, beyond learner.steps={cfg.learner.steps}; raise learner.steps to at least "
                          f"{latest.step}")
    return latest
