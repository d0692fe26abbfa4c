"""The CLI's last lines of defence: a run directory or an API address that cannot be used (config errors,
exit 2), and an error no command foresaw (one line naming it and the file with its traceback, exit 1),
never a traceback on the terminal."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest

from async_rlhf.api.app import ApiServer
from async_rlhf.cli.main import main, train_arguments
from async_rlhf.config.base import ConfigError
from async_rlhf.config.runtime import ApiConfig
from async_rlhf.failures import disk_full, failure_line
from async_rlhf.pipeline.control import RunControl
from tests.helpers import QUICKSTART, ROOT, taken_port


def test_a_run_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes").write_text("mine\n")
    assert main(["train", str(QUICKSTART), "--run-dir", str(tmp_path / "notes")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: run directory '{tmp_path / 'notes'}' is a file; pass --run-dir with a directory")
    assert (tmp_path / "notes").read_text() == "mine\n"


def test_a_run_dir_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes").write_text("mine\n")
    run_dir = tmp_path / "notes" / "run"  # under a file: no user can create it
    assert main(["train", str(QUICKSTART), "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: cannot use '{run_dir}' as the run directory (Not a directory); pass --run-dir with a "
        "directory this user can create and write")


def test_an_error_no_command_foresaw_is_one_line_and_its_traceback_goes_to_a_file() -> None:
    # A stand-in for a bug: main() replaced by one that fails the way an unhandled error would.
    script = ("import async_rlhf.cli.main as cli\n"
              "def broken(): raise ValueError('a bug somewhere\\nsecond line')\n"
              "cli.main = broken\n"
              "cli.entry()\n")
    proc = subprocess.run([sys.executable, "-c", script, "plot"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    prefix = "[async-rlhf] plot failed: ValueError: a bug somewhere; traceback in "
    assert line.startswith(prefix) and "\n" not in line
    log = Path(line.removeprefix(prefix))
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    log.unlink()


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_an_api_address_that_cannot_be_served_is_a_config_error(host: str, tmp_path: Path) -> None:
    view: Any = None  # the app only keeps it for its endpoints; no request reaches it here
    with taken_port() as port:
        api = ApiServer(view, RunControl(), ApiConfig(host=host, port=port, token="t" * 32), tmp_path)
        with pytest.raises(ConfigError, match=rf"^config error: api: cannot serve on {host}:{port} \(.+\); set "
                                              r"api.host and api.port to an address this machine can serve"):
            api.start()
    assert not (tmp_path / "api_url").exists()


def worker_error(cause: BaseException) -> BaseException:
    """The exception `ray.get` raises for an error inside an actor call (Ray's own class; no cluster needed)."""
    from ray.exceptions import RayTaskError

    return RayTaskError("Learner.save_pretrained", "ray::Learner.save_pretrained() (pid=1, ip=x)\nTraceback: ...",
                        cause).as_instanceof_cause()


def test_a_failed_run_says_how_to_continue_only_when_a_checkpoint_exists(tmp_path: Path) -> None:
    exc = RuntimeError("the loop stopped")
    resumable = failure_line(exc, tmp_path, "my.yaml", resumable=True)
    assert resumable.endswith(f"continue with `async-rlhf train my.yaml --resume {tmp_path}` (from its newest "
                              "checkpoint)")
    fresh = failure_line(exc, tmp_path, "my.yaml", resumable=False)
    assert "--resume" not in fresh
    assert fresh.endswith("start it again with `async-rlhf train my.yaml` (it wrote no checkpoint to continue from)")


def test_the_command_that_continues_a_run_repeats_its_overrides_but_no_credential() -> None:
    # Before: `async-rlhf train my.yaml --resume DIR` without the overrides, so learner.steps=4 became the file's 200.
    got = train_arguments("my config.yaml", ["learner.steps=4", "api.token=abc", "reward.remote.url=http://u:p@h",
                                             "task.dataset.template={q} >"])
    assert got == ("'my config.yaml' learner.steps=4 'api.token=***' 'reward.remote.url=***' "
                   "'task.dataset.template={q} >'")
    assert train_arguments("configs/quickstart.yaml", []) == "configs/quickstart.yaml"
    line = failure_line(RuntimeError("x"), Path("/runs/my run"), got, resumable=True)
    assert line.endswith(f"`async-rlhf train {got} --resume '/runs/my run'` (from its newest checkpoint)")


def test_a_reader_that_goes_away_does_not_fail_the_command() -> None:
    # `async-rlhf train ... | head`: before, the line after head exited raised BrokenPipeError and the run failed.
    proc = subprocess.Popen([sys.executable, "-m", "async_rlhf.cli", "check-config", str(QUICKSTART)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the config is read and printed: the reader is gone
    assert (proc.wait(timeout=120), proc.stderr.read()) == (0, "")


@pytest.mark.parametrize("cause", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' text
])
def test_a_full_disk_inside_a_worker_is_named_with_the_call_and_the_fix(tmp_path: Path, cause: Exception) -> None:
    line = failure_line(worker_error(cause), tmp_path, "my.yaml", resumable=False)
    assert f"{type(cause).__name__}: " in line and "(in Learner.save_pretrained)" in line
    assert f"free space on the disk of {tmp_path}, then start it again" in line
    assert "ray::" not in line and "\n" not in line


def test_an_error_elsewhere_is_not_called_a_full_disk(tmp_path: Path) -> None:
    assert "free space" not in failure_line(worker_error(ValueError("bad")), tmp_path, "my.yaml", resumable=True)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))


