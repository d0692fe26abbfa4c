"""Metric sinks (TensorBoard event files read back with its EventAccumulator, a W&B offline run) get
the records of the JSONL files under the same names; `async-rlhf plot` draws several runs on one PNG."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_rlhf.cli.main import main
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.sinks import TensorBoardSink, WandbSink, make_sinks, scalars
from tests.helpers import cli_command, fill_disk, read_jsonl


def step(i: int, reward: float | None) -> dict:
    return {"step": i, "reward_mean": reward, "kl": 0.01 * i, "staleness_mean": 0.5, "gen_tokens_per_s": 100.0 + i,
            "prompt_ids": [i], "nonfinite": 0, "cores_pinned": True}


def record_run(run_dir: Path, rewards: list[float | None], sinks: list | None = None) -> RunRecorder:
    """A run directory as the controller leaves it, written by the real recorder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = RunRecorder(run_dir, sinks)
    rec.log_eval({"version": 0, "gold_reward": 0.2, "proxy_reward": 0.5, "kl": 0.0, "win_rate": 0.1})
    for i, reward in enumerate(rewards, start=1):
        rec.log_step(step(i, reward))
    rec.log_eval({"version": len(rewards), "gold_reward": 0.4, "proxy_reward": 0.7, "kl": 0.3, "win_rate": None})
    rec.close()
    return rec


def test_scalars_keep_numbers_under_the_jsonl_names() -> None:
    got = scalars("train", step(3, None) | {"loss": math.nan})
    assert set(got) == {"train/step", "train/kl", "train/staleness_mean", "train/gen_tokens_per_s", "train/nonfinite",
                        "train/cores_pinned", "train/loss"}
    assert got["train/cores_pinned"] == 1.0 and math.isnan(got["train/loss"])


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record_run(tmp_path, [0.3, None, 0.5], [TensorBoardSink(tmp_path / "tensorboard")])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward_mean", "train/kl", "eval/gold_reward", "eval/win_rate"} <= tags
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/reward_mean")] == [(1, 0.3), (3, 0.5)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/gold_reward")] == [(0, 0.2), (3, 0.4)]
    assert [e.step for e in events.Scalars("eval/win_rate")] == [0]  # None is not a number: not sent


def wandb_history(run_file: Path) -> list[dict]:
    """The `history` records of a W&B offline run file (leveldb log framing after a 7-byte `:W&B` header:
    32 KiB blocks of records, each a 7-byte header (crc, length, type: 1 whole, 2 first, 3 middle, 4 last))."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, part, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = (b"" if kind in (1, 2) else part) + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and part:
            record = wandb_internal_pb2.Record.FromString(part)  # type: ignore[attr-defined]  # star re-export
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_is_written_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    # The command line can carry secrets (api.token=..., a reward URL's password): wandb records it unless told not to.
    monkeypatch.setattr(sys, "argv", ["async-rlhf", "train", "c.yaml", "api.token=sekret-token-0123456789"])
    sink = WandbSink(tmp_path, "async-rlhf-test", "offline", {"seed": 0})
    rec = RunRecorder(tmp_path, [sink])
    rec.log_step(step(1, 0.3))
    rec.log_eval({"version": 0, "gold_reward": 0.2})  # the initial evaluation lands after step 1, as in a run
    rec.log_step(step(2, 0.4))
    rec.log_eval({"version": 2, "gold_reward": 0.4})
    rec.close()
    [run] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30  # wandb's service process may still be writing the file after finish()
    while len(wandb_history(run)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = wandb_history(run)
    assert [(r["train/step"], r["train/reward_mean"]) for r in rows if "train/step" in r] == [(1, 0.3), (2, 0.4)]
    # Before: W&B dropped the step-0 evaluation ("Tried to log to step 0 that is less than the current step 1").
    assert [(r["eval/version"], r["eval/gold_reward"]) for r in rows if "eval/version" in r] == [(0, 0.2), (2, 0.4)]
    written = [f.read_bytes() for f in (tmp_path / "wandb").rglob("*") if f.is_file()]
    assert not [b for b in written if b"sekret-token" in b]


WANDB_SERVICE_DIES = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, os.getcwd())
from async_rlhf.outputs.recorder import RunRecorder
from async_rlhf.outputs.sinks import WandbSink
from tests.test_sinks_and_plots import step

run_dir = Path(sys.argv[1])
rec = RunRecorder(run_dir, [WandbSink(run_dir, "async-rlhf-test", "offline", {"seed": 0})])
rec.log_step(step(1, 0.3))
for entry in Path("/proc").iterdir():  # W&B's service process, a child of this one
    if entry.name.isdigit() and b"wandb-core" in (entry / "cmdline").read_bytes():
        if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
            os.kill(int(entry.name), signal.SIGKILL)
            os.waitpid(int(entry.name), 0)
for i in range(2, 5):
    rec.log_step(step(i, 0.1 * i))
rec.log_eval({"version": 4, "gold_reward": 0.4})
rec.close()
print("trained on", flush=True)
"""


