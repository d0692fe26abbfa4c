"""GeneratorPool: the generator actors, what each is generating, and their recovery when one dies.

Each generator holds up to `generation.chunks_in_flight` chunks: the next is queued on the actor while the
previous samples (Ray runs an actor's calls in order), so the engine does not idle for the round trip to the
controller. Every chunk still passes the generation gate when it is issued, with its own weights lease.
Ray restarts a generator whose process dies; the pool re-issues the prompts of every chunk it lost once it
answers a probe.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import ray

from actors.generation_result import GenerationResult
from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.cluster.local_ray import require_gcs
from async_rlhf.config.learner import PUSHED_TRANSPORTS
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, first_line, node_crashed, ray_logs
from async_rlhf.outputs.timeline import Timeline, record_generation
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.generator_hangs import GeneratorHangs
from async_rlhf.pipeline.queue import GateInputs, chunk_version, generation_allowed
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import Chunk, Components, GeneratorSlot, LoopState, RunStats
from async_rlhf.pipeline.timing import Timing
from async_rlhf.pipeline.waits import POLL_S, pids_at_end, wait_all
from async_rlhf.rollout import Prompt
from async_rlhf.weights.broker import VersionError, WeightSyncBroker
from reward_models.scoring_marks import ScoringMarks, while_scoring


class GeneratorPool:
    def __init__(self, cfg: RunConfig, parts: Components, state: LoopState, stats: RunStats, broker: WeightSyncBroker,
                 rewards: RewardBook, timing: Timing, timeline: Timeline) -> None:
        self.cfg, self.parts, self.state, self.stats = cfg, parts, state, stats
        self.broker, self.rewards, self.timing, self.timeline = broker, rewards, timing, timeline
        self.slots: list[GeneratorSlot] = []  # one per actor, from the start of the run
        self.longest_call_s = self.longest_sampling_s = 0.0  # the longest call so far, and less its MC rollouts
        self.hangs = GeneratorHangs(self, cfg.hang_timeout_s, cfg.learner.stall_timeout_s)

    @property
    def chunk(self) -> int:
        return self.cfg.chunk_prompts

    @property
    def depth(self) -> int:
        """Chunks queued per generator. One with pushed weights (nccl, ipc): the learner's push is an actor call
        that would queue behind a second chunk, and a chunk sent around a restart could reach the new process
        before it rejoins the weight group."""
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:
            return 1
        return self.cfg.generation.chunks_in_flight

    # ---- dispatch -----------------------------------------------------------------------
    def dispatch(self, gate_inputs: Callable[[], GateInputs]) -> None:
        """Fill the generators' queues: re-issued prompts first, else new ones if the gate allows.

        Breadth first (every generator its first chunk before any its second), so a step's chunks spread over
        all generators; with max_staleness=0 the gate closes once a step is issued, so no second chunk goes out."""
        self._probe_recovering()
        for depth in range(self.depth):
            for slot in self.slots:
                if len(slot.chunks) == depth and self.usable(slot):
                    self._dispatch_to(slot, gate_inputs())

    @staticmethod
    def usable(slot: GeneratorSlot) -> bool:
        return slot.probe is None and not slot.recovering

    def _probe_recovering(self) -> None:
        """A generator that died is probed once every chunk it held has been handled (each fails or lands)."""
        for slot in self.slots:
            if slot.recovering and not slot.chunks and slot.probe is None and live_clock.now() >= slot.not_before:
                self.hangs.send_probe(slot)

    def _dispatch_to(self, slot: GeneratorSlot, gate: GateInputs) -> None:
        st = self.state
        if st.reissue:  # already counted in `outstanding`: no gate, no new prompts
            prompts, version = st.reissue.popleft()  # fixed delay: the version it had
            self.submit(slot, prompts, version if self.cfg.queue.staleness_mode == "fixed" else gate.published_version)
        elif generation_allowed(gate):
            prompts = [self.parts.require_task().train_prompt(st.next_prompt + i) for i in range(self.chunk)]
            st.next_prompt += self.chunk
            st.outstanding += self.chunk
            self.submit(slot, prompts, chunk_version(gate))

    def submit(self, slot: GeneratorSlot, prompts: list[Prompt], version: int) -> None:
        """Generate with weights `version`; a restarted actor (back at version 0) reloads them."""
        weights = None
        if self.broker.latest() is not None:  # else only the starting weights exist (pushed weights, no step yet)
            weights = self.broker.lease(version)
        ref = slot.handle.generate.remote(prompts, weights, mc=self.parts.mc_request,
                                          score=self.cfg.reward.in_generator)
        if not slot.chunks:  # its silence is counted from here (pipeline/generator_hangs.py)
            slot.answered_at = live_clock.now()
        slot.chunks.append(Chunk(ref, prompts, weights.version if weights is not None else None, slot.restarts))
        slot.batches_sent += 1

    # ---- events -------------------------------------------------------------------------
    def jobs(self) -> dict[Any, GeneratorSlot]:
        """Every chunk in flight, by its ref (several may share a slot)."""
        return {chunk.ref: slot for slot in self.slots for chunk in slot.chunks}

    def probes(self) -> dict[Any, GeneratorSlot]:
        return {slot.probe: slot for slot in self.slots if slot.probe is not None}

    def recovering(self) -> bool:
        return any(slot.recovering for slot in self.slots)

    def on_generated(self, slot: GeneratorSlot, ref: Any) -> None:
        chunk = self._handled(slot, ref)
        try:
            result: GenerationResult = ray.get(ref)
        except ACTOR_LOST as exc:
            self._on_died(slot, exc, chunk)
            return
        except ray.exceptions.RayTaskError as exc:
            if not self._restarted_between_calls(slot, exc):
                raise
            self._on_died(slot, exc, chunk)
            return
        self._count(slot, result, chunk)
        if result.reward_s is None:
            self.rewards.score(result)
            return
        self.timing.add("reward_in_generator_s", result.reward_s)
        self.rewards.queue_scored(result, result.groups + (result.mc.rollouts if result.mc is not None else []))

    def _handled(self, slot: GeneratorSlot, ref: Any) -> Chunk:
        """Take the chunk of `ref` off its slot and release its lease: the one place a chunk's lease ends,
        so each is released once. Found by ref, not position: nothing depends on the order results are seen."""
        chunk = next(c for c in slot.chunks if c.ref == ref)
        slot.chunks.remove(chunk)
        slot.answered_at = live_clock.now()
        if chunk.leased_version is not None:
            self.broker.release(chunk.leased_version)
        return chunk

    def _count(self, slot: GeneratorSlot, result: GenerationResult, chunk: Chunk) -> None:
        slot.version = result.policy_version
        if result.mc is not None:  # VinePPO's rollouts: the generator's time, counted apart
            self.stats.mc_cost.add_generated(result.mc)
            slot.busy_s, slot.tokens = slot.busy_s + result.mc.gen_s, slot.tokens + result.mc.tokens
        self._measure(result, chunk)
        slot.busy_s += result.gen_s + result.sync_s
        slot.tokens += result.tokens
        self.timing.add("gen_busy_s", result.gen_s)
        self.timing.add("weight_sync_s", result.sync_s)
        self.timing.add("tokens_generated", result.tokens)
        record_generation(self.timeline, result)

    def _measure(self, result: GenerationResult, chunk: Chunk) -> None:
        """The longest calls so far (generator_hangs.py), by their own timings but at most the driver's live time
        since it sent them: one frozen with the driver (`docker pause`) measured the freeze, and a hang limit grew."""
        live_s = live_clock.now() - chunk.sent_at
        sampling_s = min(result.gen_s + result.sync_s + (result.reward_s or 0.0), live_s)
        self.longest_sampling_s = max(self.longest_sampling_s, sampling_s)
        rollouts_s = result.mc.gen_s if result.mc is not None else 0.0
        self.longest_call_s = max(self.longest_call_s, min(sampling_s + rollouts_s, live_s))

    def finish(self, slot: GeneratorSlot) -> None:
        """Wait for every chunk the slot holds, oldest first, and handle it (weights swap only between batches)."""
        while slot.chunks:
            self.on_generated(slot, ray.wait([slot.chunks[0].ref])[0][0])

    def drain(self) -> None:
        """Let the generations in flight finish and be scored: they land in the queue (before a checkpoint). A
        generator that hangs meanwhile is killed as in the loop (its prompts re-issued); nothing at all landing
        for learner.stall_timeout_s ends the run."""
        timeout = self.cfg.learner.stall_timeout_s
        deadline = live_clock.Deadline(timeout)
        while refs := list(self.jobs()) + list(self.state.reward_jobs):
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            if not ready:
                self.hangs.check()
                if deadline.passed():
                    raise RunError(f"generation did not finish within learner.stall_timeout_s={timeout:g} "
                                   f"while taking a checkpoint")
                continue
            deadline = live_clock.Deadline(timeout)
            slot = self.jobs().get(ready[0])
            if slot is not None:
                self.on_generated(slot, ready[0])
            else:
                self.rewards.on_scored(ready[0])

    # ---- recovery -----------------------------------------------------------------------
    def _on_died(self, slot: GeneratorSlot, exc: Exception, chunk: Chunk) -> None:
        """Nothing of the lost chunk reaches the learner; its prompts go out again, unchanged, once the actor
        answers a probe (Ray restarts it; calls fail fast while it is down). Each chunk the death took fails
        on its own and is re-issued here once; the probe waits for the last of them (_probe_recovering)."""
        self.state.reissue.append((chunk.prompts, chunk.leased_version))  # fixed delay samples it with it again
        if chunk.sent_to < slot.restarts:  # an earlier process's call: its death was seen and the generator is back
            return  # (an evaluation's wait saw it first, GeneratorPool.await_restart); said "died" after "is back"
        if not slot.recovering:  # one line per death, however many chunks it took
            print(f"[async-rlhf] generator {slot.generator_id} died ({type(exc).__name__}){self._died(slot)}; "
                  f"waiting for Ray to restart it; the prompts of its {len(slot.chunks) + 1} batch(es) in flight "
                  "will be re-issued",
                  file=sys.stderr, flush=True)
        slot.recovering, slot.not_before = True, live_clock.now() + 0.5

    def _died(self, slot: GeneratorSlot) -> str:
        """What reward its dead process was running, if any (kept for the run's last line), as a clause."""
        slot.died_running = ScoringMarks(self.parts.scratch_dir, f"generator-{slot.generator_id}").left()
        return while_scoring(slot.died_running)

    def _restarted_between_calls(self, slot: GeneratorSlot, exc: ray.exceptions.RayTaskError) -> bool:
        """Pushed weights: a generator killed between two calls failed none of them, and its new process, outside
        the weight group, refuses its first batch's version (VersionError). Told apart from a real version bug by
        its pid; then it is recovered like any restart (probe, the group formed anew, the prompts re-issued)."""
        if self.cfg.weight_sync.transport not in PUSHED_TRANSPORTS or not isinstance(exc.cause, VersionError):
            return False
        return ray.get(slot.handle.info.remote())["pid"] != slot.pid

    def on_probe(self, slot: GeneratorSlot, ref: Any) -> None:
        slot.probe = None
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:  # dead for good: restarts exhausted, or its node is gone
            if node_crashed(exc):
                raise RunError(f"the Ray node of generator {slot.generator_id} crashed (its raylet was killed or ran "
                               f"out of memory); Ray logs under {ray_logs()}") from exc
            raise RunError(f"generator {slot.generator_id} died{while_scoring(slot.died_running)} and Ray will not "
                           "restart it again "
                           f"(generation.max_restarts={self.cfg.generation.max_restarts}): "
                           f"{first_line(exc).rstrip('.')}; why it died is in its log under {ray_logs()}") from exc
        except ACTOR_LOST:  # still restarting (or killed again in its start for want of memory), unless Ray is gone
            require_gcs()
            slot.not_before = live_clock.now() + 1.0
            return
        self._note_alive(slot, info)

    def started(self, slot: GeneratorSlot, info: dict) -> None:
        """A generator's first answer. One that died while it started was restarted by Ray before it could
        answer: counted once (at least once) from Ray's record."""
        slot.pid = info["pid"]
        if info.get("restarted"):
            slot.restarts += 1
            print(f"[async-rlhf] generator {slot.generator_id} died while starting and Ray started it again "
                  f"(pid {slot.pid})", file=sys.stderr, flush=True)

    def _note_alive(self, slot: GeneratorSlot, info: dict) -> None:
        if info["pid"] != slot.pid:
            slot.restarts += 1
            slot.pid = info["pid"]
            print(f"[async-rlhf] generator {slot.generator_id} is back (pid {slot.pid}, restart {slot.restarts}); "
                  f"it loads the current weights with its next batch", file=sys.stderr, flush=True)
            if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:  # its process lost the group: form it anew
                self._rejoin()
        slot.recovering = False

    def _rejoin(self) -> None:
        """The group formed anew with a restarted generator. vLLM's rendezvous waits at most 300 s for every
        generator (its StatelessProcessGroup store timeout, fixed), and each joins only once the calls queued
        before the join are done: the generations in flight are let finish first (they are handled as usual)."""
        jobs = list(self.jobs())
        if jobs:
            ray.wait(jobs, num_returns=len(jobs), timeout=self.cfg.weight_sync.timeout_s)
        self.connect()

    def await_restart(self, slot: GeneratorSlot) -> None:
        """Block until a generator answers again (used outside the event loop, e.g. evaluation), for as long as
        its restart may take (GeneratorHangs.restart_limit_s)."""
        deadline = live_clock.Deadline(self.hangs.restart_limit_s)
        slot.recovering = True
        self._died(slot)
        while self.hangs.within_restart(slot, deadline):
            if slot.probe is None:  # the loop's own, where it had sent one
                self.hangs.send_probe(slot)
            if not ray.wait([slot.probe], timeout=min(POLL_S, max(0.0, deadline.left())))[0]:
                if self.hangs.killed_for_its_probe(slot, live_clock.now() - slot.probe_at, self.hangs.limit_s()):
                    deadline.renew()  # a stopped process, restarted now
                continue
            self.on_probe(slot, slot.probe)
            if not slot.recovering:
                return
            time.sleep(1.0)
        raise self.hangs.not_back(slot)

    def connect(self) -> None:
        """The learner-driven weight group (nccl, ipc) with every generator; again after a restart, when the
        learner also resends the current version (GPU only: never run here, see the README)."""
        ray.get(self.parts.learner.connect_generators.remote([g.handle for g in self.slots],
                                                             self.cfg.generation.tensor_parallel_size))

    def count_quiet_restarts(self) -> None:
        """A generator killed while idle failed no call, so only its process tells: counted at the end, waiting for
        one killed just before that is still restarting (its hang and restart limits)."""
        limit = max(self.hangs.limit_s(), self.hangs.restart_limit_s)
        pids = pids_at_end({f"generator {slot.generator_id}": slot.handle for slot in self.slots}, "info", limit)
        for slot, pid in zip(self.slots, pids.values()):
            slot.restarts += pid is not None and pid != slot.pid

    def quiesce(self) -> None:
        """Learner failover: let every generation in flight end and drop it (it belongs to the future being
        rolled back). Every generator is probed before its next batch, so one that died meanwhile is counted
        and, on pushed transports, rejoins."""
        if self.cfg.weight_sync.transport in PUSHED_TRANSPORTS:
            self._restart_the_stuck()
        else:
            self._let_end(list(self.jobs()))
        for slot in self.slots:
            for chunk in list(slot.chunks):
                self._handled(slot, chunk.ref)
            slot.recovering, slot.not_before = True, 0.0

    def _let_end(self, jobs: list[Any]) -> None:
        """Wait for every call in `jobs` to end, killing a generator that hangs meanwhile as the loop would (its
        call then fails, which ends it); what still runs after learner.stall_timeout_s ends the run."""
        timeout = self.cfg.learner.stall_timeout_s
        running = wait_all(jobs, timeout, self.hangs.check)
        if running:
            raise RunError(f"the learner died and {len(running)} generation(s) did not finish within "
                           f"learner.stall_timeout_s={timeout:g}s; continue with --resume RUN_DIR")

    def _restart_the_stuck(self) -> None:
        """Pushed transports: a generator may be stuck in the dead learner's push, its receive call waiting on a
        sender that is gone, with batches queued behind it or none (an idle one: N=0, the gate closed). A probe
        queued behind all it holds answers once that is done; one silent after weight_sync.timeout_s is killed,
        Ray restarts it, and it joins the group the new learner forms."""
        probes = {slot.handle.info.remote(): slot for slot in self.slots}
        _, silent = ray.wait(list(probes), num_returns=len(probes), timeout=self.cfg.weight_sync.timeout_s)
        for ref in silent:
            slot = probes[ref]
            print(f"[async-rlhf] generator {slot.generator_id} is stuck in the dead learner's weight push; "
                  f"restarting it", file=sys.stderr, flush=True)
            ray.kill(slot.handle, no_restart=False)  # Ray starts it again (generation.max_restarts)

    def kill(self) -> None:
        for slot in self.slots:
            ray.kill(slot.handle)
