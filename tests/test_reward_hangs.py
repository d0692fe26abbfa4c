"""A reward actor that hangs (pipeline/rewards.py RewardBook.check_hang): which silences are hangs, and that the
hung actor is killed, restarted by Ray and its batches generated again.

A stand-in actor holds the RewardService's place (its `score` never answers; the real one's scorers answer in
milliseconds, so it cannot be made to hang but by a signal); the kill and Ray's restart of it are real.
tests/test_faults.py stops the real reward actor of a real run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from actors.generation_result import GenerationResult
from async_rlhf.cluster import actor_table
from async_rlhf.config.run import RunConfig
from async_rlhf.failures import RunError
from async_rlhf.pipeline import live_clock
from async_rlhf.pipeline.generator_hangs import HANG_FACTOR
from async_rlhf.pipeline.rewards import RewardBook
from async_rlhf.pipeline.state import LoopState, RunStats
from async_rlhf.rollout import Prompt, RolloutGroup
from tests.helpers import kill_seen_by_ray, present
from tests.standins import StartsStuck, StuckReward


def book_of(actor: Any, stall_timeout_s: float = 20.0, reward: dict | None = None) -> RewardBook:
    """A RewardBook of a run whose hang timeout is half its stall timeout (10 s), over `actor`."""
    cfg = RunConfig.model_validate({"learner": {"stall_timeout_s": stall_timeout_s}, "reward": reward or {}})
    unused: Any = None  # the queue and timeline: nothing is scored here
    parts = SimpleNamespace(reward=actor, scratch_dir="")  # no scoring marks (reward_models/scoring_marks.py)
    return RewardBook(cfg, cast(Any, parts), LoopState(), RunStats(), unused, unused)


def batch(prompt_ids: list[int]) -> GenerationResult:
    groups = [RolloutGroup(Prompt(i, f"p{i}", [1]), [], 3, 0, time.time()) for i in prompt_ids]
    return GenerationResult(groups, 0, 3, 0.1, 0.0, time.time(), 10)


def test_a_busy_reward_actor_silent_past_the_timeout_is_killed_restarted_and_its_batches_generated_again(
        ray_local, capsys: pytest.CaptureFixture) -> None:
    actor = ray_local.remote(num_cpus=0, max_restarts=1)(StuckReward).remote()
    book = book_of(actor)
    book.pid = before = ray_local.get(actor.health.remote())["pid"]
    book.score(batch([0, 1]))
    book.score(batch([2, 3]))
    book.heard_at -= 12.0  # silent for 12 s
    book.check_hang(eval_calls=[])
    said = capsys.readouterr().err
    assert said.startswith("[async-rlhf] the reward actor has answered nothing for 12s with 2 call(s) in flight "
                           "(generation.hang_timeout_s=10, 10x the longest call so far, per training call's size: "
                           "10s in all): killing it")
    first = next(iter(book.state.reward_jobs))
    book.on_scored(first)  # its call fails as after a crash: a restart counted, every batch in flight sent again
    assert book.stats.reward_restarts == 1 and book.pid != before and not book.state.reward_jobs
    assert sorted(p.prompt_id for chunk, _version in book.state.reissue for p in chunk) == [0, 1, 2, 3]
    assert "the reward actor died (" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["hung", "idle", "an evaluation's call", "within the timeout",
                                  "within 10x the longest call", "an evaluation's call 4 training calls big",
                                  "the driver was frozen", "a call is done", "a kill sent 5 s ago, not taken yet",
                                  "hung, its kill not taken within the restart's bound"])
def test_what_is_a_hang_and_what_is_not(ray_local, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.rewards.ray.kill", lambda handle, **_: killed.append(handle))
    actor = ray_local.remote(num_cpus=0)(StuckReward).remote()
    book, evals = book_of(actor), []
    if case == "an evaluation's call":  # its gold scoring: the train reward is scored in the generators
        evals.append((actor.score.remote([]), book.cfg.chunk_samples))
    elif case == "an evaluation's call 4 training calls big":  # 4 x 10 s: before, killed at 10 s
        evals.append((actor.score.remote([]), 4 * book.cfg.chunk_samples))
    elif case != "idle":
        book.score(batch([0]))
    book.heard_at -= 30.0
    if case == "within the timeout":
        book.heard_at += 25.0
    elif case == "within 10x the longest call":
        book.longest_call_s = 30.0 / HANG_FACTOR + 1.0  # big batches take long, and always did
    elif case == "the driver was frozen":  # stopped for 25 of the 30 s (Ctrl-Z): the actor was silent 5 s
        frozen_after = live_clock.now() - 25.0
        monkeypatch.setattr("async_rlhf.pipeline.live_clock.now", lambda: frozen_after)
    elif case == "a call is done":  # and waits to be handled (the driver was busy: a checkpoint's write)
        evals.append((ray_local.put("scored groups"), 1))
    elif case == "a kill sent 5 s ago, not taken yet":  # Ray asks a stopped worker to exit first: seconds
        book.answers.killed_at = live_clock.now() - 5.0  # before: said and sent again at the next check
    elif case.startswith("hung, its kill"):
        book.answers.killed_at = live_clock.now() - book.restart_limit_s - 1.0
    book.check_hang(eval_calls=evals)
    assert killed == ([actor] if case.startswith("hung") or case == "an evaluation's call" else [])
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call
    ray_local.kill(actor)


def test_a_call_done_but_unhandled_is_one_answer_not_cover_for_the_silence_after_it(ray_local, monkeypatch) -> None:
    # By hand: a learned reward model stopped between an evaluation's scoring calls, in a checkpoint's drain, was
    # never killed (its done call was news at every check) and the drain ended the run after 60 s.
    killed: list[Any] = []
    monkeypatch.setattr("async_rlhf.pipeline.rewards.ray.kill", lambda handle, **_: killed.append(handle))
    actor = ray_local.remote(num_cpus=0)(StuckReward).remote()
    book = book_of(actor)
    evals = [(ray_local.put("scored groups"), 1), (actor.score.remote([]), 1)]  # one done, one never answers
    book.heard_at -= 30.0
    book.check_hang(eval_calls=evals)
    assert not killed and live_clock.now() - book.heard_at < 5  # it answered: news, once
    book.heard_at -= 30.0
    book.check_hang(eval_calls=evals)
    assert killed == [actor]
    monkeypatch.undo()  # ray.kill itself was patched (the module is shared): the real one, to end the call
    ray_local.kill(actor)


def test_a_remote_reward_models_own_deadline_is_not_taken_for_a_hang() -> None:
    # The client gives up on a slow server itself, after reward.remote.deadline_s (retries included) and at most
    # one more request's timeout; a hang timeout below that killed a reward actor that was only waiting.
    assert book_of(None, stall_timeout_s=100.0).hang_limit_s() == 50.0
    remote = {"remote": {"url": "http://127.0.0.1:9/score", "deadline_s": 60, "timeout_s": 10}}
    assert book_of(None, stall_timeout_s=100.0, reward=remote).hang_limit_s() == 70.0


def test_a_reward_actor_that_does_not_answer_after_its_restart_ends_the_run_with_one_line(ray_local) -> None:
    actor = ray_local.remote(num_cpus=0)(StuckReward).remote()  # no restart left: not killed (the next test)
    book = book_of(actor, stall_timeout_s=2.0, reward={"max_restarts": 0})
    book.restart_limit_s = 2.5  # as the builder sets it: 5x the reward actor's first start (0.5 s)
    actor.score.remote([])  # its health call waits behind this one, which never returns
    with pytest.raises(RunError, match=r"^the reward actor did not answer within 2.5s of its restart "
                                       r"\(learner\.stall_timeout_s, or 5x its first start in this run\); why is "
                                       r"in its log under /tmp/ray/"):
        book.restarted()
    ray_local.kill(actor)


def test_a_restart_hung_in_its_start_past_its_bound_is_killed_once_and_ray_starts_it_again(
        ray_local, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Chaos, sessions 39-40: a reward actor whose new process hung (or was stopped) in its start ended the run
    once its restart's bound had passed; at start-up such an actor is killed and started again, and now here."""
    marker = tmp_path / "hang the next start"
    actor = ray_local.remote(num_cpus=0, max_restarts=2)(StartsStuck).remote(str(marker))
    book = book_of(actor, stall_timeout_s=2.0, reward={"max_restarts": 2})
    book.restart_limit_s = 6.0  # a new process's start took 2.5-3 s here, over 3 s once in CI: twice that
    book.pid = first = ray_local.get(actor.health.remote())["pid"]
    marker.touch()
    kill_seen_by_ray(actor, first)  # its restart hangs in __init__
    while marker.exists():
        time.sleep(0.05)  # its new process is in its start, for good (the bound counts from here, in a run too)
    assert book.restarted()
    assert book.pid not in (0, first) and book.stats.reward_restarts == 2  # the hung start, and the one that answered
    assert present(actor_table.current(actor)).restarts == 2
    said = capsys.readouterr().err
    assert said.startswith("[async-rlhf] the reward actor has not answered 6s into its restart (pid ") and \
        said.count("killing it so that Ray starts it again") == 1
    ray_local.kill(actor)


