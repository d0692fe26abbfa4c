"""A generator that hangs (pipeline/generator_hangs.py): which are killed, when, and that Ray then restarts them.

A stand-in actor holds the generator's place (a real one starts vLLM, which takes seconds and tells nothing more
here); the kill and Ray's restart of it are real. tests/test_faults.py hangs a real generator in a real run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import ray

from async_rlhf.cluster import actor_table
from async_rlhf.cluster.actor_lost import ACTOR_LOST
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError, ray_logs
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.generator_hangs import HANG_FACTOR, GeneratorHangs
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.state import Chunk, GeneratorSlot
from tests.helpers import kill_seen_by_ray
from tests.standins import SlowGenerator, SlowStartGenerator, StartsStuck, StoppedGenerator, Stuck


def pool_of(slots: list[GeneratorSlot], longest_call_s: float = 0.0,
            longest_sampling_s: float | None = None) -> GeneratorPool:
    cfg = RunConfig.model_validate({"generation": {"prompts_per_step": 16}})  # training calls of 16 prompts
    sampling_s = longest_call_s if longest_sampling_s is None else longest_sampling_s  # no MC rollouts: the same
    return cast(GeneratorPool, SimpleNamespace(slots=slots, longest_call_s=longest_call_s,
                                               longest_sampling_s=sampling_s, cfg=cfg))


def answer_after_restart(actor: Any) -> dict:
    """Its info() once Ray has restarted it (a call sent meanwhile fails at once), within 60 s."""
    deadline = live_clock.Deadline(60.0)
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=60)
        except ray.exceptions.ActorUnavailableError:
            if deadline.passed():
                raise
            time.sleep(0.2)


def busy_slot(handle: Any, silent_s: float, call: Any = None) -> GeneratorSlot:
    slot = GeneratorSlot(handle, 0)
    slot.chunks.append(Chunk(ref=call, prompts=[], leased_version=None))
    slot.answered_at = live_clock.now() - silent_s
    return slot


def test_a_busy_generator_silent_past_the_timeout_is_killed_and_ray_restarts_it(ray_local,
                                                                                capsys: pytest.CaptureFixture) -> None:
    actor = ray_local.remote(num_cpus=0, max_restarts=1)(Stuck).remote()
    before = ray_local.get(actor.pid.remote())
    slot = busy_slot(actor, silent_s=12.0, call=actor.generate.remote())
    checked_at = live_clock.now()
    GeneratorHangs(pool_of([slot], longest_call_s=0.2), timeout_s=10.0, restart_limit_s=60.0).check()
    said = capsys.readouterr().err
    assert said.startswith("[async-rlhf] generator 0 has answered nothing for 12s with 1 call(s) in flight "
                           "(generation.hang_timeout_s=10, 10x the longest call so far, per training call's size: "
                           "10s in all): killing it")
    deadline, after = time.monotonic() + 60, before
    while after == before:  # ray.kill returns at once; calls fail while the actor restarts
        assert time.monotonic() < deadline, "not restarted"
        try:
            after = ray_local.get(actor.pid.remote(), timeout=5)
        except Exception:
            time.sleep(0.2)
    assert slot.answered_at >= checked_at  # said once: the clock starts again at the kill (however slow the restart)


@pytest.mark.parametrize("case", ["hung", "hung in an evaluation's chunk", "idle", "recovering", "within the timeout",
                                  "within 10x the longest call", "an evaluation's call 4 training calls big",
                                  "the driver was frozen", "the driver was busy", "a kill sent 5 s ago, not taken yet",
                                  "hung, its kill not taken within the restart's bound",
                                  "hung in an evaluation's chunk, VinePPO's training calls 10x longer",
                                  "within 10x the longest call, VinePPO's rollouts included"])
def test_what_is_a_hang_and_what_is_not(ray_local, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.generator_hangs.ray.kill", lambda handle, **_: killed.append(handle))
    actor = ray_local.remote(num_cpus=0)(Stuck).remote()
    call = actor.generate.remote()  # never answers
    slot, longest, evals, killed_at = busy_slot(actor, silent_s=30.0, call=call), 0.5, [], None
    sampling = None  # as long as the longest call: no MC rollouts
    if case == "idle":
        slot.chunks.clear()
    elif case == "hung in an evaluation's chunk":  # all generator 0 has at the final evaluation
        slot.chunks.clear()
        evals.append((call, 64))  # a training call's size (16 prompts x 4 samples): 10 s
    elif case == "an evaluation's call 4 training calls big":  # the final evaluation's chunks as one call
        slot.chunks.clear()  # before: killed as hung at 10 s (the timeout), again and again
        evals.append((call, 256))  # 4 x 10 s
    elif case == "recovering":
        slot.recovering = True  # already dead: Ray is restarting it
    elif case == "within the timeout":
        slot.answered_at = live_clock.now() - 5.0
    elif case == "within 10x the longest call":
        longest = 30.0 / HANG_FACTOR + 1.0  # big batches take long, and always did
    elif case == "within 10x the longest call, VinePPO's rollouts included":  # a training call: rollouts and all
        longest, sampling = 30.0 / HANG_FACTOR + 1.0, 0.5
    elif case == "hung in an evaluation's chunk, VinePPO's training calls 10x longer":  # its own sampling only:
        slot.chunks.clear()  # 10 s, not 40 s
        longest, sampling = 30.0 / HANG_FACTOR + 1.0, 0.5
        evals.append((call, 64))
    elif case == "the driver was frozen":  # stopped for 25 of the 30 s (Ctrl-Z): the generator was silent 5 s
        frozen_after = live_clock.now() - 25.0
        monkeypatch.setattr("async_rlhf.pipeline.live_clock.now", lambda: frozen_after)
    elif case == "the driver was busy":  # (a checkpoint's write): the call is done and waits to be handled
        slot.chunks[0].ref = ray_local.put("a generation")
    elif case == "a kill sent 5 s ago, not taken yet":  # Ray asks a stopped worker to exit first: seconds
        killed_at = live_clock.now() - 5.0  # before: said and sent again at the next check past the timeout
    elif case == "hung, its kill not taken within the restart's bound":
        killed_at = live_clock.now() - 61.0
    hangs = GeneratorHangs(pool_of([slot], longest, sampling), timeout_s=10.0, restart_limit_s=60.0)
    hangs.watch(slot).killed_at = killed_at
    hangs.check(evals)
    assert killed == ([actor] if case.startswith("hung") else [])
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call
    ray_local.kill(actor)


def test_a_call_done_but_unhandled_is_one_answer_not_cover_for_the_silence_after_it(ray_local, monkeypatch) -> None:
    # A blocking wait (a checkpoint's drain of an evaluation) leaves a finished training call unhandled. Before, each
    # check took it for news, and generator 0 hung behind it in the evaluation's call was never killed.
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.generator_hangs.ray.kill", lambda handle, **_: killed.append(handle))
    actor = ray_local.remote(num_cpus=0)(Stuck).remote()
    slot = busy_slot(actor, silent_s=30.0, call=ray_local.put("a generation"))  # done: the driver was busy
    hangs = GeneratorHangs(pool_of([slot]), timeout_s=10.0, restart_limit_s=60.0)
    evals = [(actor.generate.remote(), 64)]  # never answers
    hangs.check(evals)
    assert not killed and live_clock.now() - slot.answered_at < 5  # it answered: news, once
    slot.answered_at -= 30.0  # the wait goes on, the done call still unhandled
    hangs.check(evals)
    assert killed == [actor]
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call
    ray_local.kill(actor)


def test_a_generator_stopped_while_it_is_probed_is_killed_not_waited_on_as_if_restarting(
        ray_local, capsys: pytest.CaptureFixture) -> None:
    # By hand (random faults in real runs): the learner SIGKILLed, then generator 0 SIGSTOPped 1.3 s later; the
    # failover probes every generator, and the stopped one was waited on as if it were restarting, until its
    # restart's bound ended the run ("did not come back within 52s of its death").
    actor = ray_local.remote(num_cpus=0, max_restarts=2)(SlowGenerator).remote()
    slot = GeneratorSlot(actor, 0)
    slot.pid = stopped = ray_local.get(actor.info.remote())["pid"]
    kill_seen_by_ray(actor, slot.pid)  # restarted, then stopped before its first answer: its probe tells
    stopped = answer_after_restart(actor)["pid"]
    os.kill(stopped, signal.SIGSTOP)
    hangs = GeneratorHangs(pool_of([slot]), timeout_s=10.0, restart_limit_s=60.0)
    hangs.send_probe(slot)
    slot.recovering, slot.probe_at = True, slot.probe_at - 20.0
    hangs.check()
    hangs.check()  # Ray kills a stopped process only after asking it to exit, for seconds: not said, nor sent again
    assert capsys.readouterr().err.startswith("[async-rlhf] generator 0 has answered nothing for 20s to its probe "
                                              "though Ray has it alive (stopped or hung) (generation.hang_timeout_s=10")
    with pytest.raises(ACTOR_LOST):  # what GeneratorPool.on_probe takes for "still restarting": probed again
        ray_local.get(slot.probe, timeout=60)
    assert answer_after_restart(actor)["pid"] not in (slot.pid, stopped)
    ray_local.kill(actor)


@pytest.mark.parametrize("case", ["hung: alive past the limit in the process it answered from",
                                  "without Ray's actor table", "answered within the hang limit", "restarting",
                                  "sent to a process that died: Ray has a new one alive"])
def test_a_probe_unanswered_is_a_hang_only_where_ray_has_the_generator_alive_past_the_limit(
        ray_local, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.generator_hangs.ray.kill", lambda handle, **_: killed.append(handle))
    actor = ray_local.remote(num_cpus=0)(StoppedGenerator).remote()  # its info() never answers
    ray_local.get(actor.__ray_ready__.remote())
    slot = GeneratorSlot(actor, 0)
    GeneratorHangs.send_probe(slot)
    slot.recovering, slot.probe_at = True, slot.probe_at - 20.0
    assert slot.probe_pid > 0
    if case.startswith("sent to a process that died"):  # the probe fails once Ray has taken its death in
        slot.probe_pid = -1
    elif case == "without Ray's actor table":  # another Ray version's internals: the restart's bound ends the wait
        monkeypatch.setattr(actor_table, "table", lambda: None)
    elif case == "answered within the hang limit":
        slot.probe_at += 15.0
    elif case == "restarting":  # the probe fails once it is back
        monkeypatch.setattr(actor_table, "record", lambda *_: actor_table.ActorRecord("RESTARTING", 0, 0))
    GeneratorHangs(pool_of([slot]), timeout_s=10.0, restart_limit_s=60.0).check()
    assert killed == ([actor] if case.startswith("hung") else [])
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call
    ray_local.kill(actor)


def test_a_restart_that_never_comes_back_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # While a generator restarts, the learner's stall clock waits (pipeline/watchdogs.py): the restart has its own.
    slot = GeneratorSlot(handle=None, generator_id=1)
    slot.recovering = True
    hangs = GeneratorHangs(pool_of([slot]), timeout_s=10.0, restart_limit_s=20.0)
    clock = [1000.0]  # the live clock: a freeze of this process does not move it
    monkeypatch.setattr("async_rlhf.pipeline.live_clock.now", lambda: clock[0])
    hangs.check()  # first seen restarting
    clock[0] += 19.0
    hangs.check()  # 19 s
    clock[0] += 2.0
    with pytest.raises(RunError, match=r"^generator 1 did not come back within 20s of its death "
                                       r"\(learner.stall_timeout_s, or 5x its first start in this run\)"):
        hangs.check()
    slot.recovering = False  # back: a later restart gets the whole time again
    hangs.check()
    slot.recovering = True
    hangs.check()


def test_a_restart_hung_in_its_start_past_its_bound_is_killed_once_and_ray_starts_it_again(
        ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A generator whose new process hung (or was stopped) in its engine's start ended the run once its restart's
    bound had passed; at start-up such an actor is killed and started again, and now here."""
    marker = tmp_path / "hang the next start"
    actor = ray_local.remote(num_cpus=0, max_restarts=3)(StartsStuck).remote(str(marker))
    slot = GeneratorSlot(actor, 1)
    slot.pid = ray_local.get(actor.info.remote())["pid"]
    marker.touch()
    kill_seen_by_ray(actor, slot.pid)  # its restart hangs in __init__
    slot.recovering = True
    hangs = GeneratorHangs(pool_of([slot]), timeout_s=10.0, restart_limit_s=20.0)
    clock = [live_clock.now()]
    monkeypatch.setattr("async_rlhf.pipeline.live_clock.now", lambda: clock[0])
    hangs.check()  # first seen restarting
    clock[0] += 21.0
    while marker.exists():
        time.sleep(0.05)  # its new process is in its start, for good
    hangs.check()  # past the bound: killed, not the run's end
    assert slot.restarts == 1 and "generator 1 is not back 20s into its restart (pid " in capsys.readouterr().err
    assert answer_after_restart(actor)["pid"] not in (slot.pid, hangs.killed_pids[1])
    clock[0] += 19.0
    hangs.check()  # its next start has the whole bound
    ray_local.kill(actor)


