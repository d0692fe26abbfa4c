"""final/ on a full disk (async_rlhf/pipeline/final_save.py): the trained weights live only in the learner until
final/ is written, so a save that fails for want of space is tried again while the user frees space.

The first tests stand a small Ray actor in for the learner, whose save fails with ENOSPC a given number of times
(a full disk cannot be made without mount privileges); the last one fills a real tmpfs and frees it mid-wait,
and is skipped where this process may not mount one."""
from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from async_rlhf.pipeline import final_save
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.final_save import FinalSave
from async_rlhf.pipeline.learner_calls import LearnerHung
from tests.helpers import ROOT, mount_tmpfs, train_command


class FullDiskLearner:
    """`save_pretrained` fails with `error` (ENOSPC: a full disk) `failures` times, then writes a file; each call
    answers after `delay_s` (a long one stands in for a learner stopped mid-save)."""

    def __init__(self, failures: int, error: int = errno.ENOSPC, delay_s: float = 0.0) -> None:
        self.failures = failures
        self.error = error
        self.delay_s = delay_s

    def save_pretrained(self, path: str) -> None:
        time.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, os.strerror(self.error))
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text("weights")


@pytest.fixture()
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(final_save, "RETRY_S", 0.05)


def saving(ray_local, tmp_path: Path, failures: int, wait_s: float = 30.0, error: int = errno.ENOSPC,
           control: RunControl | None = None, delay_s: float = 0.0, hang_s: float = 60.0) -> FinalSave:
    learner = ray_local.remote(num_cpus=0)(FullDiskLearner).remote(failures, error, delay_s)
    save = FinalSave(learner, tmp_path / "final", wait_s, control or RunControl(), hang_s)
    save.start()
    return save


def test_a_save_that_finds_the_disk_full_is_tried_again_until_it_is_written(ray_local, tmp_path: Path, quick_retries,
                                                                            capsys: pytest.CaptureFixture) -> None:
    save = saving(ray_local, tmp_path, failures=3)
    save.wait()
    assert save.tries == 4 and (tmp_path / "final" / "model.safetensors").read_text() == "weights"
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 2  # said once when it fails, once when written
    assert said[0].startswith(f"[async-rlhf] the final save to {tmp_path / 'final'} failed: OSError: [Errno 28] No "
                              "space left on device") and "MB free on its disk" in said[0] and "free space" in said[0]
    assert said[1] == f"[async-rlhf] final save written to {tmp_path / 'final'} (try 4)"


def test_a_save_that_fails_otherwise_fails_at_once(ray_local, tmp_path: Path, quick_retries) -> None:
    save = saving(ray_local, tmp_path, failures=1, error=errno.EACCES)  # freeing space cannot help
    with pytest.raises(ray.exceptions.RayTaskError, match="Permission denied"):
        save.wait()
    assert save.tries == 1


@pytest.mark.parametrize("how", ["stop", "no wait"])
def test_a_stop_or_no_time_to_wait_gives_up(ray_local, tmp_path: Path, quick_retries, how: str) -> None:
    control = RunControl()
    save = saving(ray_local, tmp_path, failures=100, wait_s=0.0 if how == "no wait" else 30.0, control=control)
    if how == "stop":
        control.terminate()  # SIGTERM while it waits (pipeline/signals.py)
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="No space left on device"):
        save.wait()
    assert save.tries == 1 and time.monotonic() - started < 10


def test_a_save_the_learner_never_answers_fails_once_it_is_past_the_stall_timeout(ray_local, tmp_path: Path) -> None:
    # Before: the driver waited in ray.get until Ray's keepalive gave up on the stopped learner (minutes).
    save = saving(ray_local, tmp_path, failures=0, delay_s=60.0, hang_s=1.0)
    started = time.monotonic()
    with pytest.raises(LearnerHung, match=f"answered nothing for 1s while saving {tmp_path / 'final'} "):
        save.wait()
    assert time.monotonic() - started < 10 and save.tries == 1


@pytest.mark.slow
def test_a_run_whose_disk_is_full_at_the_end_keeps_its_weights_until_space_is_freed(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "3m"):
        pytest.skip("needs a tmpfs of its own (root with mount) to fill")
    proc: subprocess.Popen | None = None
    try:
        (disk / "filler").write_bytes(bytes(2_500_000))  # room for the run's logs, not for its 2.1 MB policy
        run_dir = disk / "run"
        proc = subprocess.Popen(train_command(run_dir, "learner.steps=6", "eval.every=0", "task.eval_prompts=16",
                                              "checkpoint.final_wait_s=300"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        said = [proc.stderr.readline()]
        while "the final save to" not in said[-1]:
            said.append(proc.stderr.readline())
            assert said[-1], f"the run ended without waiting for space: {''.join(said)[-3000:]}"
        (disk / "filler").unlink()  # the user frees space
        rest = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, rest[-3000:]
        assert "No space left on device" in said[-1] and "final save written to" in rest
        assert load_file(str(run_dir / "final" / "model.safetensors"))  # the trained weights, whole
        assert (run_dir / "summary.json").is_file()
        proc = None
    finally:
        if proc is not None:
            proc.kill()
        subprocess.run(["umount", "-l", str(disk)], check=False)
