"""Controller: builds every component from the config and runs the asynchronous training loop.

The loop is event driven (`ray.wait` on whatever is in flight). Two rules keep it correct:
- the generation gate: a chunk of prompts is issued only if the step that will train on it is
  at most `max_staleness` versions ahead of the weights the generator will sample with;
- the queue's take rule: at train time, groups older than `max_staleness` are dropped.
With max_staleness=0 the gate alone makes the run fully synchronous (generate, train, sync).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import ray

from actors.generator import GenerationResult, GeneratorActor
from async_rlhf.weights.broker import SharedMemoryTransport, WeightRef, WeightSyncBroker
from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.config.run import PUSHED_TRANSPORTS, RunConfig
from async_rlhf.pipeline.control import RunControl
from async_rlhf.policies.embedded import ensure_policy
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.failover import checkpoint_to_restart_from, learner_alive, quiesce_generation, roll_back
from async_rlhf.failures import RunError
from async_rlhf.weights.nccl import NcclTransport
from async_rlhf.pipeline.placement import check_started_cluster, generator_options, use_gpus
from async_rlhf.pipeline.queue import GateInputs, RolloutQueue, chunk_version, generation_allowed, take_limit
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.config.redaction import redact_url
from async_rlhf.pipeline.resources import CoreBalancer, core_balancer, plan_cores
from async_rlhf.checkpoint.resume import (
    broker_versions, claim_weights_location, fail_pending_checkpoints, publish_weights, restore_checkpoint,
    take_checkpoints,
)
from async_rlhf.rollout import Prompt, RolloutGroup
from async_rlhf.outputs.summary import GapTally, run_summary, step_record
from async_rlhf.outputs.sinks import make_sinks
from async_rlhf.pipeline.startup import StartupClock, await_actors, ray_init_kwargs
from async_rlhf.tasks.builtin import load_task
from async_rlhf.outputs.timeline import Timeline, record_generation, record_learner_step
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.vineppo import MCCost, MCRequest, attach_advantages, step_delimiter_ids
from learners.group import LearnerGroup, start_learner
from learners.losses import LOSSES
from reward_models.service import RewardService

Progress = Callable[[dict], None]
WAIT_TIMEOUT_S = 0.2  # how often the loop looks at control commands when nothing completes


@dataclass
class GeneratorSlot:
    """The controller's view of one generator actor."""

    handle: Any
    generator_id: int
    job: Any = None  # ObjectRef of the generation in flight
    leased_version: int | None = None
    prompts: list[Prompt] = field(default_factory=list)  # in flight; re-issued if the actor dies
    restarts: int = 0  # counted when the actor answers again from a new process
    pid: int = 0
    probe: Any = None  # ObjectRef of an info() call while recovering from a death
    recovering: bool = False
    not_before: float = 0.0  # next probe no earlier than this (time.monotonic)
    version: int = 0  # weights version of its last finished batch
    busy_s: float = 0.0
    tokens: int = 0


@dataclass
class LearnerJob:
    train_ref: Any
    save_ref: Any
    batch: list[RolloutGroup]
    version: int  # the version this step will publish
    dispatched_at: float


@dataclass
class LoopState:
    steps_taken: int = 0  # batches handed to the learner
    outstanding: int = 0  # groups issued to generators, not yet taken or dropped
    next_prompt: int = 0  # index into the task's train stream (resumable)
    learner_job: LearnerJob | None = None
    learner_idle_since: float = 0.0
    reward_jobs: dict = field(default_factory=dict)  # ObjectRef -> GenerationResult
    reissue: deque = field(default_factory=deque)  # (prompt chunk, weights version) of generators that died
    last_progress: float = field(default_factory=time.monotonic)  # last learner step (or start)
    nonfinite_run: int = 0  # consecutive learner steps skipped for a non-finite loss
    nonfinite_total: int = 0
    unrewarded_run: int = 0  # consecutive learner steps whose batch had no usable train reward


