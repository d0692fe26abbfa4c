"""GapWatch: one note when the learner's log-probs at staleness 0 are not the generators' (float32 both sides)."""
from __future__ import annotations

import math

import pytest

from async_rlhf.config.run import RunConfig
from async_rlhf.pipeline.gap_watch import GapWatch


def float32(**sections) -> RunConfig:
    return RunConfig.model_validate({"model": {"dtype": "float32"}, **sections})


def test_a_fresh_gap_past_the_limit_is_said_once() -> None:
    watch = GapWatch(float32())
    for quiet in (3e-7, math.nan, 1e-3):  # float32 agreement; no fresh sample this step; at the limit
        assert watch.check({"logprob_gap": 0.2, "logprob_gap_fresh": quiet}) is None
    note = watch.check({"logprob_gap_fresh": 0.0475})  # GPT-2 with its dropout on in the learner
    assert note is not None and note.startswith("note: at staleness 0 the learner's log-probs of the sampled tokens "
                                                "differ from the generators' by 0.0475 per token")
    assert watch.check({"logprob_gap_fresh": 0.05}) is None  # said once


@pytest.mark.parametrize("sections", [
    {"generation": {"dtype": "bfloat16"}},  # bf16 rounding alone is ~1e-2
    {"learner": {"autocast": "bfloat16"}},
    {"generation": {"top_p": 0.9}},  # the sampling log-probs are of the kept tokens (a loss without ratios)
    {"ray": {"address": "auto"}, "model": {"dtype": "auto"}},  # a cluster's workers resolve auto where they run
])
def test_where_the_two_sides_may_differ_the_gap_is_only_reported(sections: dict) -> None:
    cfg = RunConfig.model_validate({"model": {"dtype": "float32"}, **sections}, context={"environment": False})
    assert GapWatch(cfg).check({"logprob_gap_fresh": 0.5}) is None
