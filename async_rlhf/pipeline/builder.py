"""ComponentBuilder: Ray, the learner, the generators, the reward actor and the evaluator, from the config.

Every actor is started side by side and awaited once (`startup.await_actors`), so the run's start-up is
as long as its slowest actor, not the sum of all.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import ray

from actors.generator import GeneratorActor
from async_rlhf.checkpoint.input_prints import input_prints
from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.cluster.busy_board import BusyBoard
from async_rlhf.cluster.existing_ray import prepare_join
from async_rlhf.cluster.local_ray import init_local_ray
from async_rlhf.cluster.placement import generator_options, unplaced
from async_rlhf.cluster.resources import CoreLoan, core_loan, usable_cores
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import node_crashed, start_failed
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.learner_calls import LearnerHung, learner_failure
from async_rlhf.pipeline.resume import broker_versions, claim_weights_location, publish_weights
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.startup import (
    FirstCall,
    PlacementWatch,
    RestartTimedOut,
    StartSilence,
    StartupClock,
    await_actors,
    await_restarted,
    ray_init_kwargs,
    restart_limit_s,
)
from async_rlhf.pipeline.state import Components, GeneratorSlot, RunStats
from async_rlhf.pipeline.vineppo import step_delimiter_ids
from async_rlhf.weights.broker import SharedMemoryTransport, WeightSyncBroker
from async_rlhf.weights.nccl import NcclTransport
from learners.advantages.monte_carlo import MCRequest
from learners.group import LearnerGroup, start_learner
from learners.losses import LOSSES
from reward_models.scoring_marks import ScoringMarks
from reward_models.service import RewardService, TrainReward
from reward_models.trl_context import ScoringRun

# The generators' temporary files (actors/generator.py temp_files_in), in the run's own directory under
# weight_sync.shm_root: removed with it at the end, by the reaper, or by the run's next process.
GENERATOR_SCRATCH = "generator-tmp"


def make_broker(cfg: RunConfig, weights_root: Path, first_version: int) -> WeightSyncBroker:
    """The run's weight broker; shared memory is only touched once a version is staged."""
    pushed = cfg.weight_sync.transport in PUSHED_TRANSPORTS
    transport = NcclTransport(cfg.weight_sync.transport) if pushed else SharedMemoryTransport(weights_root)
    keep, initial = broker_versions(cfg, first_version)
    return WeightSyncBroker(transport, keep, initial_version=initial)  # the build publishes `first_version`


LEARNER_LOST: tuple[type[Exception], ...] = (*ACTOR_LOST, LearnerHung)


