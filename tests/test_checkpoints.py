"""CheckpointStore on real directories: atomic publication, checksums, fallback, keep-last-K."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from async_rlhf.checkpoint.store import MANIFEST, CheckpointStore
from async_rlhf.pipeline import live_clock


def fill_with(step: int):
    def fill(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(bytes([step % 256]) * 1000)
        (directory / "sub").mkdir()
        (directory / "sub" / "state.json").write_text(json.dumps({"step": step}))
    return fill


def test_write_seals_with_a_manifest_and_verifies(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    path = store.write(4, fill_with(4))
    assert path.name == "step-000004" and not list(store.root.glob("*.partial"))
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 4 and sorted(manifest["files"]) == ["sub/state.json", "weights.bin"]
    assert manifest["files"]["weights.bin"]["size"] == 1000
    assert store.problem(path) is None


def test_a_crash_while_writing_leaves_the_previous_checkpoint_valid(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    store.write(2, fill_with(2))

    def crash(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.write(4, crash)
    assert not store.path_for(4).exists()  # never published
    assert not list(store.root.glob("*.partial"))  # and what it wrote is gone: a full disk gets its space back
    store.path_for(4).with_name("step-000004.partial").mkdir()  # as a process killed mid-write leaves it
    warnings: list[str] = []
    latest = store.latest_valid(warnings.append)
    assert latest is not None and latest.step == 2 and warnings == []
    store.write(6, fill_with(6))  # the next write clears the leftover partial
    assert not list(store.root.glob("*.partial"))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: (p / "weights.bin").write_bytes(b"\x00" * 10), "weights.bin has 10 bytes, the manifest says 1000"),
    (lambda p: (p / "weights.bin").write_bytes(b"\x07" * 1000), "weights.bin does not match its checksum"),
    (lambda p: (p / "sub" / "state.json").unlink(), "sub/state.json is missing"),
    (lambda p: (p / MANIFEST).unlink(), "no MANIFEST.json (incomplete)"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage, reason: str) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    store.write(2, fill_with(2))
    store.write(4, fill_with(4))
    damage(store.path_for(4))
    warnings: list[str] = []
    latest = store.latest_valid(warnings.append)
    assert latest is not None and latest.path == store.path_for(2)
    assert warnings == [f"checkpoint step-000004 is not usable: {reason}; falling back to the previous one"]


def test_no_valid_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    assert store.latest_valid(print) is None  # no directory at all
    store.write(1, fill_with(1))
    (store.path_for(1) / "weights.bin").write_bytes(b"")
    assert store.latest_valid(lambda _: None) is None


def test_keeps_the_last_k(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3, 4, 5):
        store.write(step, fill_with(step))
        assert [c.step for c in store.checkpoints()] == list(range(max(1, step - 1), step + 1))
    assert sorted(p.name for p in store.root.iterdir()) == ["step-000004", "step-000005"]


def test_a_damaged_newer_checkpoint_does_not_count_toward_keep_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6):
        store.write(step, fill_with(step))
    (store.path_for(6) / "weights.bin").write_bytes(b"x")  # damaged: a resume goes back to step 4
    resumed = store.latest_valid(lambda _: None)
    assert resumed is not None and resumed.step == 4
    store.write(5, fill_with(5))  # e.g. a SIGTERM checkpoint before step 6 comes again
    assert [c.step for c in store.checkpoints()] == [4, 5]  # the damaged step 6 did not push out step 4
    assert all(store.problem(c.path) is None for c in store.checkpoints())


def test_rewriting_a_step_keeps_a_valid_one_and_replaces_a_damaged_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    store.write(3, fill_with(3))
    first = (store.path_for(3) / MANIFEST).stat().st_mtime_ns
    store.write(3, fill_with(99))  # e.g. a periodic checkpoint and SIGTERM at the same step
    assert (store.path_for(3) / MANIFEST).stat().st_mtime_ns == first
    (store.path_for(3) / "weights.bin").write_bytes(b"x")
    store.write(3, fill_with(3))
    assert store.problem(store.path_for(3)) is None


def test_a_new_process_of_a_run_removes_the_weights_of_the_killed_one(tmp_path: Path) -> None:
    from async_rlhf.pipeline.resume import WEIGHTS_MARKER, claim_weights_location

    run, shm = tmp_path / "run", tmp_path / "shm"
    run.mkdir()
    killed = shm / "async-rlhf-run-1"
    (killed / "v3").mkdir(parents=True)
    claim_weights_location(run, killed)  # the first process records where its weights are
    assert killed.is_dir()
    claim_weights_location(run, shm / "async-rlhf-run-2")  # the resumed process
    assert not killed.exists() and (run / WEIGHTS_MARKER).read_text() == str(shm / "async-rlhf-run-2")
    (run / WEIGHTS_MARKER).write_text(str(tmp_path))  # never removes what the broker did not create
    claim_weights_location(run, shm / "async-rlhf-run-3")
    assert tmp_path.is_dir()


def test_a_checkpoint_that_cannot_be_written_is_said_and_counted_and_the_run_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    controller.checkpoints.root.parent.mkdir(parents=True, exist_ok=True)
    controller.checkpoints.root.write_text("not a directory")  # as a full disk, the write fails at once
    request = controller.control.request_checkpoint()
    controller.take_checkpoints()  # returns: the loop would go on
    assert isinstance(request.exception(timeout=0), OSError)  # the requester (POST /control/checkpoint) is told
    assert controller.view.checkpoint_failures == 1
    err = capsys.readouterr().err
    assert re.match(r"\[async-rlhf\] warning: checkpoint at step -?\d+ not written \(NotADirectoryError: ", err)
    assert "MB free on its disk" in err
    assert err.strip().endswith("the run goes on, newest checkpoint: none")


def test_a_checkpoint_request_whose_requester_gave_up_is_skipped_not_fatal(tmp_path: Path) -> None:
    """POST /control/checkpoint timed out (504) and cancelled its future: answering it would raise
    InvalidStateError in the loop, or in run()'s finally, which then skipped the shutdown."""
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller
    from async_rlhf.pipeline.resume import fail_pending_checkpoints
    from async_rlhf.pipeline.state import RunPhase

    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    gone = controller.control.request_checkpoint()
    assert gone.cancel()
    controller.take_checkpoints()  # nobody waits: nothing written, nothing failed
    assert controller.view.checkpoint_failures == 0 and not controller.checkpoints.checkpoints()
    gone, waiting = controller.control.request_checkpoint(), controller.control.request_checkpoint()
    gone.cancel()
    fail_pending_checkpoints(controller.control, RunPhase.FAILED)
    assert "before the checkpoint was taken" in str(waiting.exception(timeout=0)) and gone.cancelled()