def test_a_failover_waiting_for_the_generations_in_flight_kills_a_generator_that_hangs(ray_local, tmp_path) -> None:
    # Before: the failover waited learner.stall_timeout_s for the hung generator's chunk and ended the run.
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.state import Components, LoopState, RunStats

    actor = ray_local.remote(num_cpus=0, max_restarts=1)(Stuck).remote()
    ray_local.get(actor.pid.remote())  # started: killed before its start (a busy machine), its call went to the next
    cfg = RunConfig.model_validate({"learner": {"stall_timeout_s": 60}, "generation": {"hang_timeout_s": 2}})
    unused: Any = None  # the broker (no lease here), the reward book, timing and timeline: nothing is generated
    pool = GeneratorPool(cfg, Components(), LoopState(), RunStats(), unused, unused, unused, unused)
    pool.slots = [busy_slot(actor, silent_s=0.0, call=actor.generate.remote())]
    started = time.monotonic()
    pool.quiesce()
    assert time.monotonic() - started < 30 and not pool.slots[0].chunks and pool.slots[0].recovering


def test_the_end_counts_generators_restarts_from_rays_table_without_waiting_on_a_stopped_one(
        ray_local, capsys: pytest.CaptureFixture) -> None:
    # By hand: VinePPO's generators stopped as the last step was trained; the end's count of quiet restarts asked
    # each generator for its pid and waited on the stopped one until Ray gave up on it (6 minutes), then failed the
    # finished run; asked within its hang and restart limits, the run still ended 6 minutes late.
    stopped = ray_local.remote(num_cpus=0)(SlowGenerator).remote()
    restarting = ray_local.remote(num_cpus=0, max_restarts=1)(SlowStartGenerator).remote()
    dead = ray_local.remote(num_cpus=0, max_restarts=0)(SlowGenerator).remote()
    slots = [GeneratorSlot(handle, i) for i, handle in enumerate([stopped, restarting, dead])]
    for slot in slots:
        slot.pid = ray_local.get(slot.handle.info.remote())["pid"]
    os.kill(slots[0].pid, signal.SIGSTOP)
    for slot in slots[1:]:
        kill_seen_by_ray(slot.handle, slot.pid)  # the restarting one is 2 s in its __init__ again
    pool = pool_of(slots)
    pool.hangs = GeneratorHangs(pool, timeout_s=1.0, restart_limit_s=60.0)
    started = time.monotonic()
    GeneratorPool.count_quiet_restarts(pool)
    assert time.monotonic() - started < 30  # the 2 s restart, not the 60 s limit
    assert [slot.restarts for slot in slots] == [0, 1, 0]
    assert capsys.readouterr().err == (f"[async-rlhf] note: generator 2 was dead, or still restarting 60s after the "
                                       f"run's end (its log is under {ray_logs()}): its restarts are counted up to "
                                       "its last answer\n")
    os.kill(slots[0].pid, signal.SIGCONT)
    ray_local.kill(stopped)
    ray_local.kill(restarting)


def test_without_rays_table_the_end_asks_each_generator_within_its_limits(
        ray_local, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actor_table, "table", lambda: None)  # another Ray version's internals
    stopped = ray_local.remote(num_cpus=0)(StoppedGenerator).remote()
    restarted = ray_local.remote(num_cpus=0)(SlowGenerator).remote()
    ray_local.get([stopped.__ray_ready__.remote(), restarted.__ray_ready__.remote()])  # started: the 1 s is theirs
    slots = [GeneratorSlot(stopped, 0), GeneratorSlot(restarted, 1)]
    slots[1].pid = -1  # the process it had before: it answers from another one now
    pool = pool_of(slots)
    pool.hangs = GeneratorHangs(pool, timeout_s=1.0, restart_limit_s=2.0)
    GeneratorPool.count_quiet_restarts(pool)
    assert [slot.restarts for slot in slots] == [0, 1]
    assert capsys.readouterr().err.startswith("[async-rlhf] note: generator 0 did not answer within 2s of the run's "
                                              "end (stopped, hung or dead) (its log is under /tmp/ray/")
    ray_local.kill(stopped)
