"""EvalSchedule on stand-in actors (a slow generator, a scorer, a learner answering the KL): periodic
evaluations are sent without waiting and advanced by the loop's events, logged in version order, and
finished, kept due or dropped where a checkpoint or a failover needs it; their leases always come back."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from async_rlhf.cluster import actor_table
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.timeline import Timeline, read_timeline
from async_rlhf.pipeline.eval_schedule import EvalSchedule
from async_rlhf.pipeline.evaluation import Evaluator
from async_rlhf.pipeline.generators import GeneratorPool
from async_rlhf.pipeline.learner_calls import LearnerHung
from async_rlhf.pipeline.queue import RolloutQueue
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import Chunk, Components, GeneratorSlot, LoopState, RunStats
from async_rlhf.pipeline.timing import Timing
from async_rlhf.rollout import Completion, Prompt, RolloutGroup
from async_rlhf.weights.broker import SharedMemoryTransport, WeightSyncBroker
from tests.helpers import present, read_jsonl
from tests.standins import (
    SAMPLE_S,
    DiesInItsFirstScore,
    HungKLLearner,
    KLLearner,
    Scorer,
    SlowGenerator,
    SlowKLLearner,
    StoppedGenerator,
)


@pytest.fixture
def schedule(ray_local, tmp_path: Path):
    yield from make_schedule(ray_local, tmp_path, {"every": 2})


@pytest.fixture
def chunked(ray_local, tmp_path: Path):
    """Two eval prompts per generate call (4 prompts: two calls)."""
    yield from make_schedule(ray_local, tmp_path, {"every": 2, "chunk_prompts": 2})


@pytest.fixture
def slow_kl(ray_local, tmp_path: Path):
    """The learner's KL pass takes as long as a sample."""
    yield from make_schedule(ray_local, tmp_path, {"every": 2}, SlowKLLearner)


@pytest.fixture
def hung_kl(ray_local, tmp_path: Path):
    """The learner's KL pass never answers; learner.stall_timeout_s is 4 s (a generator's hang timeout 2 s)."""
    yield from make_schedule(ray_local, tmp_path, {"every": 2}, HungKLLearner, stall_timeout_s=4.0)


def make_schedule(ray_local, tmp_path: Path, eval_cfg: dict, learner: type = KLLearner, stall_timeout_s: float = 600,
                  generator: type = SlowGenerator, scorer: type = Scorer):
    cfg = RunConfig(eval=eval_cfg, learner={"steps": 10, "stall_timeout_s": stall_timeout_s}, api={"enabled": False},
                    task={"eval_prompts": 4},  # the Evaluator's, below
                    generation={"max_restarts": 0}, reward={"max_restarts": 1})  # as the actors below are made
    parts, state, stats, timeline = Components(), LoopState(), RunStats(), Timeline(tmp_path / "timeline.jsonl")
    parts.reward = ray_local.remote(num_cpus=0, max_restarts=1)(scorer).remote(str(tmp_path / "scored"))
    parts.learner = ray_local.remote(num_cpus=0)(learner).remote()
    run_dir = tmp_path / "run"  # the recorder's and eval_initial.json's
    run_dir.mkdir()
    parts.evaluator = Evaluator([Prompt(i, "p", [1, 2]) for i in range(4)], parts.reward, 1.0,
                                initial_path=run_dir / "eval_initial.json")
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=1, initial_version=-1)
    publish(broker, 0)  # the starting weights, as ComponentBuilder.build publishes them on shm
    rewards = RewardBook(cfg, parts, state, stats, RolloutQueue(16, 1), timeline)
    pool = GeneratorPool(cfg, parts, state, stats, broker, rewards, Timing(), timeline)
    pool.slots = [GeneratorSlot(ray_local.remote(num_cpus=0)(generator).remote(), 0)]
    evals = EvalSchedule(cfg, parts, pool, rewards, broker, Timing(), RunRecorder(run_dir), timeline)
    yield evals, broker
    timeline.close()
    broker.close()


def publish(broker: WeightSyncBroker, up_to: int) -> None:
    for version in range(broker.latest_version + 1, up_to + 1):
        broker.staging_location(version)  # the slot a learner would write (nothing is loaded here)
        broker.publish(version)


def loop_until_logged(evals: EvalSchedule) -> None:
    """The controller's part: feed generator 0 (idle here), wait on the evaluations' calls, hand each answer over."""
    import ray

    evals.feed()
    while refs := evals.refs():
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=10)
        assert ready, "an evaluation call never answered"
        evals.on_ready(refs[ready[0]])
        evals.feed()


