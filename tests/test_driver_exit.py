"""How a run's driver ends, as real processes, and what it leaves: nothing running, nothing in shared memory.

Ctrl-C in a terminal goes to the whole foreground process group (the CLI and Ray's own processes; each actor
has a group of its own): one line and exit 130 when the run stops now, no traceback. A driver killed outright
(SIGKILL, the OOM killer) runs no clean-up of its own: its reaper does (cluster/reaper.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from async_rlhf.pipeline.builder import GENERATOR_SCRATCH
from tests.helpers import ROOT, as_in_a_terminal
from tests.helpers import train_command as quickstart_command

pytestmark = pytest.mark.slow
STARTING = "starting the learner, generators"  # printed once Ray is up, as the workers start


def session_pids(session: int) -> list[int]:
    """The processes of a session (field 6 of /proc/PID/stat): the CLI started as its leader, and everything it
    and Ray started, actors included."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[3]) == session:
            pids.append(int(entry.name))
    return pids


def assert_nothing_left(session: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while session_pids(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(Path(f"/proc/{pid}/cmdline").read_bytes()[:60], pid) for pid in session_pids(session)]
    assert not left, f"still running after the run stopped: {left}"


def ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(quickstart_command(run_dir, "api.enabled=false", *overrides), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_in_a_terminal)


def read_until(stream: IO[str] | None, text: str) -> None:
    assert stream is not None  # a PIPE
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"the run ended without printing {text!r}")


