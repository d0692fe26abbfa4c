"""Learner failover's decisions, on real Ray actors and a real checkpoint store (the whole path, with a
SIGKILLed learner, is in tests/test_faults.py)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from async_rlhf.checkpoint.store import Checkpoint, CheckpointStore
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.failures import RunError
from async_rlhf.pipeline.failover import LearnerFailover, checkpoint_to_restart_from, learner_alive
from async_rlhf.pipeline.learner_calls import LearnerHung, learner_answer
from async_rlhf.pipeline.queue import QueueCounters
from async_rlhf.pipeline.resume import ControllerSnapshot
from async_rlhf.pipeline.timing import Timing
from learners.group import LearnerGroup
from tests.standins import FailsToStart, Pingable, SlowLearner


def controller(tmp_path: Path, restarts: int = 0, limit: int = 2) -> SimpleNamespace:
    """What the decision reads: the checkpoints, the restarts so far and their limit, the step the learner died at."""
    return SimpleNamespace(checkpoints=CheckpointStore(tmp_path / "checkpoints", keep_last=2), restarts=restarts,
                           limit=limit, step=7)


def restart_from(c: SimpleNamespace, exc: BaseException, start: ControllerSnapshot | None = None):
    return checkpoint_to_restart_from(c.checkpoints, c.restarts, c.limit, c.step, exc, start)


def step_zero() -> ControllerSnapshot:
    """A fresh run's starting point (resume.starting_point): what matters here is only that there is one."""
    return ControllerSnapshot(step=0, next_prompt=0, queued=[], reissue=[], queue_counters=QueueCounters(),
                              max_staleness=1, reward_counts={}, nonfinite_total=0, nonfinite_run=0, restarts=[0],
                              timing={}, metrics_lines=0, eval_lines=0, rng={}, evals_due=[0])


def test_a_killed_actor_is_dead_and_a_live_one_alive(ray_local) -> None:
    actor = ray_local.remote(Pingable).options(num_cpus=0).remote()
    assert learner_alive(actor)
    ray_local.kill(actor)
    # ray.kill only asks the GCS; a ping sent before the kill lands is still answered (as in failover, where
    # a call has already failed with ActorDiedError before the probe), so the probe must turn False soon.
    deadline = time.monotonic() + 60
    while learner_alive(actor) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not learner_alive(actor)


def test_without_a_checkpoint_or_its_start_the_run_stops_saying_to_set_checkpoint_every(tmp_path: Path) -> None:
    # A resumed run has no starting point of its own: the checkpoint it resumed from is that
    with pytest.raises(RunError, match=r"died at step 7 \(RuntimeError: learner gone\) and the run has no checkpoint "
                                       r".* set checkpoint\.every"):
        restart_from(controller(tmp_path), RuntimeError("learner gone"))


def test_a_fresh_run_without_a_checkpoint_yet_restarts_from_its_start_and_later_from_its_checkpoint(
        tmp_path: Path) -> None:
    c, start = controller(tmp_path), step_zero()
    assert restart_from(c, RuntimeError(), start) is start
    c.checkpoints.write(5, lambda d: (d / "x").write_text("x"))
    point = restart_from(c, RuntimeError(), start)
    assert isinstance(point, Checkpoint) and point.step == 5
    c.restarts = c.limit  # past max_restarts the start is no way on either
    death = RuntimeError("learner gone")
    with pytest.raises(RuntimeError) as caught:
        restart_from(c, death, start)
    assert caught.value is death


def test_past_max_restarts_the_death_itself_ends_the_run(tmp_path: Path) -> None:
    c = controller(tmp_path, restarts=2, limit=2)
    c.checkpoints.write(5, lambda d: (d / "x").write_text("x"))
    death = RuntimeError("learner gone")
    with pytest.raises(RuntimeError) as caught:
        restart_from(c, death)
    assert caught.value is death  # the CLI turns it into the one line with --resume


def test_the_newest_valid_checkpoint_is_the_one_restarted_from(tmp_path: Path) -> None:
    c = controller(tmp_path)
    for step in (5, 10):
        c.checkpoints.write(step, lambda d: (d / "x").write_text("x"))
    (c.checkpoints.path_for(10) / "x").write_text("damaged")
    assert restart_from(c, RuntimeError()).step == 5


def test_a_rollback_keeps_the_wall_clock_of_open_spans() -> None:
    timing = Timing()
    timing.add("gen_busy_s", 9.0)
    with timing.span("loop_s"):
        timing.roll_back({"gen_busy_s": 4.0, "loop_s": 123.0})
        assert timing.get("gen_busy_s") == 4.0 and timing.get("loop_s") == 0.0  # the open span still measures
    assert 0.0 <= timing.get("loop_s") < 5.0