class ComponentBuilder:
    def __init__(self, cfg: RunConfig, run_dir: Path, parts: Components, broker: WeightSyncBroker,
                 weights_root: Path, stats: RunStats) -> None:
        self.cfg = cfg
        self.stats = stats  # learner_restarts counts a learner started again at start-up too
        self.run_dir = run_dir
        self.parts = parts
        self.broker = broker
        self.weights_root = weights_root
        parts.scratch_dir = str(weights_root / GENERATOR_SCRATCH)  # the workers' files; their scoring marks
        self.loan: CoreLoan | None = None  # the generators' cores the learner may borrow (set by build)
        self.learner_restart_s = cfg.learner.stall_timeout_s  # how long a new learner may take (set by build)

    def start_ray(self) -> bool:
        """True when this call started Ray (the run then shuts it down)."""
        if ray.is_initialized():  # the caller's Ray, or the one `async-rlhf train` started while importing
            return False
        if self.cfg.ray.address is not None:
            gcs = prepare_join(self.cfg.ray.address)  # one line now for a cluster that cannot take the run
            print(f"[async-rlhf] joining the Ray cluster at {gcs}", flush=True)
        init_local_ray(**ray_init_kwargs(self.cfg, len(usable_cores())))
        return True

    def build(self, startup: StartupClock, pool: GeneratorPool, rewards: RewardBook, first_version: int) -> None:
        """Every worker, started side by side and awaited once; then the starting weights and the evaluator."""
        cfg, parts = self.cfg, self.parts
        parts.inputs = input_prints(cfg)  # read once, as the workers load them; every checkpoint keeps them
        if LOSSES[cfg.loss.name].needs_mc_values:
            task = parts.require_task()
            parts.mc_request = MCRequest(cfg.mc_values.k_mc, step_delimiter_ids(task.tokenizer, task.step_end_chars))
        claim_weights_location(self.run_dir, self.weights_root)
        self.loan = core_loan(cfg, parts.require_plan(), str(self.weights_root / "busy_board"))
        if self.loan is not None:  # in the ring's directory, which the broker removes at the end
            Path(self.loan.board).parent.mkdir(parents=True, exist_ok=True)
            BusyBoard.create(Path(self.loan.board), cfg.generation.num_generators).close()
        started = live_clock.now()  # every actor starts now, side by side (but see _start_workers); awaited once
        self._start_workers(pool)
        stall = cfg.learner.stall_timeout_s
        watch = PlacementWatch(lambda: unplaced(self._actor_names(pool)), stall)
        answers = await_actors(startup, started, self._first_calls(pool), watch, StartSilence(stall), spare="learner")
        ready = answers["learner"][0]
        died = ready if isinstance(ready, BaseException) else None  # a learner that died starting (spare role)
        self.learner_restart_s = restart_limit_s(stall, max(startup.beside.values()) if died else
                                                 startup.beside["learner"])
        pool.hangs.restart_limit_s = restart_limit_s(stall, startup.beside["generators"])
        rewards.restart_limit_s = restart_limit_s(stall, startup.beside["reward"])
        rewards.pid = answers["reward"][0]["pid"]
        for slot, info in zip(pool.slots, answers["generators"]):
            pool.started(slot, info)
        self.with_learner(lambda: self._first_weights(pool, first_version), died)
        parts.evaluator = Evaluator(parts.require_task().eval_prompts(), parts.reward, cfg.generation.eval_temperature,
                                    cfg.eval.win_rate_judge, self.run_dir / "eval_initial.json",
                                    start_is_reference=cfg.model.reference_path is None, samples=cfg.eval.samples)

    def _first_calls(self, pool: GeneratorPool) -> dict[str, list[FirstCall]]:
        """Each role's first call, awaited together by await_actors."""
        parts = self.parts
        return {"learner": [FirstCall("the learner", parts.learner.__ray_ready__.remote(),
                                      list(self._learner_names().values()))],
                "generators": [FirstCall(f"generator {g.generator_id}", g.handle.info.remote(), [g.handle])
                               for g in pool.slots],
                "reward": [FirstCall("the reward actor", parts.reward.health.remote(), [parts.reward])]}

    def with_learner(self, action: Callable[[], None], died: BaseException | None = None) -> None:
        """`action` on the learner at start-up: its first weights (version 0 published, or the push group formed),
        a resumed run's checkpoint loaded. A learner that died or hung there (or in its start: `died`) has trained
        nothing: it is started again and `action` made again, within learner.max_restarts (such a death ended the
        run as a failed start-up); one whose own start raised is not (it would raise again)."""
        while True:
            if died is not None:
                self._require_restartable(died)
            try:
                if died is not None:  # its replacement may die in its start too (Ray kills the newest worker first)
                    self._restart_starting_learner(died)
                    died = None
                return action()
            except LEARNER_LOST as exc:
                died = exc

    def _first_weights(self, pool: GeneratorPool, first_version: int) -> None:
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # nccl: learner rank 0 + every generator; ipc
            pool.connect()
        elif not first_version:  # version 0 as weights a generator can go back to (resume.broker_versions)
            publish_weights(self.parts.learner, self.broker, 0, self.cfg.learner.stall_timeout_s)

    def _require_restartable(self, error: BaseException) -> None:
        """`error` ends the run when a new learner would fail the same way or no restart is left."""
        if start_failed(error) or node_crashed(error) or self.stats.learner_restarts >= self.cfg.learner.max_restarts:
            raise error

    def _restart_starting_learner(self, error: BaseException) -> None:
        limit = self.cfg.learner.max_restarts
        self.stats.learner_restarts += 1
        print(f"[async-rlhf] the learner failed while starting ({learner_failure(error)}); starting a new one (restart "
              f"{self.stats.learner_restarts} of learner.max_restarts={limit})", file=sys.stderr, flush=True)
        self.replace_learner()

    def replace_learner(self) -> None:
        """A new learner for a dead or hung one, given the time a start takes here (restart_limit_s): before, its
        start counted against learner.stall_timeout_s in its first call (load_state), bounded from then on. One
        hung in its start is hung (LearnerHung): `with_learner` replaces it within learner.max_restarts (before,
        the bound ended the run)."""
        self.stop_learner()
        self.start_learner()
        watch = PlacementWatch(lambda: unplaced(self._learner_names()), self.cfg.learner.stall_timeout_s)
        try:
            await_restarted(self.parts.learner.__ray_ready__.remote(), "the new learner", self.learner_restart_s,
                            watch)
        except RestartTimedOut as exc:
            raise LearnerHung(str(exc)) from None

    def _actor_names(self, pool: GeneratorPool) -> dict[str, Any]:
        """Every actor of the run by the name a user knows it by."""
        named = self._learner_names()
        named.update({f"generator {g.generator_id}": g.handle for g in pool.slots})
        return {**named, "the reward actor": self.parts.reward}

    def _learner_names(self) -> dict[str, Any]:
        learner = self.parts.learner
        ranks = getattr(learner, "handles", None)  # a LearnerGroup
        return {f"learner rank {r}": h for r, h in enumerate(ranks)} if ranks else {"the learner": learner}

    def _start_workers(self, pool: GeneratorPool) -> None:
        """The learner, the generators and the reward actor. With ipc they share one GPU, and vLLM sizes its KV
        cache from the device's free memory while it profiles, asserting that no other process changed it
        meanwhile: the learner's start (DeepSpeed's buffers, its `empty_cache`) would. So there the generators
        start once the learner is up (GPU only, never run here)."""
        self.start_learner()
        if self.cfg.weight_sync.transport == "ipc":
            ray.get(self.parts.learner.__ray_ready__.remote())
        pool.slots = self._start_generators()
        self.parts.reward = self._start_reward()

    def _start_generators(self) -> list[GeneratorSlot]:
        """On GPUs each in its own placement bundle (placement.py); Ray restarts one whose process dies."""
        cfg, plan = self.cfg, self.parts.require_plan()
        gen_cls = ray.remote(GeneratorActor)
        reward = TrainReward(cfg.reward.train_scorer, cfg.reward.timeout_s, self.scoring_run())
        return [GeneratorSlot(gen_cls.options(**options).remote(
                    i, self.parts.policy_dir, cfg.generation, cfg.seed, plan.generator_cores[i], cfg.generator_dtype,
                    cfg.weight_sync.transport, reward if cfg.reward.in_generator else None,
                    self.loan and self.loan.board, self.parts.scratch_dir), i)
                for i, options in enumerate(generator_options(cfg))]

    def _start_reward(self) -> Any:  # a RewardService actor handle
        """Stateless: Ray restarts it when its process dies, and the loop re-issues the lost batches."""
        reward = self.cfg.reward
        scorers = {"train": reward.train_scorer, "gold": reward.gold}
        remote = reward.remote.model_dump() if reward.remote else None
        learned = reward.learned.model_dump(mode="json") if reward.learned else None
        return ray.remote(RewardService).options(num_cpus=0, max_restarts=reward.max_restarts).remote(
            scorers, reward.timeout_s, remote, learned, ScoringMarks(self.parts.scratch_dir, "reward"),
            self.scoring_run())

    def scoring_run(self) -> ScoringRun:
        """What TRL's `trainer_state` tells the run's reward functions: its length and a dataset's epoch size."""
        train = getattr(self.parts.require_task(), "train", None)  # a dataset's rows; an embedded task streams
        return ScoringRun(self.cfg.learner.steps, self.cfg.generation.prompts_per_step,
                          len(train) if isinstance(train, list) else 0)

    def start_learner(self) -> None:
        """One Learner actor, or learner.num_ranks of them behind one handle (learners/group.py)."""
        plan = self.parts.require_plan()
        self.parts.learner = start_learner(self.cfg, self.parts.policy_dir, plan.learner_cores if plan.pinned else None,
                                           plan.learner_threads, self.loan)

    def remove_run_files(self) -> None:
        """The run's directory under shm_root, whatever the transport: weights ring, busy board, scratch."""
        shutil.rmtree(self.weights_root, ignore_errors=True)

    def stop_learner(self) -> None:
        if isinstance(self.parts.learner, LearnerGroup):
            self.parts.learner.shutdown()  # also frees its placement group
        else:
            ray.kill(self.parts.learner)

    def kill_actors(self, pool: GeneratorPool) -> None:
        """A Ray the caller owns outlives the run: its CPUs must not stay held by this run's actors."""
        if self.parts.learner is not None:
            self.stop_learner()
        if self.parts.reward is not None:
            ray.kill(self.parts.reward)
        pool.kill()