def test_ctrl_c_during_start_up_stops_now_with_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc = start(tmp_path / "run")
    try:
        read_until(proc.stdout, STARTING)  # Ray is up and the workers are starting: seconds of vLLM and DeepSpeed
        ctrl_c(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("[async-rlhf] interrupted (Ctrl-C) during start-up: stopped before the "
                                            "first step, nothing to checkpoint; start the run again (or --resume "
                                            "RUN_DIR, whose checkpoints are untouched)")
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert_nothing_left(proc.pid)


@pytest.mark.parametrize("delay_s", [0.0, 1.5])
def test_a_sigterm_to_the_group_while_ray_starts_stops_with_one_line_and_leaves_nothing_running(
        delay_s: float, tmp_path: Path) -> None:
    # `timeout` at start-up. After the run directory's line the CLI imports for ~0.4 s, then ray.init takes ~2.5 s:
    # a SIGTERM there met Ray's sys.exit (a silent exit 15) or its core worker's crash handler (a stack dump).
    proc = start(tmp_path / "run")
    try:
        read_until(proc.stdout, "run directory:")
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines() == [
        "[async-rlhf] run failed: SIGTERM during start-up: stopped before the first step, nothing to checkpoint; start "
        "the run again (or --resume RUN_DIR, whose checkpoints are untouched)"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert_nothing_left(proc.pid)


def test_ctrl_c_twice_in_a_run_stops_before_the_final_evaluation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, "learner.steps=100000")
    try:
        read_until(proc.stdout, STARTING)
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file():  # a first step: the first Ctrl-C is a stop and a checkpoint
            assert time.monotonic() < deadline and proc.poll() is None, "no first step"
            time.sleep(0.05)
        ctrl_c(proc)
        read_until(proc.stderr, "[async-rlhf] Ctrl-C: checkpointing at the next safe point")  # its handler ran
        ctrl_c(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"[async-rlhf] interrupted (Ctrl-C) again: stopped now, without the final evaluation; the checkpoints "
        f"written so far are in {run_dir / 'checkpoints'} (`--resume {run_dir}` continues from the newest)")
    assert "Traceback" not in err and not (run_dir / "summary.json").exists()
    assert_nothing_left(proc.pid)


def test_a_ctrl_c_during_ray_init_is_raised_once_ray_is_whole_and_ray_is_shut_down_at_exit() -> None:
    # Interrupted halfway, ray.init() left Ray's dashboard and runtime-env agents running with no raylet.
    script = ("import os, signal, threading, ray\n"
              "from async_rlhf.cluster.local_ray import init_local_ray\n"
              "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
              "try:\n"
              "    init_local_ray(num_cpus=1)\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted once Ray was up:', ray.is_initialized(), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    out, err = proc.communicate(timeout=120)
    assert "interrupted once Ray was up: True" in out, err[-3000:]
    assert_nothing_left(proc.pid)


def test_a_sigterm_to_the_drivers_group_leaves_ray_serving_the_driver() -> None:
    # `timeout`, `kill -- -PGID` and job schedulers signal the whole group. It reached Ray's GCS, which stopped
    # answering, and the raylet, which exits ~10 s later without its GCS, killing every actor: in CI the learner
    # died before the driver's checkpoint ("the learner died at step 6 ... Socket closed").
    script = ("import os, signal, time, ray\n"
              "from async_rlhf.cluster.local_ray import gcs_answers, init_local_ray\n"
              "init_local_ray(num_cpus=1)\n"
              "signal.signal(signal.SIGTERM, lambda *_: print('driver got SIGTERM', flush=True))\n"
              "os.killpg(0, signal.SIGTERM)\n"
              "time.sleep(1)  # the GCS's own stop takes well under that\n"
              "print('the GCS answers:', gcs_answers(), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert "driver got SIGTERM" in out and "the GCS answers: True" in out, err[-3000:]
    assert_nothing_left(proc.pid)


def test_a_driver_killed_outright_leaves_no_ray_process_and_no_weights_in_shared_memory(tmp_path: Path) -> None:
    run_dir, shm_root = tmp_path / "run", tmp_path / "shm"
    shm_root.mkdir()
    proc = start(run_dir, "learner.steps=100000", f"weight_sync.shm_root={shm_root}")
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file():  # training: the ring holds published weights
            assert time.monotonic() < deadline and proc.poll() is None, "no first step"
            time.sleep(0.05)
        ring = [p for p in shm_root.iterdir() if p.name.startswith("async-rlhf-")]
        assert len(ring) == 1 and any(ring[0].iterdir())
        # vLLM's engine file for its process group is in the run's scratch directory, not left in /tmp.
        assert list((ring[0] / GENERATOR_SCRATCH).glob("vllm_dist_*"))
        proc.kill()  # SIGKILL: no handler, no atexit, no finally
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert_nothing_left(proc.pid)  # Ray's agents lingered a minute or more without the reaper
    deadline = time.monotonic() + 15
    while ring[0].exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ring[0].exists(), sorted(str(p.relative_to(ring[0])) for p in ring[0].rglob("*"))


def test_a_local_gcs_killed_mid_run_stops_it_with_a_checkpoint_of_its_last_step_and_one_line(tmp_path: Path) -> None:
    """Every worker still answered (their calls go worker to worker), so the run trained on until Ray's core worker
    ended the driver 60 s later with a C++ line ("Failed to connect to GCS within 60 seconds"), every step since the
    last checkpoint lost. The run's GCS watch now stops it within seconds, its last step checkpointed."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "learner.steps=100000", "checkpoint.every=0", "eval.every=0")
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
        while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "no third step"
            time.sleep(0.05)
        (gcs,) = [pid for pid in session_pids(proc.pid) if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(gcs, signal.SIGKILL)
        _, err = proc.communicate(timeout=50)  # well inside Ray's own 60 s
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    line, steps = err.strip().splitlines()[-1], len(metrics.read_text().splitlines())
    assert line.startswith("[async-rlhf] run failed: RayLost: Ray's GCS stopped answering"), err[-3000:]
    assert f"checkpoint: {run_dir / 'checkpoints' / f'step-{steps:06d}'};" in line
    assert line.endswith(f"--resume {run_dir}` (from its newest checkpoint)")
    assert "Traceback" not in err and "Failed to connect to GCS" not in err
    assert_nothing_left(proc.pid)