def test_periodic_evaluations_run_beside_the_loop_and_log_in_version_order(schedule, tmp_path: Path) -> None:
    evals, broker = schedule
    publish(broker, 2)
    started = time.perf_counter()
    evals.after_step(2)
    publish(broker, 4)  # version 2 stays leased while its evaluation runs, though past keep_versions
    evals.after_step(4)
    evals.after_step(3)  # not due
    assert time.perf_counter() - started < SAMPLE_S  # sent, not awaited
    assert [f.version for f in evals.pending] == [2, 4]
    loop_until_logged(evals)
    records = evals.recorder.evals
    assert [r["version"] for r in records] == [2, 4] and [r["kl"] for r in records] == [0.25, 0.25]
    assert all(r["eval_blocking_s"] < 0.2 < SAMPLE_S <= r["eval_s"] for r in records), records
    assert evals.timing.get("eval_blocking_s") < 0.4 and evals.timing.get("eval_gen_s") == 2 * SAMPLE_S
    spans = [e for e in read_timeline(tmp_path / "timeline.jsonl") if e["kind"] == "eval"]
    assert [e["version"] for e in spans] == [2, 4] and all(e["end"] - e["start"] > SAMPLE_S - 0.01 for e in spans)
    broker.roll_back(4)  # raises while any version is still leased


def test_blocking_before_counts_only_the_loop_time_spent_before_the_evaluation_was_queued(schedule) -> None:
    """Versions 2 and 4 queued back to back, then waited for: the wait on 2 comes after 4's start, so it is not
    in 4's `eval_blocking_before_s`, and `wall_s` minus it (the training clock) does not go back in time."""
    evals, broker = schedule
    publish(broker, 2)
    evals.after_step(2)
    publish(broker, 4)
    evals.after_step(4)
    evals.drain()
    publish(broker, 6)
    evals.after_step(6)
    evals.drain()
    first, second, third = evals.recorder.evals
    assert first["eval_blocking_before_s"] == second["eval_blocking_before_s"] == 0.0
    assert first["eval_blocking_s"] >= SAMPLE_S  # the drain waited for the sample
    spent = first["eval_blocking_s"] + second["eval_blocking_s"]
    assert third["eval_blocking_before_s"] == pytest.approx(spent, abs=2e-3)
    clock = [r["wall_s"] - r["eval_blocking_before_s"] for r in (first, second, third)]
    assert all(b - a > -2e-3 for a, b in zip(clock, clock[1:])), clock


def test_version_0_is_evaluated_beside_the_first_steps_and_its_record_comes_first(schedule) -> None:
    evals, broker = schedule
    started = time.perf_counter()
    evals.start_initial()
    assert time.perf_counter() - started < SAMPLE_S and [f.version for f in evals.pending] == [0]  # sent, not awaited
    publish(broker, 2)  # the first steps go on; version 0 stays leased while it is evaluated
    evals.after_step(2)
    first, second = evals.pending
    while not second.done:  # the later one finishes first (as after a retry of version 0's)
        second.wait(10, 10)
    assert not first.done and not evals.recorder.evals
    loop_until_logged(evals)
    initial, later = evals.recorder.evals
    assert (initial["version"], initial["kl"], later["version"]) == (0, 0.0, 2)
    assert later["win_rate_vs_initial_n"] == 4  # made after version 0's: its paired win-rate has version 0's gold
    broker.roll_back(3)  # raises while any version is still leased


def test_a_run_directory_made_again_keeps_the_starting_policys_evaluation(schedule, tmp_path: Path) -> None:
    # Before: summary.json's initial_gold_reward was the first evaluation after the removal, and a later resume had
    # no eval_initial.json to pair its win-rate against.
    evals, broker = schedule
    run_dir = tmp_path / "run"
    evals.recorder.keeper.settle()
    evals.start_initial()
    loop_until_logged(evals)
    shutil.rmtree(run_dir)  # an `rm -rf` of the wrong directory
    publish(broker, 2)
    evals.after_step(2)
    loop_until_logged(evals)
    assert [r["version"] for r in read_jsonl(run_dir / "eval.jsonl")] == [0, 2]
    assert [r["version"] for r in evals.recorder.evals] == [0, 2]  # the summary's initial_gold_reward is version 0's
    assert json.loads((run_dir / "eval_initial.json").read_text()).keys() == {"0", "1", "2", "3"}


