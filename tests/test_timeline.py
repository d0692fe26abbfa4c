"""The run timeline: events written as they finish, busy time with overlaps counted once."""
from __future__ import annotations

import time
from pathlib import Path

from actors.generation_result import GenerationResult
from async_rlhf.outputs.timeline import Timeline, busy_seconds, read_timeline, record_generation, record_learner_step
from async_rlhf.pipeline.learner_steps import LearnerSteps


def test_busy_seconds_counts_overlaps_once() -> None:
    events = [
        {"kind": "generation", "start": 0.0, "end": 2.0},
        {"kind": "reward", "start": 1.5, "end": 2.5},  # overlaps the generation by 0.5
        {"kind": "generation", "start": 4.0, "end": 5.0},
        {"kind": "learn", "start": 0.0, "end": 10.0},  # another kind: not counted
    ]
    assert busy_seconds(events, {"generation", "reward"}) == 2.5 + 1.0
    assert busy_seconds(events, {"learn"}) == 10.0
    assert busy_seconds(events, {"publish"}) == 0.0


def test_generation_result_becomes_sync_then_generation(tmp_path: Path) -> None:
    timeline = Timeline(tmp_path / "timeline.jsonl")
    t0 = timeline.origin
    result = GenerationResult(groups=[], generator_id=1, policy_version=3, gen_s=0.5, sync_s=0.25,
                              started_at=t0 + 10.0, tokens=0)
    record_generation(timeline, result)
    timeline.add("reward", "reward", t0 + 11.0, t0 + 11.0)  # empty: not written
    timeline.close()
    events = read_timeline(tmp_path / "timeline.jsonl")
    assert [(e["kind"], e["worker"], e["start"], e["end"], e["version"]) for e in events] == [
        ("weight_sync", "generator1", 10.0, 10.25, 3),
        ("generation", "generator1", 10.25, 10.75, 3),
    ]


def test_learner_step_ends_now_and_splits_step_from_publication(tmp_path: Path) -> None:
    timeline = Timeline(tmp_path / "timeline.jsonl")
    started = time.time() - 0.3  # started 0.3 s ago; the step itself took 0.2 s
    record_learner_step(timeline, started, 0.2, version=7)
    timeline.close()
    learn, publish = read_timeline(tmp_path / "timeline.jsonl")
    assert (learn["kind"], publish["kind"], learn["version"]) == ("learn", "publish", 7)
    assert abs((learn["end"] - learn["start"]) - 0.2) < 1e-3
    assert learn["end"] == publish["start"]
    assert abs((publish["end"] - learn["start"]) - 0.3) < 0.05


def test_a_step_queued_behind_another_learner_call_counts_the_wait_apart() -> None:
    """Dispatched 1.0 s ago, started on the learner 0.6 s ago (an evaluation's KL call ran first): 0.4 s queued;
    a learner clock ahead of the driver's cannot make it negative or longer than the whole wait."""
    now = time.time()
    assert abs(LearnerSteps._queued_s(now - 0.6, 1.0) - 0.4) < 0.01
    assert LearnerSteps._queued_s(now + 5.0, 1.0) == 1.0 and LearnerSteps._queued_s(now - 2.0, 1.0) == 0.0
