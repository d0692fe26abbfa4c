"""A run's logs on a full disk (async_rlhf/outputs/line_log.py): lines are held in memory and written, whole and
in order, once space is back; a checkpoint and the summary do not count lines that are not on disk.

The first tests fill a real tmpfs (skipped where this process may not mount one); the last stands a write that
fails half-way with ENOSPC in for a full disk, so that the cut-short line is tested everywhere."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from async_rlhf.outputs import line_log
from async_rlhf.outputs.line_log import DiskNotice, LineLog
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.timeline import Timeline, read_timeline
from tests.helpers import fill_disk


def test_lines_that_find_the_disk_full_are_held_and_written_in_order_once_space_is_back(
        small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    recorder = RunRecorder(small_disk)
    timeline = Timeline(small_disk / "timeline.jsonl", recorder.disk)
    recorder.log_step({"step": 1, "reward_mean": 0.5, "kl": 0.0})
    fill_disk(small_disk)
    for step in range(2, 6):  # before: OSError, and the run ended (3000 bytes: past the slack of a page)
        recorder.log_step({"step": step, "reward_mean": 0.5, "kl": 0.0, "note": "x" * 3000})
        timeline.add("learn", "learner", 1.0, 2.0, step)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"[async-rlhf] warning: the disk of {small_disk} is full (")
    with pytest.raises(OSError, match="lines of metrics.jsonl are held in memory"):
        recorder.sync()  # a checkpoint must not count them: it fails, with a warning, and the run goes on
    on_disk = [json.loads(line)["step"] for line in recorder.metrics_path.read_text().splitlines()]
    assert on_disk == list(range(1, len(on_disk) + 1)) and len(on_disk) < 5  # whole lines only (a page's slack)
    (small_disk / "filler").unlink()
    recorder.log_step({"step": 6, "reward_mean": 0.5, "kl": 0.0})
    timeline.close()
    assert capsys.readouterr().err == f"[async-rlhf] space is back on the disk of {small_disk}: the held log lines " \
                                      f"are written\n"
    assert [r["step"] for r in recorder.step_records(0)] == list(range(1, 7))
    assert [r["step"] for r in recorder.step_records(3)] == [4, 5, 6]  # each line where its offset says
    assert [e["version"] for e in read_timeline(small_disk / "timeline.jsonl")] == [2, 3, 4, 5]
    recorder.sync()
    recorder.write_summary({"steps": 6})


def test_the_summary_is_not_written_while_lines_are_held(small_disk: Path) -> None:
    recorder = RunRecorder(small_disk)
    fill_disk(small_disk)
    recorder.log_eval({"version": 0, "gold": 0.1})
    (small_disk / "rest").unlink()  # room for the eval line, which is written first
    recorder.write_summary({"steps": 0})
    assert json.loads(recorder.eval_path.read_text())["version"] == 0


def test_a_line_cut_short_by_a_full_disk_is_cut_off_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = LineLog(tmp_path / "metrics.jsonl", DiskNotice())
    log.append('{"step": 1}')
    real_open, full = Path.open, [True]

    def open_on_a_full_disk(path: Path, mode: str = "r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "a" in mode and full[0]:
            fh.write(b'{"st')  # what fit before the disk filled
            fh.flush()
            fh.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fh

    monkeypatch.setattr(Path, "open", open_on_a_full_disk)
    assert log.append('{"step": 2}') == 12
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n' and log.holding
    full[0] = False
    assert log.append('{"step": 3}') == 24
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_other_write_errors_and_a_full_disk_past_the_memory_limit_fail_as_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = LineLog(tmp_path / "no-such-dir" / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="no-such-dir/metrics.jsonl"):
        log.append("{}")
    monkeypatch.setattr(line_log, "HELD_LIMIT", 10)
    monkeypatch.setattr(Path, "open", lambda *_a, **_k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    log = LineLog(tmp_path / "metrics.jsonl")
    log.append("{}")
    with pytest.raises(OSError, match="full"):
        log.append('{"step": 2, "more": "than ten bytes held"}')