def test_chunks_are_fed_only_to_an_idle_generator_one_at_a_time(chunked, ray_local, tmp_path: Path) -> None:
    evals, broker = chunked
    publish(broker, 2)
    evals.after_step(2)
    slot = evals.pool.slots[0]
    slot.chunks.append(Chunk(ray_local.put(None), [], None))  # a training batch holds generator 0
    evals.feed()
    assert evals.refs() == {}  # nothing sent behind it
    slot.chunks.clear()
    evals.feed()
    evals.feed()
    assert len(evals.refs()) == 1  # the first chunk only: a batch issued now waits behind one chunk at most
    loop_until_logged(evals)
    [record] = evals.recorder.evals
    assert record["win_rate_vs_initial_n"] == 0 and record["eval_gen_s"] == 2 * SAMPLE_S  # both chunks' time
    assert record["eval_s"] >= 2 * SAMPLE_S and record["gold_reward"] == 1.0
    spans = [e for e in read_timeline(tmp_path / "timeline.jsonl") if e["kind"] == "eval"]
    assert len(spans) == 2 and spans[0]["end"] <= spans[1]["start"]  # one bar per chunk, one after the other
    broker.roll_back(2)  # raises while any version is still leased


def test_an_evaluation_kept_waiting_by_a_busy_generator_sends_the_rest_as_one_call(chunked, ray_local) -> None:
    evals, broker = chunked
    publish(broker, 2)
    evals.after_step(2)
    slot = evals.pool.slots[0]
    slot.chunks.append(Chunk(ray_local.put(None), [], None))  # a generation-bound run: never idle
    slot.batches_sent += 2 * evals.pool.depth - 1
    evals.feed()
    assert evals.refs() == {}
    slot.batches_sent += 1
    evals.feed()
    [flight] = evals.pending
    assert len(evals.refs()) == 1 and not flight.unsent  # all 4 prompts in one call, queued behind the batch
    loop_until_logged(evals)
    assert evals.recorder.evals[0]["eval_gen_s"] == SAMPLE_S


def test_the_final_evaluation_samples_while_a_pending_one_runs_its_kl_pass(slow_kl, tmp_path: Path) -> None:
    evals, broker = slow_kl
    publish(broker, 2)
    evals.after_step(2)  # pending when the loop ends
    publish(broker, 4)
    evals.final()
    older, final = evals.recorder.evals
    assert (older["version"], final["version"]) == (2, 4) and older["kl"] == final["kl"] == 0.25
    assert final["wall_s"] < older["wall_s"] + older["eval_s"]  # queued before version 2's record was made
    spans = {e["version"]: e for e in read_timeline(tmp_path / "timeline.jsonl") if e["kind"] == "eval"}
    # sampled on generator 0 right behind version 2's sample, while the learner ran version 2's KL pass
    assert spans[4]["start"] - spans[2]["end"] < SAMPLE_S / 2, spans


def test_a_checkpoint_finishes_older_evaluations_and_keeps_its_own_due(schedule) -> None:
    evals, broker = schedule
    publish(broker, 2)
    evals.after_step(2)
    publish(broker, 4)
    evals.after_step(4)
    evals.drain(before=4)  # what take_checkpoints does at version 4
    assert [r["version"] for r in evals.recorder.evals] == [2] and evals.due() == [4]
    evals.abandon()  # a failover: the pending one is dropped, unlogged, its lease returned
    assert evals.due() == [] and [r["version"] for r in evals.recorder.evals] == [2]
    broker.roll_back(4)
    publish(broker, 4)
    evals.start(4)  # the restore sends the checkpoint's due evaluation again
    evals.drain()
    assert [r["version"] for r in evals.recorder.evals] == [2, 4]


def test_the_last_steps_evaluation_is_due_at_a_checkpoint_there_and_is_the_final_one(schedule) -> None:
    # Before: the last step's periodic evaluation was left to the final one, so a checkpoint at the last step did
    # not hold it as due, and a run resumed from it with more steps never evaluated that version.
    evals, broker = schedule
    publish(broker, 10)  # learner.steps=10, eval.every=2
    evals.after_step(10)
    evals.drain(before=10)  # what take_checkpoints does at version 10
    assert evals.due() == [10]
    assert evals.final()["version"] == 10 and [r["version"] for r in evals.recorder.evals] == [10]  # made once


@pytest.fixture
def reward_dies_beside_a_stopped_generator(ray_local, tmp_path: Path):
    yield from make_schedule(ray_local, tmp_path, {"every": 2}, generator=StoppedGenerator, scorer=DiesInItsFirstScore)


@pytest.mark.timeout(120, method="thread")  # without the fix the drain waits on generator 0's probe for good
def test_a_reward_actor_that_dies_in_an_awaited_evaluation_is_awaited_alone(reward_dies_beside_a_stopped_generator,
                                                                             ray_local) -> None:
    # Before: the evaluation waited for generator 0 to come back whichever actor had died, with a probe that had no
    # bound: a reward actor killed as hung while generator 0 was stopped (a chaos run by hand) held the run for good.
    evals, broker = reward_dies_beside_a_stopped_generator
    publish(broker, 2)
    evals.after_step(2)
    evals.drain()  # what take_checkpoints does
    assert [r["version"] for r in evals.recorder.evals] == [2] and evals.rewards.stats.reward_restarts == 1