def test_a_timed_out_weight_push_replaces_the_learner_only_on_pushed_transports() -> None:
    import ray

    from async_rlhf.pipeline.failover import push_timed_out
    from async_rlhf.weights.nccl import WeightSyncTimeout

    # What ray.get raises in the controller when the learner's push gave up (a generator died mid-broadcast).
    timed_out = ray.exceptions.RayTaskError("Learner.save_weights", "traceback", WeightSyncTimeout("push of v3"))
    assert push_timed_out(timed_out, "nccl") and push_timed_out(timed_out, "ipc")
    assert not push_timed_out(timed_out, "shm")  # no push there: whatever it is, it ends the run
    other = ray.exceptions.RayTaskError("Learner.train_step", "traceback", ValueError("a bug"))
    assert not push_timed_out(other, "nccl") and not push_timed_out(WeightSyncTimeout("rendezvous"), "nccl")


def failover_of(tmp_path: Path, learner: Any, in_flight: bool, restarts: int,
                checkpoint: bool | str) -> LearnerFailover:
    """What `kill_hung` reads: the learner, whether a step is in flight, the restarts so far, the checkpoints (or
    "start": none, but the run's starting point)."""
    checkpoints = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    if checkpoint is True:
        checkpoints.write(5, lambda d: (d / "x").write_text("x"))
    cfg = RunConfig.model_validate({"learner": {"max_restarts": 2, "stall_timeout_s": 30}})
    parts = SimpleNamespace(learner=learner)
    state = SimpleNamespace(learner_job=object() if in_flight else None, steps_taken=7)
    unused: Any = None  # the replacement itself (fail_over) is tests/test_faults.py's
    failover = LearnerFailover(cfg, checkpoints, cast(Any, parts), cast(Any, state),
                               cast(Any, SimpleNamespace(learner_restarts=restarts)), *[unused] * 6)
    failover.start = step_zero() if checkpoint == "start" else None
    return failover


@pytest.mark.parametrize(("in_flight", "restarts", "checkpoint", "killed"), [
    (True, 0, True, True),  # hung in its step: killed, and the loop's next look at the step fails over
    (False, 0, True, False),  # nothing to train: the stall is elsewhere (generators), and ends the run
    (True, 2, True, False),  # restarts used up
    (True, 0, False, False),  # nothing to replace it from (a resumed run's checkpoints all damaged)
    (True, 0, "start", True),  # a fresh run before its first checkpoint: replaced from its start
])
def test_a_hung_learner_is_killed_only_where_failover_can_replace_it(ray_local, tmp_path: Path, in_flight: bool,
                                                                     restarts: int, checkpoint: bool | str,
                                                                     killed: bool) -> None:
    actor = ray_local.remote(Pingable).options(num_cpus=0).remote()
    assert failover_of(tmp_path, actor, in_flight, restarts, checkpoint).kill_hung(31.0) is killed
    assert all_dead_within([actor], 60 if killed else 0) is killed


def all_dead_within(actors: list, seconds: float) -> bool:
    """Whether every actor is gone within `seconds` (ray.kill only asks the GCS)."""
    deadline = time.monotonic() + seconds
    while any(learner_alive(a) for a in actors) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(learner_alive(a) for a in actors)


def test_a_hung_learner_of_two_ranks_is_killed_rank_by_rank(ray_local, tmp_path: Path) -> None:
    """Found by hand: a rank SIGSTOPped in a 2-rank run ended it with "ray.kill() only supported for actors ... Got:
    <class 'learners.group.LearnerGroup'>" instead of a failover. Both ranks go, so the step in flight fails."""
    ranks = [ray_local.remote(Pingable).options(num_cpus=0).remote() for _ in range(2)]
    group = LearnerGroup(ranks, pg=None, answers=None)
    assert failover_of(tmp_path, group, True, 0, True).kill_hung(31.0) is True
    assert all_dead_within(ranks, 60)


def test_a_call_the_learner_does_not_answer_within_the_stall_timeout_raises_learner_hung(ray_local) -> None:
    slow = ray_local.remote(SlowLearner).options(num_cpus=0).remote(30.0)
    started = time.monotonic()
    with pytest.raises(LearnerHung, match=r"^the learner answered nothing for 0\.5s while saving a checkpoint "
                                          r"\(learner\.stall_timeout_s=0\.5; its log is under /tmp/ray/"):
        learner_answer(slow.save_pretrained.remote("x"), "saving a checkpoint", 0.5)
    assert time.monotonic() - started < 10
    quick = ray_local.remote(SlowLearner).options(num_cpus=0).remote(0.0)
    assert learner_answer(quick.save_pretrained.remote("x"), "saving a checkpoint", 30.0) == "x"


class Replacing(Exception):
    """Raised where failover goes on to replace the learner (its first step after the kill)."""


@pytest.mark.parametrize(("restarts", "checkpoint", "replaced"),
                         [(0, True, True), (2, True, False), (0, False, False), (0, "start", True)])
