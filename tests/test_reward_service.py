"""RewardService: a failing scorer is reported as a failure with its reason, never as a reward of 0."""
from __future__ import annotations

import math
import time

import pytest

import reward_models.service as service
from reward_models.service import RewardService
from tests.helpers import make_group


def raising(prompt, text):
    raise RuntimeError("reward model crashed")


def not_a_number(prompt, text):
    return math.nan


def slow(prompt, text):
    time.sleep(0.05)
    return 0.5


@pytest.fixture
def scorers(monkeypatch: pytest.MonkeyPatch) -> None:
    for fn in (raising, not_a_number, slow):
        monkeypatch.setitem(service.SCORERS, fn.__name__, fn)


def statuses(groups) -> list[tuple]:
    return [(c.reward, c.reward_status) for g in groups for c in g.completions]


def test_rule_scorer_scores_the_sort_task() -> None:
    group = make_group(0, rewards=[None, None])
    group.prompt.meta = {"digits": "21", "answer": "12"}
    group.completions[0].text, group.completions[1].text = "12", "21"
    scored = RewardService({"train": "sort_partial", "gold": "sort_exact"}).score([group], "gold")
    assert statuses(scored) == [(1.0, "ok"), (0.0, "ok")]


@pytest.mark.parametrize(("name", "status", "error"), [
    ("raising", "failed", "RuntimeError: reward model crashed"),
    ("not_a_number", "failed", "non-finite"),
])
def test_failures_are_failures_not_zero(scorers, name: str, status: str, error: str) -> None:
    svc = RewardService({"train": name})
    groups = svc.score([make_group(0, rewards=[None, None])])
    for c in groups[0].completions:
        assert c.reward is None and c.reward_status == status and error in (c.reward_error or "")
    assert groups[0].scored == [] and svc.health()["failed"] == 2


def test_deadline_marks_the_rest_timed_out(scorers) -> None:
    svc = RewardService({"train": "slow"}, timeout_s=0.12)
    groups = svc.score([make_group(0, rewards=[None] * 6)])
    got = [c.reward_status for c in groups[0].completions]
    # The first is scored before the deadline, the last after it; once timed out, always timed out.
    assert got[0] == "ok" and got[-1] == "timed_out"
    assert got == sorted(got, key=lambda s: s == "timed_out")
    assert all(c.reward is None for c in groups[0].completions if c.reward_status == "timed_out")


def test_unknown_scorer_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        RewardService({"train": "nope"})
