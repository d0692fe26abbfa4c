"""RunRecorder: metrics lines, summary and the plot, including steps with missing values."""
from __future__ import annotations

import errno
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.run_lock import RunDirLock
from async_rlhf.outputs.timeline import Timeline
from async_rlhf.pipeline.evaluation import clock_fields
from async_rlhf.pipeline.timing import process_started_at
from tests.helpers import read_jsonl


def strict_json(text: str) -> dict:
    """JSON as JavaScript or DuckDB read it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_records_and_plot_tolerate_gaps(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    rec.save_config(RunConfig())
    rec.log_step({"step": 1, "reward_mean": 0.5, "kl": 0.0})
    rec.log_step({"step": 2, "reward_mean": None, "kl": math.nan})  # a step where every pair tied
    rec.log_eval({"version": 0, "gold_reward": 0.4})
    rec.write_summary({"wall_s": 1.0, "final_kl": math.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line) for line in lines][1] == {"step": 2, "reward_mean": None, "kl": None}
    assert strict_json((tmp_path / "summary.json").read_text()) == {"wall_s": 1.0, "final_kl": None}
    assert "max_staleness: 1" in (tmp_path / "config.yaml").read_text()
    assert rec.plot().stat().st_size > 5_000


def test_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    for step in (1, 2, 3, 4):
        rec.log_step({"step": step})
    rec.log_eval({"version": 0})
    rec.log_eval({"version": 4})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # the line a SIGKILL interrupted
    resumed = RunRecorder(tmp_path)
    resumed.truncate(metrics_lines=2, eval_lines=1)  # the checkpoint was taken after step 2
    resumed.log_step({"step": 3})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [r["step"] for r in resumed.steps] == [1, 2, 3] and resumed.evals == [{"version": 0, "episodes": 0}]
    with pytest.raises(ValueError) as err:  # a log shorter than the checkpoint's count is refused
        RunRecorder(tmp_path).truncate(metrics_lines=9, eval_lines=0)
    assert str(err.value) == f"{tmp_path / 'metrics.jsonl'} has 3 lines, fewer than the 9 the checkpoint counted"


def test_memory_holds_only_the_plotted_columns_and_history_reads_whole_records(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    for step in (1, 2, 3):
        rec.log_step({"step": step, "reward_mean": 0.1 * step, "kl": 0.0, "prompt_ids": list(range(16))})
    assert rec.steps[0] == {"step": 1, "reward_mean": 0.1, "kl": 0.0}  # no per-step lists kept for a long run
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "rew')  # the loop's thread is half-way through writing step 4
    records = rec.step_records(since=1)
    assert [r["step"] for r in records] == [2, 3] and records[0]["prompt_ids"] == list(range(16))
    assert RunRecorder(tmp_path / "none").step_records() == []
    assert [r["step"] for r in rec.step_records(since=0, limit=2)] == [1, 2]  # a page: only its lines are read
    assert [r["step"] for r in rec.step_records(since=1, limit=5)] == [2, 3]  # the unfinished line still left out


def test_history_after_a_resume_starts_at_the_right_line(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    for step in (1, 2, 3, 4):
        rec.log_step({"step": step, "kl": 0.5})
    resumed = RunRecorder(tmp_path)
    resumed.truncate(metrics_lines=3, eval_lines=0)
    resumed.log_step({"step": 4, "kl": 0.25})
    assert [r["step"] for r in resumed.step_records(since=2)] == [3, 4]
    assert resumed.step_records(since=3) == [{"step": 4, "kl": 0.25}] and resumed.step_records(since=4) == []


def test_every_eval_record_carries_the_episodes_so_far_and_a_resume_keeps_counting(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    rec.log_eval({"version": 0, "wall_s": 12.5, "eval_s": 0.5})  # before any step: nothing trained yet
    for step in (1, 2):
        rec.log_step({"step": step, "episodes": 32 * step})  # 16 prompts x 2 samples per step
    rec.log_eval({"version": 2, "wall_s": 20.0, "eval_s": 0.4})
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert [(e["version"], e["episodes"], e["wall_s"]) for e in evals] == [(0, 0, 12.5), (2, 64, 20.0)]
    resumed = RunRecorder(tmp_path)
    resumed.truncate(metrics_lines=1, eval_lines=1)  # the checkpoint was taken after step 1
    resumed.log_eval({"version": 1})
    assert resumed.evals[-1]["episodes"] == 32


def test_clock_fields_time_an_evaluation_from_the_process_start() -> None:
    assert clock_fields(started=1010.25, ended=1012.0, process_start=1000.0) == {"wall_s": 10.25, "eval_s": 1.75}
    assert 0 < time.time() - process_started_at() < 24 * 3600  # this test process started before now


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path: Path) -> None:
    # Found with a run directory on a 120 KB tmpfs: "OSError: [Errno 28] No space left on device", no file named.
    # /dev/full answers every write with ENOSPC, as a full disk does. (The logs' lines are held instead:
    # tests/test_line_log.py; the summary, the run's last write, still fails.)
    rec = RunRecorder(tmp_path)
    (tmp_path / "summary.json").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        rec.write_summary({"steps": 1})
    path = tmp_path / "summary.json"
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert str(caught.value) == f"[Errno 28] No space left on device: '{path}'"


def test_a_plot_the_disk_cannot_take_is_a_warning_at_the_end_of_a_run(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    # Before: the run failed (exit 1) after its summary and final/ were written.
    rec = RunRecorder(tmp_path)
    rec.log_step({"step": 1, "reward_mean": 0.5, "kl": 0.0})
    (tmp_path / "reward.png").symlink_to("/dev/full")
    rec.plot_at_end()
    said = capsys.readouterr().err
    assert said.startswith("[async-rlhf] warning: reward.png not written ([Errno 28] No space left on device")
    assert f"`async-rlhf plot {tmp_path} --out FILE` draws it" in said


def test_a_damaged_log_line_is_kept_in_place_and_left_out_of_the_figures_on_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Before: --resume failed with a raw JSONDecodeError, and offered --resume again.
    rec = RunRecorder(tmp_path)
    for step in (1, 2, 3):
        rec.log_step({"step": step, "reward_mean": 0.5, "kl": 0.0, "episodes": 32 * step})
    rec.log_eval({"version": 0, "gold_reward": 0.5})
    lines = rec.metrics_path.read_text().splitlines()
    rec.metrics_path.write_text("\n".join([lines[0], "garbage{", lines[2]]) + "\n")
    rec.eval_path.write_text("[1, 2]\n")  # JSON, but not a record
    resumed = RunRecorder(tmp_path)
    resumed.truncate(metrics_lines=3, eval_lines=1)
    said = capsys.readouterr().err.splitlines()
    assert said == [f"[async-rlhf] warning: line 2 of {rec.metrics_path} is not a JSON record (1 such line(s)): kept "
                    "as it is, and left out of the run's figures",
                    f"[async-rlhf] warning: line 1 of {rec.eval_path} is not a JSON record (1 such line(s)): kept as "
                    "it is, and left out of the run's figures"]
    assert len(resumed.steps) == 3 and resumed.episodes == 96 and resumed.evals == [{}]  # counts match the files
    assert [r["step"] for r in resumed.step_records(0)] == [1, 3]
    resumed.log_step({"step": 4, "reward_mean": 0.6, "kl": 0.1, "episodes": 128})
    assert [r["step"] for r in resumed.step_records(2)] == [3, 4]  # offsets still point at their lines
    assert resumed.plot().is_file()


def test_a_run_directory_removed_mid_run_is_made_again_and_the_run_goes_on(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    # Before: the next log line failed the run ("FileNotFoundError: ... eval.jsonl") and its training was lost.
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)
    lock.acquire()
    rec = RunRecorder(run_dir)
    rec.save_config(RunConfig(seed=7))
    timeline = Timeline(run_dir / "timeline.jsonl", rec.disk, rec.keeper)
    rec.keeper.settle()
    rec.keeper.remakes.append(lock.reacquire)
    for step in (1, 2):
        rec.log_step({"step": step, "reward_mean": 0.5, "kl": 0.0})
    timeline.add("learn", "learner", 1.0, 2.0, 1)
    shutil.rmtree(run_dir)  # an `rm -rf` of the wrong directory
    rec.log_step({"step": 3, "reward_mean": 0.6, "kl": 0.1})
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 3, "reward_mean": 0.6, "kl": 0.1}]
    assert rec.step_records(0) == [{"step": 3, "reward_mean": 0.6, "kl": 0.1}] and len(rec.steps) == 1
    assert load_config(run_dir / "config.yaml").seed == 7 and RunDirLock.held(run_dir)
    timeline.add("learn", "learner", 2.0, 3.0, 2)
    assert [event["version"] for event in read_jsonl(run_dir / "timeline.jsonl")] == [2]
    shutil.rmtree(run_dir)
    run_dir.mkdir()  # replaced by an empty directory of the same name: made again all the same
    rec.log_eval({"version": 3, "gold_reward": 0.9})
    assert [r["version"] for r in read_jsonl(run_dir / "eval.jsonl")] == [3] and (run_dir / "config.yaml").is_file()
    err = capsys.readouterr().err
    assert err.count(f"[async-rlhf] the run directory {run_dir} was removed while the run was writing to it: made "
                     f"it again, and the run goes on") == 2
    lock.release()