def test_an_error_of_the_runs_own_events_met_while_checkpointing_is_not_a_checkpoint_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Draining the generations in flight first handles the run's own events: a generator's error there must end
    the run (or fail over) as in the loop. Counted as a checkpoint not written, its lost chunk stayed counted in
    `outstanding` and the run stalled later with a wrong reason."""
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")

    def generator_error() -> None:
        raise ValueError("a generator's own error")

    monkeypatch.setattr(controller.pool, "drain", generator_error)
    request = controller.control.request_checkpoint()
    with pytest.raises(ValueError, match="a generator's own error"):
        controller.take_checkpoints()
    assert controller.view.checkpoint_failures == 0
    # its requester is told (POST /control/checkpoint answered it only at its own timeout)
    assert isinstance(request.exception(timeout=0), ValueError)


def test_the_time_a_checkpoint_takes_is_not_the_learners_stall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a checkpoint's drain held 30 s by a reward actor that hung counted against learner.stall_timeout_s,
    # which ended a synchronous run with "no learner step finished" (a chaos run by hand, 30 s stall timeout).
    import time

    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.controller import Controller

    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    monkeypatch.setattr(controller.pool, "drain", lambda: time.sleep(1.5))  # held by an actor that hangs
    controller.checkpoints.root.parent.mkdir(parents=True, exist_ok=True)
    controller.checkpoints.root.write_text("not a directory")  # the write then fails at once
    controller.control.request_checkpoint()
    controller.state.last_progress = live_clock.now() - 4
    controller.take_checkpoints()
    assert live_clock.now() - controller.state.last_progress == pytest.approx(4, abs=0.5)
