"""Controller: runs the asynchronous training loop over the run's roles.

The loop is event driven (`ray.wait` on whatever is in flight). Two rules keep it correct:
- the generation gate: a chunk of prompts is issued only if the step that will train on it is
  at most `max_staleness` versions ahead of the weights the generator will sample with;
- the queue's take rule: at train time, groups older than `max_staleness` are dropped.
With max_staleness=0 the gate alone makes the run fully synchronous (generate, train, sync).

What happens around the loop is each a role of its own: `builder.ComponentBuilder` starts the workers,
`generators.GeneratorPool` feeds and recovers the generators, `rewards.RewardBook` scores,
`learner_steps.LearnerSteps` hands batches to the learner and publishes its weights, `watchdogs`
stops a run that cannot go on, `eval_schedule.EvalSchedule` evaluates and `failover.LearnerFailover`
replaces a dead learner. Readers (status, metrics, summary, the HTTP API) get `view`, a `RunView`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

import ray

from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.cluster.core_claims import CoreClaims, plan_beside_others
from async_rlhf.cluster.local_ray import local_raylet_pid, shutdown_local_ray
from async_rlhf.cluster.placement import check_started_cluster, use_gpus
from async_rlhf.cluster.reaper import Reaper
from async_rlhf.cluster.resources import bf16_note
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, note_ray_logs
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.run_lock import RunDirLock
from async_rlhf.outputs.sinks import make_sinks
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.builder import ComponentBuilder, make_broker
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.eval_schedule import EvalSchedule
from async_rlhf.pipeline.failover import LearnerFailover
from async_rlhf.pipeline.final_save import FinalSave
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.learner_calls import LearnerHung
from async_rlhf.pipeline.learner_steps import LearnerSteps
from async_rlhf.pipeline.queue import GateInputs, RolloutQueue
from async_rlhf.pipeline.resume import (
    ControllerSnapshot,
    check_same_inputs,
    fail_pending_checkpoints,
    mark_weights_location,
    restore,
    restore_checkpoint,
    starting_point,
    take_checkpoints,
)
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.signals import StopSignals
from async_rlhf.pipeline.startup import StartupClock, check_reward_server
from async_rlhf.pipeline.state import Components, LoopState, RunPhase, RunStats
from async_rlhf.pipeline.summary import run_summary
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.view import RunView
from async_rlhf.pipeline.watchdogs import Watchdogs
from async_rlhf.policies.embedded import ensure_policy
from async_rlhf.tasks.builtin import load_task
from reward_models.columns import check_reward_columns, reward_columns

__all__ = ["Controller", "RunError", "Service", "ServiceStarter"]

Progress = Callable[[dict], None]
WAIT_TIMEOUT_S = 0.2  # how often the loop looks at control commands when nothing completes


def first_ready(refs: list, timeout_s: float) -> Any | None:
    """The earliest-sent of `refs` that is done, waiting up to `timeout_s` for one; None if none is.

    `ray.wait` returns an arbitrary one when several are done (its ready set is a hash set), so a chunk could
    be handled before the one its generator made just before it: the newer chunk would train first and the
    older one go stale (CI dropped a batch at max_staleness=1 with one generator). `refs` are in send order
    within each generator; across generators the queue's oldest-version-first take keeps the order that matters.
    """
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
    if not ready:
        return None
    done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) | set(ready)
    return next(ref for ref in refs if ref in done)


class Service(Protocol):
    """Something served beside the run (the HTTP API), stopped when the run ends."""

    def stop(self) -> None: ...

    def write_files(self) -> None: ...  # its files in the run directory, again if that was made again


# Starts the services of a run from its view and control queue (the CLI passes the HTTP API's: api.app.serve_api).
ServiceStarter = Callable[[RunConfig, Path, RunView, RunControl], Service]


class Controller:
    def __init__(self, cfg: RunConfig, run_dir: Path, progress: Progress | None = None,
                 resume: Checkpoint | None = None, services: ServiceStarter | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume_from = resume  # checked by resume.find_resume_point (config, validity) before this
        self.checkpoints = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.progress = progress or (lambda record: None)
        self.start_services = services
        self.service: Service | None = None
        self.started_ray = False  # True when this run started Ray: then it shuts Ray down at the end
        self.reaper: Reaper | None = None  # cleans up after this process if it is killed (cluster/reaper.py)
        self.recorder = RunRecorder(run_dir)
        self.lock = RunDirLock(run_dir)
        self.queue = RolloutQueue(cfg.queue_capacity, cfg.queue.max_staleness)
        self.target_capacity = self.queue.capacity
        self.timing = Timing()
        self.timeline = Timeline(run_dir / "timeline.jsonl", self.recorder.disk, self.recorder.keeper)
        self.startup = StartupClock.since_process_start()
        self.state = LoopState(first_version=resume.step if resume else 0)
        self.stats = RunStats()
        self.control = RunControl()
        self.signals = StopSignals(run_dir, self.stats, self.control)
        self.parts = Components()
        weights_root = cfg.weight_sync.shm_root / f"async-rlhf-{run_dir.name}-{id(self):x}"
        self.broker = make_broker(cfg, weights_root, self.state.first_version)
        self.core_claims = CoreClaims(cfg.weight_sync.shm_root, weights_root)  # the cores it pins, for other runs
        self.builder = ComponentBuilder(cfg, run_dir, self.parts, self.broker, weights_root, self.stats)
        self.rewards = RewardBook(cfg, self.parts, self.state, self.stats, self.queue, self.timeline)
        self.pool = GeneratorPool(cfg, self.parts, self.state, self.stats, self.broker, self.rewards, self.timing,
                                  self.timeline)
        self.evals = EvalSchedule(cfg, self.parts, self.pool, self.rewards, self.broker, self.timing, self.recorder,
                                  self.timeline)
        self.failover = LearnerFailover(cfg, self.checkpoints, self.parts, self.state, self.stats, self.broker,
                                        self.pool, self.rewards, self.evals, self.builder, self.restore)
        self.watchdogs = Watchdogs(cfg, self.state, self.control, self.pool, self.queue, self.take_checkpoints,
                                   self.rewards.source, self.failover.kill_hung, self.evals.check_hangs,
                                   lambda: self.state.learner_job is None and self.evals.sampling())
        self.view = RunView(cfg, run_dir, self.state, self.stats, self.queue, self.timing, self.recorder, self.control,
                            self.pool, self.parts, self.startup)
        self.steps = LearnerSteps(cfg, self.parts, self.state, self.stats, self.queue, self.broker, self.timing,
                                  self.timeline, self.recorder, self.view)

    # ---- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        self.stats.phase = RunPhase.STARTING
        self.lock.acquire()  # before any file of the run is written
        self.startup.lap("process")
        self.recorder.save_config(self.cfg)
        self._start_services()
        self._keep_run_dir()
        with self.timing.span("setup_s"):
            policy_dir = ensure_policy(self.cfg, log=lambda msg: print(f"[async-rlhf] {msg}", flush=True))
            served = check_reward_server(self.cfg, log=lambda msg: print(f"[async-rlhf] {msg}", flush=True))
            self.parts.task = load_task(self.cfg, policy_dir, reward_columns(self.cfg, served))  # no worker yet
            print(f"[async-rlhf] {self.parts.task.describe()}", flush=True)
            if self.resume_from is not None:
                check_same_inputs(self.resume_from, self.cfg, self.parts.task)
            check_reward_columns(self.cfg, self.parts.task, served)
            self.recorder.add_sinks(make_sinks(self.cfg, self.run_dir))
            self.startup.lap("policy")
            self._start_ray()
            self.reaper = Reaper([self.builder.weights_root], local_raylet_pid() if self.started_ray else None)
            self.signals.install()
            check_started_cluster(self.cfg)  # transport vs the cluster's GPUs and nodes, before any worker
            gpus = use_gpus()
            self.parts.plan = plan_beside_others(self.cfg, self.core_claims, self.run_dir, gpus,
                                                 say=lambda msg: print(f"[async-rlhf] {msg}", flush=True))
            if note := bf16_note(self.cfg, gpus):
                print(f"[async-rlhf] {note}", flush=True)
            self.startup.lap("ray")
            print("[async-rlhf] starting the learner, generators and reward service", flush=True)
            self._build_components(str(policy_dir))
            self.startup.lap("actors")
            if (resumed := self.resume_from) is not None:
                self.builder.with_learner(lambda: restore_checkpoint(self, resumed))

    def _start_services(self) -> None:
        if self.cfg.api.enabled and self.start_services is not None:
            self.service = self.start_services(self.cfg, self.run_dir, self.view, self.control)

    def _keep_run_dir(self) -> None:
        """A run directory removed mid-run is made again with this process's files (outputs/run_dir_keeper.py)."""
        keeper = self.recorder.keeper
        keeper.settle()
        keeper.remakes += [self.lock.reacquire, lambda: mark_weights_location(self.run_dir, self.builder.weights_root)]
        if self.service is not None:
            keeper.remakes.append(self.service.write_files)

    def _start_ray(self) -> None:
        self.started_ray = self.builder.start_ray() or self.started_ray

    def _build_components(self, policy_dir: str) -> None:
        self.parts.policy_dir = policy_dir
        self.builder.build(self.startup, self.pool, self.rewards, self.state.first_version)

    # ---- checkpoints (pipeline/resume.py reads and restores the run through these) ----------
    def take_checkpoints(self) -> None:
        """Serve the checkpoint requests posted so far; only while the learner is idle. The time it takes is not
        the learner's stall (its waits have bounds of their own): a drain held 30 s by a reward actor that hung
        ended a synchronous run with "no learner step finished" (a chaos run by hand)."""
        started = live_clock.now()
        try:
            take_checkpoints(self)
        finally:
            self.state.last_progress += live_clock.now() - started

    def restore(self, snapshot: ControllerSnapshot) -> None:
        restore(self, snapshot)

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.start()
            if self.resume_from is None:  # the first batches first; version 0's evaluation behind them
                self.failover.start = starting_point(self)
                self._dispatch_generation()
                self.evals.start_initial()
            self.startup.lap("eval")
            self.progress = self.startup.after_first_step(self.progress)
            summary = self._train()
            self.stats.phase = RunPhase.FINISHED
            return summary
        except KeyboardInterrupt:  # a stop now: Ctrl-C, or SIGTERM during start-up (pipeline/signals.py)
            error = self.signals.error()
            self.stats.phase = RunPhase.FAILED
            raise error from None
        except ray.exceptions.RayTaskError as exc:
            self.stats.phase = RunPhase.FAILED
            if isinstance(exc.cause, RunError):  # a worker's own one-line reason, without the remote traceback
                raise exc.cause from None
            note_ray_logs(exc)
            raise
        except BaseException as exc:
            self.stats.phase = RunPhase.FAILED
            note_ray_logs(exc)  # said after Ray is down (cli/main.py)
            raise
        finally:
            fail_pending_checkpoints(self.control, self.stats.phase)
            self.shutdown()

    def _loop(self) -> None:
        with self.timing.span("loop_s"):
            self.state.start_clocks()  # start-up (actors, a resume's restore) is not the learner's stall
            while not self._done():
                try:
                    self._iterate()
                except (ray.exceptions.RayError, LearnerHung) as exc:  # re-raised unless the learner is replaced
                    self.failover.fail_over(exc)

    def _train(self) -> dict:
        """The loop, then the run's end (a last checkpoint, the final evaluation and save). A learner lost in the end
        is replaced as in the loop, the steps since its checkpoint trained again and the end made again: its death
        or hang in the final evaluation's KL pass or the final save ended the run."""
        while True:
            self._loop()
            self.stats.phase = RunPhase.STOPPING
            try:
                self.take_checkpoints()  # e.g. asked for together with the stop (SIGTERM)
                self.watchdogs.raise_if_ray_lost()
                return self._finish()
            except (ray.exceptions.RayError, LearnerHung) as exc:  # re-raised unless the learner is replaced
                self.failover.fail_over(exc)

    def _iterate(self) -> None:
        self.signals.raise_pending()
        self.stats.heartbeat = time.monotonic()
        self.watchdogs.check_stall()
        self.watchdogs.check_ray()
        self._apply_control()
        self._drop_stale()
        self._dispatch_generation()
        self._dispatch_learning()
        self._wait_and_handle()

    def _done(self) -> bool:
        if self.state.learner_job is not None:
            return False
        return self.control.stop_requested or self.state.steps_taken >= self.cfg.learner.steps

    # ---- control (commands posted by the HTTP API) ------------------------------------
    def _apply_control(self) -> None:
        self.stats.phase = RunPhase.PAUSED if self.control.paused else RunPhase.RUNNING
        new_bound = self.control.take_max_staleness()
        if new_bound is not None:
            self.queue.max_staleness = new_bound
            if self.cfg.queue.capacity is None:
                self.target_capacity = (new_bound + 1) * self.cfg.generation.prompts_per_step
        # Never below what is already in flight: a put must not fail for groups issued earlier.
        self.queue.capacity = max(self.target_capacity, self.state.outstanding)
        if self.state.learner_job is None:  # checkpoints only between learner steps
            self.take_checkpoints()

    def gate_inputs(self) -> GateInputs:
        return GateInputs(
            steps_taken=self.state.steps_taken,
            outstanding=self.state.outstanding,
            published_version=self.broker.latest_version,  # generators sample with the newest weights
            chunk=self.pool.chunk,
            prompts_per_step=self.cfg.generation.prompts_per_step,
            max_staleness=self.queue.max_staleness,
            total_steps=self.cfg.learner.steps,
            capacity=self.queue.capacity,
            staleness_mode=self.cfg.queue.staleness_mode,
            first_version=self.state.first_version,
        )

    def _dispatch_generation(self) -> None:
        """Training batches first; an evaluation's chunk only where they left generator 0 idle."""
        if not (self.control.paused or self.control.stop_requested):
            self.pool.dispatch(self.gate_inputs)
            self.evals.feed()

    def _drop_stale(self) -> None:
        """Drop queued groups that are already too old for the next batch, before the gate is asked.

        The next batch is trained at learner version == steps_taken (the in-flight step, if any,
        publishes exactly that), so a group dropped here would certainly be dropped at take. Doing
        it first frees the gate to issue fresh prompts in the same iteration.
        """
        self.state.outstanding -= self.queue.drop_stale(self.state.steps_taken)

    def _dispatch_learning(self) -> None:
        if self.control.paused or self.control.stop_requested:
            return
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS and self.pool.recovering():
            return  # the step's push goes to every generator: it would wait on one that is not in the group
        self.steps.dispatch(self.gate_inputs)

    def _wait_and_handle(self) -> None:
        pending, probes, evals = self.pool.jobs(), self.pool.probes(), self.evals.refs()
        refs = list(pending) + list(probes) + list(self.state.reward_jobs) + list(evals)
        if self.state.learner_job is not None:
            refs.append(self.state.learner_job.save_ref)
        # A pause or a stop posted since this iteration began leaves nothing dispatched: not a stall.
        held = self.control.paused or self.control.stop_requested
        if not refs and not held and not self.pool.recovering():
            raise RuntimeError("controller has nothing in flight and cannot make progress (gate or queue bug)")
        ref = first_ready(refs, WAIT_TIMEOUT_S) if refs else None
        if ref is None:
            time.sleep(0 if refs else 0.05)
            return
        if ref in pending:
            self.pool.on_generated(pending[ref], ref)
        elif ref in probes:
            self.pool.on_probe(probes[ref], ref)
        elif ref in self.state.reward_jobs:
            self.rewards.on_scored(ref)
        elif ref in evals:
            self.evals.on_ready(evals[ref])
        else:
            self._on_learned()

    def _on_learned(self) -> None:
        job, metrics, record = self.steps.finish()
        self.progress(record)
        self.evals.after_step(job.version)  # before the checks: a stop they make checkpoints it as due (--resume)
        self.watchdogs.check_finite(metrics)  # after logging: the skipped steps stay on record
        self.watchdogs.check_rewarded(job.batch)
        self.watchdogs.check_signal(job.batch)
        every = self.cfg.checkpoint.every
        if every and job.version % every == 0:
            self.control.request_checkpoint()  # taken at the next safe point, before anything is dispatched

    # ---- the end ------------------------------------------------------------------------
    def _finish(self) -> dict:
        saving = FinalSave(self.parts.learner, self.run_dir / "final", self.cfg.checkpoint.final_wait_s, self.control,
                           self.cfg.learner.stall_timeout_s)
        saving.start()  # while generator 0 samples
        self.recorder.warm_plot()  # while this process waits for the final evaluation
        final = self.evals.final()  # after every pending one, version 0's included
        saving.wait()
        self.rewards.restarted_by_end()  # an actor killed while idle lost nothing and failed no call: its pid tells
        self.pool.count_quiet_restarts()
        summary = run_summary(self.view, self.recorder.evals[0], final)
        self.recorder.write_summary(summary)
        self.recorder.plot_at_end()
        return summary

    def shutdown(self) -> None:
        self.signals.restore()
        self.watchdogs.close()
        self.recorder.close()
        self.timeline.close()
        if self.service is not None:
            self.service.stop()
            self.service = None
        self.broker.close()
        if self.started_ray:
            shutdown_local_ray()
            self.started_ray = False
        else:  # a Ray the caller owns outlives the run: its CPUs must not stay held by this run's actors
            self.builder.kill_actors(self.pool)
        self.builder.remove_run_files()  # after the actors: the generators' scratch files are theirs until then
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
        self.core_claims.release()
        self.lock.release()
