"""ScoringMarks (reward_models/scoring_marks.py): a reward function that ends the process it is scored in is named
by the mark it leaves, read from another process; one that returns leaves nothing. The driver's lines with it:
tests/test_generator_pool.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reward_models.scoring_marks import ScoringMarks
from tests.helpers import ROOT

# A reward actor's process: a RewardService with its marks, scoring one batch with the scorer named.
SCORES_ONCE = """
import sys
from reward_models.scoring_marks import ScoringMarks
from reward_models.service import RewardService
from tests.helpers import make_group
RewardService({"train": sys.argv[2]}, marks=ScoringMarks(sys.argv[1], "reward")).score([make_group(0, [None])])
"""


def ends_its_process(prompt, text):  # os._exit: no exception, no finally, no atexit
    os._exit(3)


def score_in_a_process(root: Path, scorer: str) -> int:
    return subprocess.run([sys.executable, "-c", SCORES_ONCE, str(root), scorer], cwd=ROOT, capture_output=True,
                          timeout=120).returncode


def test_a_reward_that_ends_its_process_is_named_by_its_mark_and_one_that_returns_leaves_none(tmp_path: Path) -> None:
    marks = ScoringMarks(str(tmp_path), "reward")
    assert score_in_a_process(tmp_path, "sort_exact") == 0 and marks.left() is None
    assert score_in_a_process(tmp_path, f"{__name__}:ends_its_process") == 3
    assert marks.left() == f"reward.train scorer '{__name__}:ends_its_process'"
    assert marks.left() is None  # read once: a later death is not blamed on it


def test_without_a_place_or_where_it_cannot_be_written_scoring_goes_on_unmarked(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    for marks in (ScoringMarks(None, "reward"), ScoringMarks(str(blocker), "reward")):
        with marks.held("train", "reward.train scorer 'm:f'"):
            assert marks.left() is None