def test_a_reward_actor_stopped_at_the_runs_end_is_not_waited_on(ray_local, capsys: pytest.CaptureFixture) -> None:
    # By hand: a reward actor stopped once the final evaluation was scored failed the finished run (exit 1) after
    # its restart's limit; only its restart count was at stake, and Ray's actor table tells it at once.
    actor = ray_local.remote(num_cpus=0, max_restarts=1)(StuckReward).remote()
    book = book_of(actor, stall_timeout_s=120.0)  # hang limit 60 s, restart limit 120 s
    book.pid = ray_local.get(actor.health.remote())["pid"]
    os.kill(book.pid, signal.SIGSTOP)
    started = time.monotonic()
    book.restarted_by_end()
    assert time.monotonic() - started < 30 and book.stats.reward_restarts == 0 and not capsys.readouterr().err
    kill_seen_by_ray(actor, book.pid)  # restarted, and counted at the end
    book.restarted_by_end()
    assert book.stats.reward_restarts == 1
    ray_local.kill(actor)


def test_without_rays_table_a_reward_actor_silent_at_the_runs_end_is_named_not_fatal(
        ray_local, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actor_table, "table", lambda: None)  # another Ray version's internals
    actor = ray_local.remote(num_cpus=0)(StuckReward).remote()
    book = book_of(actor, stall_timeout_s=2.0)  # hang limit 1 s, restart limit 2 s
    book.pid = ray_local.get(actor.health.remote())["pid"]
    actor.score.remote([])  # its health call waits behind this one, which never returns
    book.restarted_by_end()
    assert book.stats.reward_restarts == 0
    assert capsys.readouterr().err.startswith("[async-rlhf] note: the reward actor did not answer within 2s of the "
                                              "run's end (stopped, hung or dead) (its log is under /tmp/ray/")
    ray_local.kill(actor)