def test_workers_killed_for_want_of_memory_are_one_line_with_the_fix(tmp_path: Path) -> None:
    import ray

    # Ray's memory monitor's paragraph (its first line as Ray 2.5x words it; then the kill reason, object store
    # figures and a table of processes), which was the run's last line before.
    exc = ray.exceptions.OutOfMemoryError(
        "3 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: "
        "a4385b) was 6.14GB used / 23.54GB limit (0.260927)\nOOM kill reason: Memory usage 6401949696B exceeded "
        "threshold of 6319050752B (25.0% of 25276203008B limit)\nObject store memory usage: [...]")
    line = failure_line(exc, tmp_path, "my.yaml", resumable=True)
    assert line.startswith("[async-rlhf] run failed: Ray killed workers of the run: the node ran low on memory "
                           "(6.14GB used / 23.54GB limit; Ray kills above RAY_memory_usage_threshold, 0.95 by "
                           "default); traceback in ")
    assert line.endswith("; free memory on the node (other processes), or give the run less (generation.kv_cache_gib, "
                         f"learner.max_tokens_per_micro_batch), then continue with `async-rlhf train my.yaml --resume "
                         f"{tmp_path}` (from its newest checkpoint)")


class Broken:  # an actor whose start fails, as a Learner given a damaged checkpoint
    def __init__(self) -> None:
        raise ValueError("Error while deserializing header: invalid header length")

    def ping(self) -> None:
        pass


def test_an_actor_that_could_not_start_is_named_with_its_own_error(ray_local, tmp_path: Path) -> None:
    actor = ray_local.remote(num_cpus=0)(Broken).remote()
    with pytest.raises(ray_local.exceptions.ActorDiedError) as err:
        ray_local.get(actor.ping.remote())
    line = failure_line(err.value, tmp_path, "my.yaml", resumable=False)
    assert line.startswith("[async-rlhf] run failed: the Broken actor could not start: ValueError: Error while "
                           "deserializing header: invalid header length; traceback in ")
    assert "\x1b[" not in line and "pid=" not in line


class EngineArgs(pydantic.BaseModel):  # as vLLM checks its engine's arguments
    model_type: str

    @pydantic.field_validator("model_type")
    @classmethod
    def _known(cls, value: str) -> str:
        raise ValueError(f"The checkpoint has model type `{value}` but Transformers does not recognize this "
                         "architecture.\nYou can update Transformers with the command `pip install -U transformers`.")


class BrokenEngine:  # an actor whose start fails in vLLM's pydantic check, as a generator given a custom model
    def __init__(self) -> None:
        EngineArgs(model_type="mything")

    def ping(self) -> None:
        pass


def test_an_actor_start_that_failed_with_a_long_message_is_named_by_its_reason(ray_local, tmp_path: Path) -> None:
    """Found by hand: a checkpoint of a model type transformers does not know failed as "the GeneratorActor actor
    could not start: 14/v/value_error", the end of pydantic's link under the message."""
    actor = ray_local.remote(num_cpus=0)(BrokenEngine).remote()
    with pytest.raises(ray_local.exceptions.ActorDiedError) as err:
        ray_local.get(actor.ping.remote())
    line = failure_line(err.value, tmp_path, "my.yaml", resumable=False)
    assert line.startswith("[async-rlhf] run failed: the BrokenEngine actor could not start: ValidationError: "
                           "model_type: The checkpoint has model type `mything` but Transformers does not recognize "
                           "this architecture.; traceback in ")


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path: Path) -> None:
    """Found by hand: two runs launched together without --run-dir chose the same runs/<date-time> and the
    second was refused as "in use by another process". A parallel sweep must just work."""
    from concurrent.futures import ThreadPoolExecutor

    from async_rlhf.cli.main import new_default_run_dir

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: new_default_run_dir(tmp_path / "runs"), range(8)))
    assert len(set(made)) == 8 and all(d.is_dir() and not any(d.iterdir()) for d in made)
    stamps = {d.name.split("-")[0] + "-" + d.name.split("-")[1] for d in made}
    assert all(d.name in stamps or d.name.rsplit("-", 1)[0] in stamps for d in made)
