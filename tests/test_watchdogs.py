"""The stall watchdog: a learner that finishes no step for learner.stall_timeout_s ends the run with the reason,
but time the run was paused, or the driver itself frozen (Ctrl-Z then fg, SIGSTOP, a paused container), is not
the learner's stall. Found by hand: a driver stopped for 40 s with a 20 s timeout died on `fg` with "no learner
step finished for 40s ... in flight: nothing"."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from async_rlhf.cluster.local_ray import GCS_PATIENCE_ENV, GcsWatch, RayLost
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.state import LearnerJob, LoopState
from async_rlhf.pipeline.watchdogs import TIED_STEPS, Watchdogs
from tests.helpers import make_group


def watchdogs(timeout_s: float) -> tuple[Watchdogs, LoopState, RunControl]:
    cfg = RunConfig.model_validate({"learner": {"stall_timeout_s": timeout_s}})
    state, control = LoopState(), RunControl()
    generator = SimpleNamespace(generator_id=0, busy=True, chunks=[[1], [2]])
    hangs = SimpleNamespace(check=lambda: None)  # tests/test_generator_hangs.py
    pool: Any = SimpleNamespace(slots=[generator], hangs=hangs, recovering=lambda: False)
    dogs = Watchdogs(cfg, state, control, pool, [], lambda: None, lambda: "sort_partial")  # type: ignore[arg-type]
    return dogs, state, control


def test_a_learner_silent_past_the_timeout_ends_the_run_naming_what_is_in_flight() -> None:
    dogs, state, _ = watchdogs(timeout_s=5)
    state.last_progress = live_clock.now() - 4
    dogs.check_stall()  # within the timeout
    state.last_progress = live_clock.now() - 6
    with pytest.raises(RunError, match=r"^no learner step finished for 6s \(learner.stall_timeout_s=5\); in flight: "
                                       r"generator 0 \(2 chunk\(s\)\), queue depth 0"):
        dogs.check_stall()


def test_a_stalled_learner_that_can_be_replaced_is_killed_instead_of_ending_the_run() -> None:
    dogs, state, _ = watchdogs(timeout_s=5)
    asked: list[float] = []

    def killed(idle_s: float) -> bool:  # killed: the loop fails over to a new learner
        asked.append(idle_s)
        return True

    dogs.kill_hung_learner = killed
    state.last_progress = live_clock.now() - 6
    dogs.check_stall()
    assert [round(s) for s in asked] == [6] and live_clock.now() - state.last_progress < 1  # the new learner's clock
    dogs.kill_hung_learner = lambda idle_s: False  # no checkpoint, or restarts used up: the stall ends the run
    state.last_progress = live_clock.now() - 6
    with pytest.raises(RunError, match="^no learner step finished for 6s"):
        dogs.check_stall()


def test_a_learner_step_sent_or_finished_while_the_driver_was_held_elsewhere_is_no_stall(ray_local: Any) -> None:
    # Before: a checkpoint's drain of an evaluation, held 30 s by a reward actor that hung, left the stall clock at
    # the last step; the step sent right after it was taken for a hung learner, and a healthy learner was killed.
    dogs, state, _ = watchdogs(timeout_s=5)
    asked: list[float] = []

    def killed(idle_s: float) -> bool:
        asked.append(idle_s)
        return True

    dogs.kill_hung_learner = killed

    @ray_local.remote(num_cpus=0)
    def working(seconds: float) -> int:
        time.sleep(seconds)
        return 1

    running, done = working.remote(60), ray_local.put(1)
    state.learner_job = LearnerJob(None, running, [], 8, live_clock.now() - 1)  # sent 1 s ago
    state.last_progress = live_clock.now() - 40
    dogs.check_stall()
    assert asked == [] and live_clock.now() - state.last_progress == pytest.approx(1, abs=0.5)
    state.learner_job = LearnerJob(None, done, [], 8, live_clock.now() - 40)  # done, not yet handled
    state.last_progress = live_clock.now() - 40
    dogs.check_stall()
    assert asked == []
    state.learner_job = LearnerJob(None, running, [], 8, live_clock.now() - 6)  # working for 6 s: hung
    state.last_progress = live_clock.now() - 40
    dogs.check_stall()
    assert [round(s) for s in asked] == [6]
    ray_local.cancel(running, force=True)


def test_time_the_driver_was_frozen_or_the_run_paused_is_not_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    dogs, state, control = watchdogs(timeout_s=5)
    state.last_progress = live_clock.now() - 42
    frozen_after = live_clock.now() - 40  # 40 s of it frozen (Ctrl-Z): 2 s of the learner's own
    monkeypatch.setattr("async_rlhf.pipeline.live_clock.now", lambda: frozen_after)
    dogs.check_stall()
    monkeypatch.undo()
    control.pause()
    state.last_progress = live_clock.now() - 60
    dogs.check_stall()
    control.resume()
    dogs.check_stall()  # the pause restarted the clock


def test_steps_whose_every_group_scored_alike_are_said_once(capsys: pytest.CaptureFixture) -> None:
    # A constant reward: online DPO found no pair and made no update, step after step, and said nothing.
    dogs, _, _ = watchdogs(timeout_s=5)
    tied = [make_group(1, (0.5, 0.5, 0.5, 0.5), prompt_id=i) for i in range(3)] + [make_group(1, (None, None))]
    for _ in range(TIED_STEPS - 1):
        dogs.check_signal(tied)
    dogs.check_signal([make_group(1, (0.5,))])  # nothing to compare (one sample per prompt): neither
    for _ in range(3 * TIED_STEPS):
        dogs.check_signal(tied)
    err = capsys.readouterr().err
    assert err.count("[async-rlhf]") == 1 and err.startswith(
        f"[async-rlhf] warning: {TIED_STEPS} learner steps in a row had no reward signal: each prompt's 4 completions "
        "got one same reward (e.g. 0.5), so online_dpo learns nothing from them. Check that the reward (sort_partial) "
        "tells completions apart, or make them differ more (generation.temperature, generation.samples_per_prompt)")


def test_a_policy_that_ties_after_the_reward_told_completions_apart_is_noted_as_having_learned_the_task(
        capsys: pytest.CaptureFixture) -> None:
    # Found in a 3000-step quickstart: every completion right (reward 1) read as "check the reward".
    dogs, state, _ = watchdogs(timeout_s=5)
    dogs.check_signal([make_group(1, (0.5, 0.5)), make_group(1, (1.0, 0.0))])  # one group that differs: a signal
    for _ in range(TIED_STEPS):
        dogs.check_signal([make_group(1, (1.0, 1.0))])
    assert state.reward_signal_seen and capsys.readouterr().err == (
        f"[async-rlhf] note: {TIED_STEPS} learner steps in a row had no reward signal: each prompt's 4 completions got "
        "one same reward (e.g. 1), so online_dpo learns nothing from them; if 1 is the best reward, the policy has "
        "learned the task (more steps only cost time)\n")


def test_a_batch_whose_train_rewards_partly_failed_is_said_once(capsys: pytest.CaptureFixture) -> None:
    # A reward function of the user's that raises on some inputs: the rest trained, silently.
    dogs, state, _ = watchdogs(timeout_s=5)
    dogs.check_rewarded([make_group(1, (0.5, 1.0))])  # all rewarded: nothing to say
    partly = [make_group(1, (0.5, None, None)), make_group(1, (1.0, 0.0))]
    partly[0].completions[1].reward_error = "KeyError: 'reference'"
    for _ in range(3):
        dogs.check_rewarded(partly)
    assert state.unrewarded_run == 0 and capsys.readouterr().err == (
        "[async-rlhf] warning: the train reward (sort_partial) failed for 2 of 5 completions of a batch, the first "
        "because: KeyError: 'reference'; they are not trained on (counted in /queue and summary.json as "
        "failed_reward); the run goes on\n")


def test_a_lost_gcs_stops_the_run_as_a_sigterm_does_and_raises_ray_lost_naming_its_checkpoint() -> None:
    # The watch's own detection runs against a real GCS killed mid-run (tests/test_driver_exit.py); here a stand-in
    # for it, since killing this test process's GCS would end every later test's Ray.
    dogs, _, control = watchdogs(timeout_s=60)
    watch = SimpleNamespace(lost=False, close=lambda: None)
    dogs.gcs = watch  # type: ignore[assignment]
    dogs.check_ray()
    dogs.raise_if_ray_lost()  # nothing lost: no stop, no error
    assert not control.stop_requested and not control.take_checkpoint_requests()
    watch.lost = True
    dogs.check_ray()
    dogs.check_ray()  # said and asked for once
    assert control.stop_requested
    (served,) = control.take_checkpoint_requests()
    served.set_result({"path": "/runs/x/checkpoints/step-000041"})
    with pytest.raises(RayLost, match=r"^Ray's GCS stopped answering \(.*\); checkpoint: "
                                      r"/runs/x/checkpoints/step-000041$"):
        dogs.raise_if_ray_lost()


def test_the_gcs_watch_keeps_quiet_while_a_real_gcs_answers(ray_local: Any) -> None:
    watch = GcsWatch(tick_s=0.05)
    try:
        time.sleep(0.5)  # ten asks
        assert watch.thread.is_alive() and watch.missed == 0 and not watch.lost
    finally:
        watch.close()
    assert not watch.thread.is_alive()


@pytest.mark.parametrize(("ray_wait", "misses"), [(None, 3), ("60", 3), ("10", 3), ("120", 6), ("600", 30), ("x", 3)])
def test_the_gcs_watch_is_as_patient_as_ray_is_told_to_be(ray_wait: str | None, misses: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A fifth of Ray's own wait for a lost GCS, in asks of 2 + 2 s: a cluster with GCS fault tolerance raises it.
    if ray_wait is None:
        monkeypatch.delenv(GCS_PATIENCE_ENV, raising=False)
    else:
        monkeypatch.setenv(GCS_PATIENCE_ENV, ray_wait)
    watch = GcsWatch()
    watch.close()
    assert watch.misses == misses


def test_the_learner_idle_behind_an_evaluations_sample_call_is_not_a_stall() -> None:
    # Before: a 16384-prompt evaluation holding generator 0 ended a run under a 4 s stall timeout.
    dogs, state, _ = watchdogs(timeout_s=5)
    dogs.evaluating = lambda: True  # generator 0's hang check bounds that call (size_factor)
    state.last_progress = live_clock.now() - 60
    dogs.check_stall()
    dogs.evaluating = lambda: False
    dogs.check_stall()  # the clock restarted when the call was in flight
    assert live_clock.now() - state.last_progress < 1


def test_a_call_bigger_than_a_training_call_gets_that_many_timeouts() -> None:
    cfg = RunConfig.model_validate({"generation": {"prompts_per_step": 16, "num_generators": 2}})
    assert (cfg.chunk_prompts, cfg.chunk_samples) == (8, 32)  # 16 prompts on 2 generators, 4 samples each
    # In samples (an evaluation samples each prompt once): before, in prompts, 128 eval prompts were 16 calls, not 4
    assert [cfg.size_factor(n) for n in (0, 32, 48, 128, 16384)] == [1.0, 1.0, 1.5, 4.0, 512.0]
    # The learner's calls by the samples of a step: 16 prompts x 4 samples (the default) per step, on every generator
    assert [cfg.step_factor(n) for n in (0, 64, 128, 16384)] == [1.0, 1.0, 2.0, 256.0]