def test_a_generator_that_never_answers_its_probe_is_not_back_within_its_bound(reward_dies_beside_a_stopped_generator,
                                                                              ray_local) -> None:
    evals, _ = reward_dies_beside_a_stopped_generator
    evals.pool.hangs.restart_limit_s = 2.0
    started = time.monotonic()
    with pytest.raises(RunError, match=r"^generator 0 did not come back within 2s of its death"):
        evals.pool.await_restart(evals.pool.slots[0])
    assert time.monotonic() - started < 10


def test_a_generator_stopped_while_its_restart_is_awaited_is_killed_and_awaited_again(
        reward_dies_beside_a_stopped_generator, ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a process that Ray had alive but that never answered the probe (stopped, hung) was waited on for the
    # restart's whole bound, then ended the run as one that "did not come back". The kill and Ray's restart of a
    # stopped generator are real in tests/test_generator_hangs.py; here the kill is recorded, so nothing restarts.
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.generator_hangs.ray.kill", lambda handle, **_: killed.append(handle))
    evals, _ = reward_dies_beside_a_stopped_generator  # generator 0's info() never answers
    slot = evals.pool.slots[0]
    ray_local.get(slot.handle.__ray_ready__.remote())
    slot.pid = present(actor_table.record(present(actor_table.table()), slot.handle)).pid  # it answered from it
    evals.pool.hangs.timeout_s, evals.pool.hangs.restart_limit_s = 1.0, 3.0
    started = time.monotonic()
    with pytest.raises(RunError, match=r"^generator 0 did not come back within 3s of its death"):
        evals.pool.await_restart(slot)
    assert killed == [slot.handle] and time.monotonic() - started > 4.0  # killed after 1 s, then 3 s more
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call


def test_a_learner_silent_in_an_awaited_kl_pass_is_hung_after_the_stall_timeout(hung_kl, ray_local) -> None:
    # Before: a checkpoint's drain waited the stall timeout per training call's worth of eval prompts (240 s under a
    # 30 s timeout for the quickstart's), then ended the run; LearnerHung has the loop replace the learner instead.
    evals, broker = hung_kl
    parts = evals.parts
    ray_local.get([evals.pool.slots[0].handle.info.remote(), parts.reward.health.remote(),
                   parts.learner.__ray_ready__.remote()])  # started: a start is no hang
    publish(broker, 2)
    evals.after_step(2)
    started = time.monotonic()
    with pytest.raises(LearnerHung, match=r"^the learner answered nothing for 4s while taking version 2's evaluation "
                                          r"KL pass \(learner\.stall_timeout_s=4; its log is under "):
        evals.drain(before=4)  # what take_checkpoints does at version 4
    assert time.monotonic() - started < 4.0 + 2 * SAMPLE_S + 5
    ray_local.kill(evals.parts.learner)


@pytest.mark.parametrize("start_is_reference, version, expected", [(True, 0, 0.0), (True, 3, 0.25),
                                                                     (False, 0, 0.25)])
def test_the_starting_policy_s_kl_is_zero_without_a_reference_pass(ray_local, start_is_reference: bool,
                                                                   version: int, expected: float) -> None:
    """Version 0 is the reference unless model.reference_path names another model: the learner is not asked."""
    learner = ray_local.remote(num_cpus=0)(KLLearner).remote()
    evaluator = Evaluator([Prompt(0, "p", [1, 2])], None, 1.0, start_is_reference=start_is_reference)
    groups = [RolloutGroup(Prompt(0, "p", [1, 2]), [Completion([5], "5", [-0.5], "stop")], version, 0, time.time())]
    assert ray_local.get(evaluator.kl(learner, groups)) == expected


def test_only_the_reward_actors_own_death_sends_its_batches_out_again(schedule) -> None:
    """An evaluation that meets generator 0's death asks the reward book about it; the batches being scored go
    out again only when it was the reward actor that died (an earlier quiet restart of the reward actor is
    still counted, by the run's end, without regenerating calls its new process answers)."""
    from ray.exceptions import RayActorError

    evals, _ = schedule
    reward = evals.rewards.parts.reward._actor_id.hex()
    generator = evals.pool.slots[0].handle._actor_id.hex()
    assert evals.rewards.is_its_death(RayActorError(actor_id=reward))
    assert evals.rewards.is_its_death(RayActorError())  # Ray did not say which: the safe side
    assert not evals.rewards.is_its_death(RayActorError(actor_id=generator))