def test_a_wandb_service_that_dies_mid_run_stops_the_sink_with_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    # Before: the next record raised ConnectionResetError, which failed the run without a checkpoint, and W&B's exit
    # hook printed a traceback. In a child process with a service of its own: this process's W&B service (its address
    # in WANDB_SERVICE, which a child would connect to) serves other tests.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    child = subprocess.run([sys.executable, "-c", WANDB_SERVICE_DIES, str(tmp_path)], capture_output=True,
                           text=True, timeout=120, env={**env, "WANDB_DISABLE_GIT": "true"})
    assert child.returncode == 0 and "trained on" in child.stdout, child.stderr[-3000:]
    warnings = [line for line in child.stderr.splitlines() if "W&B stopped taking records" in line]
    # The error's text is the socket's, which depends on when the service died: "Connection lost" or "[Errno 104]
    # Connection reset by peer"
    assert len(warnings) == 1, child.stderr[-3000:]
    assert re.fullmatch(r"\[async-rlhf\] warning: W&B stopped taking records \(ConnectionResetError: [^)]+\); the run "
                        r"goes on, metrics\.jsonl and eval\.jsonl keep every record", warnings[0]), warnings[0]
    assert "Traceback" not in child.stderr and "Exception ignored" not in child.stderr, child.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_an_online_wandb_run_without_an_api_key_is_a_config_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the run failed with "UsageError: No API key configured" and a traceback file, as if something died.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, where `wandb login` keeps its key
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(ConfigError) as err:
        WandbSink(tmp_path, "async-rlhf-test", "online", {"seed": 0})
    assert str(err.value).startswith("config error: logging.wandb: W&B could not start its online run: UsageError: ")
    assert "wandb login" in str(err.value) and "logging.wandb_mode=offline" in str(err.value)


def test_make_sinks_follows_the_config(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({"logging": {"tensorboard": True}})
    sinks = make_sinks(cfg, tmp_path)
    assert [type(s) for s in sinks] == [TensorBoardSink]
    sinks[0].close()
    assert make_sinks(RunConfig(), tmp_path) == []


def test_plot_command_draws_two_runs_on_one_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import matplotlib.image

    record_run(tmp_path / "sync", [0.2, 0.3, 0.35, 0.4])
    record_run(tmp_path / "async", [0.25, None, 0.45])
    out = tmp_path / "plots" / "compare.png"
    assert main(["plot", str(tmp_path / "sync"), str(tmp_path / "async"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (700, 1200) and out.stat().st_size > 20_000


def test_plot_writes_the_file_it_names_and_refuses_what_it_cannot_write(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    record_run(tmp_path / "run", [0.2, 0.3, 0.35])
    run = str(tmp_path / "run")
    assert main(["plot", run, "--out", str(tmp_path / "curves")]) == 0  # matplotlib adds .png: say so
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png") and (tmp_path / "curves.png").is_file()
    assert main(["plot", run, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"plot error: --out '{tmp_path}' is a directory; give a file name "
                                               f"such as {tmp_path / 'runs.png'}")
    assert main(["plot", run, "--out", str(tmp_path / "c.xyz")]) == 2
    assert "matplotlib cannot write '.xyz'; use one of " in capsys.readouterr().err


def test_plot_leaves_out_a_last_line_a_killed_run_cut_short_and_names_any_other_bad_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record_run(tmp_path / "run", [0.2, 0.3, 0.35])
    metrics = tmp_path / "run" / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 4, "rew')
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "a.png")]) == 0
    metrics.write_text('{"step": 1, "rew\n' + whole)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"plot error: line 1 of '{metrics}' is not a JSON record; fix or remove it"
    assert not (tmp_path / "b.png").exists()


def test_a_matplotlib_config_dir_that_cannot_be_written_says_nothing(tmp_path: Path) -> None:
    # XDG_CACHE_HOME on a missing mount: matplotlib works from a temporary directory, but it printed two lines of
    # warning ("mkdir -p failed for path /proc/nope/matplotlib ...") on the run's terminal. A fresh process: this
    # one has imported matplotlib already.
    record_run(tmp_path / "run", [0.2, 0.3, 0.35])
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"} | {"XDG_CACHE_HOME": "/proc/nope"}
    proc = subprocess.run(cli_command("plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and (tmp_path / "c.png").stat().st_size > 1000


def test_a_full_disk_stops_the_tensorboard_sink_with_one_warning_and_keeps_its_records_whole(
        small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    # Before: SummaryWriter's own thread printed a traceback on the run's terminal, and the next step failed the run.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(small_disk / "tensorboard")
    sink.log("train", {"step": 1, "reward_mean": 0.5}, 1)
    fill_disk(small_disk)
    for n in range(2, 400):  # past the slack of the file's last page
        sink.log("train", {"step": n, "reward_mean": 0.5, **{f"x{i}": float(i) for i in range(20)}}, n)
    sink.close()
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"[async-rlhf] warning: TensorBoard events are no longer written "
                                                 f"to {small_disk / 'tensorboard'} ([Errno 28] No space left on device")
    events = EventAccumulator(str(small_disk / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/reward_mean")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 399  # whole records, in order