def test_a_learner_that_answered_nothing_is_killed_and_replaced_only_where_it_can_be(
        ray_local, tmp_path: Path, restarts: int, checkpoint: bool | str, replaced: bool) -> None:
    actor = ray_local.remote(Pingable).options(num_cpus=0).remote()
    failover = failover_of(tmp_path, actor, False, restarts, checkpoint)  # hung between steps: none in flight
    failover.evals = cast(Any, SimpleNamespace(abandon=lambda: (_ for _ in ()).throw(Replacing())))
    hung = LearnerHung("the learner answered nothing for 30s while saving a checkpoint")
    with pytest.raises(Replacing if replaced else LearnerHung) as caught:
        failover.fail_over(hung)
    assert replaced or caught.value is hung  # the CLI gives it as the run's one line, with --resume where it can
    assert all_dead_within([actor], 60 if replaced else 0) is replaced


def error_of(ray_module: Any, ref: Any) -> BaseException:
    try:
        ray_module.get(ref)
    except ray_module.exceptions.RayActorError as exc:
        return exc
    raise AssertionError("the call answered")


def test_a_learner_lost_at_start_up_is_started_again_unless_its_own_start_raised(
        ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a learner SIGKILLed in its start, before version 0's publish or while a resumed run loaded its
    # checkpoint ended the run as a failed start-up ("start it again").
    from async_rlhf.pipeline.builder import ComponentBuilder
    from async_rlhf.pipeline.state import Components, RunStats
    from tests.helpers import QUICKSTART

    cfg = load_config(QUICKSTART, ["learner.max_restarts=2"], environment=False)
    builder = ComponentBuilder(cfg, tmp_path, Components(), cast(Any, None), tmp_path, RunStats())
    pingable = ray_local.remote(Pingable).options(num_cpus=0)
    started: list[Any] = []
    monkeypatch.setattr(builder, "replace_learner", lambda: started.append(pingable.remote()))
    dead = pingable.remote()
    ray_local.kill(dead)
    died = error_of(ray_local, dead.ping.remote())
    faults: list[BaseException] = [died, LearnerHung("the learner answered nothing for 5s while publishing weights")]
    tries: list[int] = []

    def publish() -> None:  # dies in the first try, hangs in the second, then answers
        tries.append(1)
        if faults:
            raise faults.pop(0)

    builder.with_learner(publish)
    assert len(tries) == 3 and builder.stats.learner_restarts == 2 and len(started) == 2
    with pytest.raises(type(died)):  # learner.max_restarts used up
        builder.with_learner(lambda: None, died)
    builder.stats.learner_restarts = 0
    bad = ray_local.remote(FailsToStart).options(num_cpus=0).remote()
    with pytest.raises(ray_local.exceptions.RayActorError, match="raised in its creation task"):
        builder.with_learner(lambda: None, error_of(ray_local, bad.__ray_ready__.remote()))  # it would raise again
    assert len(started) == 2


def test_a_new_learner_hung_in_its_start_is_killed_and_started_again_within_max_restarts(
        ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a replacement learner past its restart's bound (stopped or hung in __init__) ended the run.
    from async_rlhf.pipeline.builder import ComponentBuilder
    from async_rlhf.pipeline.state import Components, RunStats
    from tests.helpers import QUICKSTART

    cfg = load_config(QUICKSTART, ["learner.max_restarts=2"], environment=False)
    builder = ComponentBuilder(cfg, tmp_path, Components(), cast(Any, None), tmp_path, RunStats())
    builder.learner_restart_s = 1.5
    starts = [ray_local.remote(SleepsInStart).options(num_cpus=0), ray_local.remote(Pingable).options(num_cpus=0)]
    started: list[Any] = []

    def start_learner() -> None:
        started.append(starts[min(len(started), 1)].remote())
        builder.parts.learner = started[-1]

    monkeypatch.setattr(builder, "start_learner", start_learner)
    builder.parts.learner = ray_local.remote(Pingable).options(num_cpus=0).remote()
    died = error_of(ray_local, killed(ray_local, builder.parts.learner).ping.remote())
    builder.with_learner(lambda: None, died)  # dead: a new one, hung in its start: killed, and a third one up
    assert builder.stats.learner_restarts == 2 and len(started) == 2
    assert all_dead_within(started[:1], 30) and ray_local.get(started[1].ping.remote()) == 1
    assert ("the learner failed while starting (the new learner did not start within 1.5s (learner.stall_timeout_s"
            in capsys.readouterr().err)  # the run's own words, not a type name
    builder.stats.learner_restarts, starts[1] = 1, starts[0]  # past learner.max_restarts the hung start ends the run
    with pytest.raises(LearnerHung, match=r"^the new learner did not start within 1.5s \(learner.stall_timeout_s"):
        builder.with_learner(lambda: None, died)
    ray_local.kill(builder.parts.learner)


def killed(ray_module: Any, actor: Any) -> Any:
    ray_module.kill(actor)
    return actor


class SleepsInStart:
    """A learner whose start never ends (a model load that hangs, a process stopped in its `__init__`)."""

    def __init__(self) -> None:
        time.sleep(3600)