class Controller:
    def __init__(self, cfg: RunConfig, run_dir: Path, progress: Progress | None = None,
                 resume: Checkpoint | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume_from = resume  # checked by resume.find_resume_point (config, validity) before this
        self.first_version = resume.step if resume else 0  # the oldest weights fixed delay can sample with
        self.checkpoints = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.progress = progress or (lambda record: None)
        self.recorder = RunRecorder(run_dir)
        self.queue = RolloutQueue(cfg.queue_capacity, cfg.queue.max_staleness)
        self.timing = Timing()
        self.timeline = Timeline(run_dir / "timeline.jsonl")
        self.reward_started: dict[Any, float] = {}  # reward call -> wall-clock dispatch time
        self.state = LoopState()
        self.control = RunControl()
        self.phase = "created"  # created, starting, running, paused, stopping, finished, failed
        self.started_ray = False
        self.api = None
        self.target_capacity = self.queue.capacity
        self.generators: list[GeneratorSlot] = []
        self.last_step: dict = {}
        self.gap_tally = GapTally()
        self.reward_counts = {"ok": 0, "failed": 0, "timed_out": 0}
        self.reward_pid = 0  # the reward actor's process; a new one is a restart
        self.reward_restarts = 0
        self.balancer: CoreBalancer | None = None  # set with the learner (a pinned CPU plan only)
        self.learner_restarts = 0  # dead learners replaced from a checkpoint in this process (async_rlhf/pipeline/failover.py)
        self.mc_request: MCRequest | None = None  # set when the loss needs MC values (vineppo)
        self.mc_cost = MCCost()
        self.heartbeat = time.monotonic()

    # ---- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        self.phase = "starting"
        self.startup = StartupClock.since_process_start()
        self.startup.lap("process")
        self.recorder.save_config(self.cfg)
        self._start_api()
        with self.timing.span("setup_s"):
            policy_dir = ensure_policy(self.cfg, log=lambda msg: print(f"[async-rlhf] {msg}", flush=True))
            self.task = load_task(self.cfg, policy_dir)  # reads and checks the prompts before any worker starts
            print(f"[async-rlhf] {self.task.describe()}", flush=True)
            self.recorder.add_sinks(make_sinks(self.cfg, self.run_dir))
            self.startup.lap("policy")
            self._start_ray()
            self._handle_sigterm()
            check_started_cluster(self.cfg)  # transport vs the cluster's GPUs and nodes, before any worker
            self.plan = plan_cores(self.cfg, gpus=use_gpus())
            self.startup.lap("ray")
            print("[async-rlhf] starting the learner, generators and reward service", flush=True)
            self._build_components(str(policy_dir))
            self.startup.lap("actors")
            if self.resume_from is not None:
                restore_checkpoint(self, self.resume_from)

    def _start_api(self) -> None:
        if not self.cfg.api.enabled:
            return
        from async_rlhf.api.app import ApiServer  # FastAPI/uvicorn only when serving

        self.api = ApiServer(self, self.cfg.api, self.run_dir)
        url = self.api.start()
        print(f"[async-rlhf] status and control at {url} (control token in {self.run_dir / 'api_token'} "
              f"unless set by api.token or $ASYNC_RLHF_API_TOKEN)", flush=True)

    def _start_ray(self) -> None:
        if ray.is_initialized():  # the caller's Ray, or the one `async-rlhf train` started while importing
            return
        ray.init(**ray_init_kwargs(self.cfg, len(self._cores())))
        self.started_ray = True

    def _handle_sigterm(self) -> None:
        """Preemption: checkpoint at the next safe point, then wind down like /control/stop.

        Installed after ray.init, which sets its own SIGTERM handler in the driver; only possible
        from the main thread (a controller run inside a thread, as in tests, keeps the default).
        """
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_: Any) -> None:
        if self.phase == "starting":  # nothing trained yet: waiting for engines and a first eval only delays the stop
            raise RunError("SIGTERM during start-up: stopped before the first step, nothing to checkpoint; "
                           "start the run again (or --resume RUN_DIR, whose checkpoints are untouched)")
        self.control.terminate()

    @staticmethod
    def _cores() -> set[int]:
        return os.sched_getaffinity(0)

    def _build_components(self, policy_dir: str) -> None:
        cfg, plan = self.cfg, self.plan
        if LOSSES[cfg.loss.name].needs_mc_values:
            self.mc_request = MCRequest(cfg.mc_values.k_mc, step_delimiter_ids(self.task.tokenizer, self.task.step_end_chars))
        resumed = self.first_version
        weights_root = cfg.weight_sync.shm_root / f"async-rlhf-{self.run_dir.name}-{id(self):x}"
        claim_weights_location(self.run_dir, weights_root)
        pushed = cfg.weight_sync.transport in PUSHED_TRANSPORTS
        transport = NcclTransport(cfg.weight_sync.transport) if pushed else SharedMemoryTransport(weights_root)
        keep, initial = broker_versions(cfg, resumed)
        self.broker = WeightSyncBroker(transport, keep, initial_version=initial)  # _restore publishes `resumed`
        started = time.time()  # every actor starts now, side by side; they are awaited once, below
        self.policy_dir = policy_dir
        self._start_learner()
        # Ray restarts a generator whose process dies; the controller re-issues its prompts.
        gen_cls = ray.remote(GeneratorActor)
        scorer = cfg.reward.train if cfg.reward.in_generator else None
        self.generators = [  # on GPUs each in its own placement bundle (async_rlhf/pipeline/placement.py)
            GeneratorSlot(gen_cls.options(**options).remote(i, policy_dir, cfg.generation, cfg.seed,
                                                            plan.generator_cores[i], cfg.model.torch_dtype,
                                                            cfg.weight_sync.transport, scorer, cfg.reward.timeout_s), i)
            for i, options in enumerate(generator_options(cfg))
        ]
        scorers = {"train": cfg.reward.train, "gold": cfg.reward.gold}
        remote = cfg.reward.remote.model_dump() if cfg.reward.remote else None
        learned = cfg.reward.learned.model_dump(mode="json") if cfg.reward.learned else None
        # Stateless: Ray restarts it when its process dies, and the controller re-issues the lost batches.
        self.reward = ray.remote(RewardService).options(num_cpus=0, max_restarts=cfg.reward.max_restarts).remote(
            scorers, cfg.reward.timeout_s, remote, learned)
        answers = await_actors(self.startup, started, {"learner": [self.learner.__ray_ready__.remote()],
                                                       "generators": [g.handle.info.remote() for g in self.generators],
                                                       "reward": [self.reward.health.remote()]})
        self.reward_pid = answers["reward"][0]["pid"]
        for slot, info in zip(self.generators, answers["generators"]):
            slot.pid = info["pid"]
        if self.fixed_delay and not resumed:  # version 0 as weights a generator can go back to
            publish_weights(self, 0)
        if pushed:  # nccl: the weight-sync group of learner rank 0 + every generator; ipc: the shared-GPU handshake
            self.connect_generators()
        self.evaluator = Evaluator(self.task.eval_prompts(), self.reward, self.cfg.generation.eval_temperature,
                                   self.cfg.eval.win_rate_judge, self.run_dir / "eval_initial.json")

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.start()
            if self.resume_from is None:  # version 0, sent first to generator 0; the first batches go out behind it
                sampled = self.evaluator.sample(self.generators[0].handle, None)
                self._dispatch_generation()
                self.recorder.log_eval(self._evaluate(None, sampled))  # no step sent yet: its KL is version 0's
            initial = self.recorder.evals[0]
            self.startup.lap("eval")
            self.progress = self.startup.after_first_step(self.progress)
            with self.timing.span("loop_s"):
                self.state.learner_idle_since = time.perf_counter()
                while not self._done():
                    try:
                        self._iterate()
                    except ray.exceptions.RayError as exc:  # re-raised unless the learner died and is replaced
                        self._fail_over_learner(exc)
            self.phase = "stopping"
            take_checkpoints(self)  # e.g. asked for together with the stop (SIGTERM)
            summary = self._finish(initial)
            self.phase = "finished"
            return summary
        except BaseException:
            self.phase = "failed"
            raise
        finally:
            fail_pending_checkpoints(self)
            self.shutdown()

    def _iterate(self) -> None:
        self.heartbeat = time.monotonic()
        self._check_stall()
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
        self.phase = "paused" if self.control.paused else "running"
        new_bound = self.control.take_max_staleness()
        if new_bound is not None:
            self.queue.max_staleness = new_bound
            if self.cfg.queue.capacity is None:
                self.target_capacity = (new_bound + 1) * self.cfg.generation.prompts_per_step
        # Never below what is already in flight: a put must not fail for groups issued earlier.
        self.queue.capacity = max(self.target_capacity, self.state.outstanding)
        if self.state.learner_job is None:  # checkpoints only between learner steps
            take_checkpoints(self)

    @property
    def chunk(self) -> int:
        return self.cfg.generation.prompts_per_step // self.cfg.generation.num_generators

    @property
    def fixed_delay(self) -> bool:
        return self.cfg.queue.staleness_mode == "fixed"

    def gate_inputs(self) -> GateInputs:
        return GateInputs(
            steps_taken=self.state.steps_taken,
            outstanding=self.state.outstanding,
            published_version=self.broker.latest_version,  # generators sample with the newest weights
            chunk=self.chunk,
            prompts_per_step=self.cfg.generation.prompts_per_step,
            max_staleness=self.queue.max_staleness,
            total_steps=self.cfg.learner.steps,
            capacity=self.queue.capacity,
            staleness_mode=self.cfg.queue.staleness_mode,
            first_version=self.first_version,
        )

    def _dispatch_generation(self) -> None:
        if self.control.paused or self.control.stop_requested:
            return
        for slot in self.generators:
            if slot.job is not None or slot.probe is not None:
                continue
            if slot.recovering:
                if time.monotonic() >= slot.not_before:
                    slot.probe = slot.handle.info.remote()
                continue
            gate = self.gate_inputs()
            if self.state.reissue:  # already counted in `outstanding`: no gate, no new prompts
                prompts, version = self.state.reissue.popleft()  # fixed delay: the version it had
                self._submit(slot, prompts, version if self.fixed_delay else gate.published_version)
            elif generation_allowed(gate):
                prompts = [self.task.train_prompt(self.state.next_prompt + i) for i in range(self.chunk)]
                self.state.next_prompt += self.chunk
                self.state.outstanding += self.chunk
                self._submit(slot, prompts, chunk_version(gate))

    def _submit(self, slot: GeneratorSlot, prompts: list[Prompt], version: int) -> None:
        """Generate with weights `version`; a restarted actor (back at version 0) reloads them."""
        weights = None
        if self.broker.latest() is not None:  # else only the starting weights exist (bound mode)
            weights = self.broker.lease(version)
            slot.leased_version = weights.version
        slot.prompts = prompts
        slot.job = slot.handle.generate.remote(prompts, weights, mc=self.mc_request, score=self.cfg.reward.in_generator)

    def _drop_stale(self) -> None:
        """Drop queued groups that are already too old for the next batch, before the gate is asked.

        The next batch is trained at learner version == steps_taken (the in-flight step, if any,
        publishes exactly that), so a group dropped here would certainly be dropped at take. Doing
        it first frees the gate to issue fresh prompts in the same iteration.
        """
        self.state.outstanding -= self.queue.drop_stale(self.state.steps_taken)

    def _dispatch_learning(self) -> None:
        st = self.state
        if st.learner_job is not None or st.steps_taken >= self.cfg.learner.steps:
            return
        if self.control.paused or self.control.stop_requested:
            return
        dropped_before = self.queue.counters.dropped_stale
        batch = self.queue.take(self.cfg.generation.prompts_per_step, st.steps_taken, take_limit(self.gate_inputs()))
        st.outstanding -= self.queue.counters.dropped_stale - dropped_before  # none after _drop_stale
        if batch is None:
            return
        st.outstanding -= len(batch)
        st.steps_taken += 1
        self.timing.add("learner_wait_s", time.perf_counter() - st.learner_idle_since)
        version = self.broker.latest_version + 1
        train_ref = self.learner.train_step.remote(batch)
        save_ref = self.learner.save_weights.remote(self.broker.staging_location(version))
        st.learner_job = LearnerJob(train_ref, save_ref, batch, version, time.perf_counter())

    def _wait_and_handle(self) -> None:
        pending = {slot.job: slot for slot in self.generators if slot.job is not None}
        probes = {slot.probe: slot for slot in self.generators if slot.probe is not None}
        refs = list(pending) + list(probes) + list(self.state.reward_jobs)
        if self.state.learner_job is not None:
            refs.append(self.state.learner_job.save_ref)
        recovering = any(slot.recovering for slot in self.generators)
        if not refs and not self.control.paused and not recovering:
            raise RuntimeError("controller has nothing in flight and cannot make progress (gate or queue bug)")
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_TIMEOUT_S) if refs else ([], [])
        if not ready:
            time.sleep(0 if refs else 0.05)
            return
        ref = ready[0]
        if ref in pending:
            self._on_generated(pending[ref], ref)
        elif ref in probes:
            self._on_probe(probes[ref], ref)
        elif ref in self.state.reward_jobs:
            self._on_scored(ref)
        else:
            self._on_learned()

    def _on_generated(self, slot: GeneratorSlot, ref: Any) -> None:
        slot.job, version = None, slot.leased_version
        if version is not None:
            self.broker.release(version)
            slot.leased_version = None
        try:
            result: GenerationResult = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._on_generator_died(slot, exc, version)
            return
        slot.version = result.policy_version
        if result.mc is not None:  # VinePPO's rollouts: the generator's time, counted apart
            self.mc_cost.add_generated(result.mc)
            slot.busy_s, slot.tokens = slot.busy_s + result.mc.gen_s, slot.tokens + result.mc.tokens
        slot.busy_s += result.gen_s + result.sync_s
        slot.tokens += result.tokens
        self.timing.add("gen_busy_s", result.gen_s)
        self.timing.add("weight_sync_s", result.sync_s)
        self.timing.add("tokens_generated", result.tokens)
        record_generation(self.timeline, result)
        if result.reward_s is None:
            self._score(result)
            return
        self.timing.add("reward_in_generator_s", result.reward_s)
        self._queue_scored(result, result.groups + (result.mc.rollouts if result.mc is not None else []))

    def _score(self, result: GenerationResult) -> None:
        """One reward call for responses and MC rollouts: both get the RewardService's failure handling."""
        rollouts = result.mc.rollouts if result.mc is not None else []
        ref = self.reward.score.remote(result.groups + rollouts)
        self.state.reward_jobs[ref] = result
        self.reward_started[ref] = time.time()

    def _on_generator_died(self, slot: GeneratorSlot, exc: Exception, version: int | None) -> None:
        """Nothing of the lost batch reaches the learner; its prompts go out again, unchanged,
        once the actor answers a probe (Ray restarts it; calls fail fast while it is down)."""
        self.state.reissue.append((slot.prompts, version))  # version: fixed delay samples it again with it
        slot.recovering, slot.not_before = True, time.monotonic() + 0.5
        print(f"[async-rlhf] generator {slot.generator_id} lost its batch ({type(exc).__name__}); waiting for "
              f"Ray to restart it; its {len(slot.prompts)} prompts will be re-issued", file=sys.stderr, flush=True)

    def _on_reward_died(self, exc: Exception) -> None:
        """Count a restart once per new process, and generate again every batch still being scored: a call
        sent around the death may never answer, and one that answers late would be too stale to train on.
        A re-issued batch's old call is forgotten, so a late answer is dropped, never queued twice. Past
        reward.max_restarts the health call raises, which ends the run."""
        if not self._reward_restarted():
            return
        print(f"[async-rlhf] the reward actor died ({type(exc).__name__}); Ray restarted it (pid {self.reward_pid}, restart "
              f"{self.reward_restarts}); the batches it was scoring are generated again", file=sys.stderr, flush=True)
        for ref in list(self.state.reward_jobs):
            self.reward_started.pop(ref, None)
            self._regenerate(self.state.reward_jobs.pop(ref))

    def _reward_restarted(self) -> bool:
        """True, and one restart counted, when the reward actor answers from a new process."""
        pid = ray.get(self.reward.health.remote(), timeout=self.cfg.learner.stall_timeout_s)["pid"]
        if pid == self.reward_pid:
            return False
        self.reward_pid, self.reward_restarts = pid, self.reward_restarts + 1
        return True

    def _count_quiet_restarts(self) -> None:
        """An actor killed while idle lost nothing and failed no call, so only its pid tells: counted at the end."""
        self._reward_restarted()
        for slot, info in zip(self.generators, ray.get([g.handle.info.remote() for g in self.generators])):
            slot.restarts += info["pid"] != slot.pid

    def _regenerate(self, result: GenerationResult) -> None:
        """The batch's prompts go out again, unchanged (still counted in `outstanding`), as for a dead
        generator: sampled anew with current weights, each prompt is still trained exactly once."""
        self.state.reissue.append(([g.prompt for g in result.groups], result.policy_version))

    def _on_probe(self, slot: GeneratorSlot, ref: Any) -> None:
        slot.probe = None
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:  # dead for good: restarts exhausted
            raise RunError(f"generator {slot.generator_id} died and Ray will not restart it again "
                           f"(generation.max_restarts={self.cfg.generation.max_restarts}): {exc}") from exc
        except ray.exceptions.RayActorError:  # still restarting
            slot.not_before = time.monotonic() + 1.0
            return
        self._note_alive(slot, info)

    def _note_alive(self, slot: GeneratorSlot, info: dict) -> None:
        if info["pid"] != slot.pid:
            slot.restarts += 1
            slot.pid = info["pid"]
            print(f"[async-rlhf] generator {slot.generator_id} is back (pid {slot.pid}, restart {slot.restarts}); "
                  f"it loads the current weights with its next batch", file=sys.stderr, flush=True)
            if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # its process lost the group: form it anew
                self.connect_generators()
        slot.recovering = False

    def connect_generators(self) -> None:
        """The learner-driven weight group (nccl, ipc) with every generator; again after a restart, when the
        learner also resends the current version (GPU only: never run here, see the README)."""
        ray.get(self.learner.connect_generators.remote([g.handle for g in self.generators],
                                                       self.cfg.generation.tensor_parallel_size))

    def _check_stall(self) -> None:
        if self.control.paused:
            self.state.last_progress = time.monotonic()
            return
        idle = time.monotonic() - self.state.last_progress
        if idle > self.cfg.learner.stall_timeout_s:
            busy = [f"generator {g.generator_id}" for g in self.generators if g.job is not None]
            raise RunError(f"no learner step finished for {idle:.0f}s (learner.stall_timeout_s="
                           f"{self.cfg.learner.stall_timeout_s:g}); in flight: {', '.join(busy) or 'nothing'}, "
                           f"queue depth {len(self.queue)}; see the Ray logs under /tmp/ray/session_latest/logs")

    def _on_scored(self, ref: Any) -> None:
        result: GenerationResult = self.state.reward_jobs.pop(ref)
        started = self.reward_started.pop(ref, time.time())
        try:
            scored = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._on_reward_died(exc)
            self._regenerate(result)
            return
        self.timeline.add("reward", "reward", started, time.time(), result.policy_version)
        self._queue_scored(result, scored)

    def _queue_scored(self, result: GenerationResult, scored: list[RolloutGroup]) -> None:
        """Scored responses (then MC rollouts) of one generation: values and advantages first for VinePPO."""
        groups = scored[:len(result.groups)]
        if result.mc is not None:  # values and advantages before the groups can be trained on
            rollouts = replace(result.mc, rollouts=scored[len(result.groups):])
            self.mc_cost.add_scored(attach_advantages(groups, rollouts))
        for group in groups:
            for completion in group.completions:
                self.reward_counts[completion.reward_status] += 1
            self.queue.put(group)

    def _on_learned(self) -> None:
        job, st = self.state.learner_job, self.state
        metrics = ray.get(job.train_ref)
        ray.get(job.save_ref)
        elapsed = time.perf_counter() - job.dispatched_at
        self.broker.publish(job.version)
        st.learner_job = None
        st.learner_idle_since = time.perf_counter()
        st.last_progress = time.monotonic()
        self.timing.add("learn_busy_s", metrics["step_s"])
        self.timing.add("publish_s", max(0.0, elapsed - metrics["step_s"]))
        self._balance_cores()
        record_learner_step(self.timeline, job.dispatched_at, metrics["step_s"], job.version)
        record = step_record(self, job, metrics)
        self.last_step = record
        self.gap_tally.add(metrics)
        self.recorder.log_step(record)
        self.progress(record)
        self._check_finite(metrics)  # after logging: the skipped steps stay on record
        self._check_rewarded(job.batch)
        self._maybe_eval(job.version)
        every = self.cfg.checkpoint.every
        if every and job.version % every == 0:
            self.control.request_checkpoint()  # taken at the next safe point, before anything is dispatched

    def _balance_cores(self) -> None:
        if self.balancer is None:
            return
        t = self.timing
        cores = self.balancer.observe(t.elapsed("loop_s"), t.get("learn_busy_s"), t.get("gen_busy_s"),
                                      self.state.steps_taken, len(self.generators))
        if cores is not None:  # ordered before the next train_step on the learner actor
            self.learner.set_cores.remote(cores)

    def _check_finite(self, metrics: dict) -> None:
        """A non-finite step was skipped by the learner; several in a row stop the run, with a checkpoint."""
        st = self.state
        if not metrics.get("nonfinite"):
            st.nonfinite_run = 0
            return
        st.nonfinite_run += 1
        st.nonfinite_total += 1
        limit = self.cfg.learner.max_nonfinite_steps
        if st.nonfinite_run >= limit:
            self._stop_with_checkpoint(f"{st.nonfinite_run} consecutive learner steps had a non-finite loss "
                                       f"(learner.max_nonfinite_steps={limit})",
                                       "Lower learner.lr or loss.beta, or check the rewards")

    def _check_rewarded(self, batch: list[RolloutGroup]) -> None:
        """A run whose rewards all fail must not finish as if it had trained: K such steps in a row stop it."""
        items = [c for g in batch for c in g.completions]
        failed = [c for c in items if c.reward_status != "ok"]
        if len(failed) < len(items):
            self.state.unrewarded_run = 0
            return
        self.state.unrewarded_run += 1
        limit = self.cfg.reward.max_failed_steps
        if self.state.unrewarded_run >= limit:
            self._stop_with_checkpoint(
                f"{self.state.unrewarded_run} learner steps in a row had no usable reward from the train reward "
                f"({self.reward_source()}): {len(failed)} of {len(items)} items of the last batch failed, the first "
                f"because: {failed[0].reward_error or failed[0].reward_status} (reward.max_failed_steps={limit})",
                "Fix the reward model and continue with --resume RUN_DIR")

    def reward_source(self) -> str:
        reward = self.cfg.reward
        if reward.remote is not None:
            return f"remote reward model {redact_url(reward.remote.url)}"
        return f"learned reward model {reward.learned.path}" if reward.learned else f"scorer '{reward.train}'"

    def _stop_with_checkpoint(self, what: str, fix: str) -> None:
        future = self.control.request_checkpoint()
        take_checkpoints(self)
        where = future.result()["path"] if future.exception() is None else f"none ({future.exception()})"
        raise RunError(f"{what}; checkpoint: {where}. {fix}")

    def _maybe_eval(self, version: int) -> None:
        every = self.cfg.eval.every
        if every and version % every == 0 and version < self.cfg.learner.steps:
            slot = self.generators[0]
            if slot.job is not None:  # finish its batch first: weights swap only between batches
                self._on_generated(slot, ray.wait([slot.job])[0][0])
            started = time.time()
            with self.timing.span("eval_s"):
                self.recorder.log_eval(self._evaluate(self.broker.lease(version)))
            self.timeline.add("eval", f"generator{slot.generator_id}", started, time.time(), version)
            self.broker.release(version)

    def _evaluate(self, weights: WeightRef | None, sampled: Any = None) -> dict:
        """Gold evaluation on generator 0 (`sampled`: its generate call, if already sent); if it or the reward
        actor died meanwhile, once more after the restart."""
        slot = self.generators[0]
        try:
            sampled = self.evaluator.sample(slot.handle, weights) if sampled is None else sampled
            return self.evaluator.finish(sampled, self.learner)
        except ray.exceptions.RayActorError as exc:  # the generator or the reward actor: wait for both
            self._await_restart(slot)
            self._on_reward_died(exc)
            return self.evaluator.evaluate(slot.handle, weights, self.learner)

    def _await_restart(self, slot: GeneratorSlot) -> None:
        """Block until a generator answers again (used outside the event loop, e.g. evaluation)."""
        deadline = time.monotonic() + self.cfg.learner.stall_timeout_s
        slot.recovering = True
        while time.monotonic() < deadline:
            self._on_probe(slot, slot.handle.info.remote())
            if not slot.recovering:
                return
            time.sleep(1.0)
        raise RunError(f"generator {slot.generator_id} did not come back within {self.cfg.learner.stall_timeout_s:g}s")

    # ---- learner failover (async_rlhf/pipeline/failover.py) -----------------------------------------
    def _start_learner(self) -> None:
        """One Learner actor, or learner.num_ranks of them behind one handle (learners/group.py)."""
        plan = self.plan
        self.learner = start_learner(self.cfg, self.policy_dir, plan.learner_cores if plan.pinned else None,
                                     plan.learner_threads)
        self.balancer = core_balancer(self.cfg, plan)  # a new learner starts on its own cores

    def _stop_learner(self) -> None:
        if isinstance(self.learner, LearnerGroup):
            self.learner.shutdown()  # also frees its placement group
        else:
            ray.kill(self.learner)

    def _fail_over_learner(self, exc: BaseException) -> None:
        """A dead learner is replaced from the newest checkpoint and the run rolls back to it; any other
        error, or a death past learner.max_restarts or without a checkpoint, ends the run."""
        if learner_alive(self.learner):
            raise exc
        ckpt = checkpoint_to_restart_from(self, exc)
        lost = self.state.steps_taken
        quiesce_generation(self)
        self._stop_learner()
        self._start_learner()
        self.state = LoopState(learner_idle_since=time.perf_counter())
        version = roll_back(self, ckpt)
        self.learner_restarts += 1
        print(f"[async-rlhf] the learner died at step {lost} ({type(exc).__name__}); replaced it from {ckpt.path.name} "
              f"(restart {self.learner_restarts} of learner.max_restarts={self.cfg.learner.max_restarts}); steps "
              f"{version + 1}.. are trained again", file=sys.stderr, flush=True)

    # ---- the end ------------------------------------------------------------------------
    def _finish(self, initial: dict) -> dict:
        latest = self.broker.latest()  # None when stopped before the first step
        final_ref = self.broker.lease(latest.version) if latest else None
        with self.timing.span("eval_s"):
            final = self._evaluate(final_ref)
        if final_ref:
            self.broker.release(final_ref.version)
        self.recorder.log_eval(final)
        ray.get(self.learner.save_pretrained.remote(str(self.run_dir / "final")))
        self._count_quiet_restarts()
        summary = run_summary(self, initial, final)
        self.recorder.write_summary(summary)
        self.recorder.plot()
        return summary

    def mc_record(self) -> dict:
        """VinePPO's MC cost so far (cumulative), or nothing for losses without MC values."""
        return self.mc_cost.record(self.timing.get("gen_busy_s")) if self.mc_request else {}

    def shutdown(self) -> None:
        self.recorder.close()
        self.timeline.close()
        if self.api is not None:
            self.api.stop()
            self.api = None
        if hasattr(self, "broker"):
            self.broker.close()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        else:  # a Ray the caller owns outlives the run: its CPUs must not stay held by this run's actors
            self._kill_actors()

    def _kill_actors(self) -> None:
        if hasattr(self, "learner"):
            self._stop_learner()
        for handle in [getattr(self, "reward", None), *(slot.handle for slot in self.generators)]:
            if handle is not None:
                ray.kill(handle)
