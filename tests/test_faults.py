"""Fault tolerance with real processes: generators SIGKILLed by pid mid-run."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import httpx
import psutil
import pytest

from async_rlhf.config.run import load_config
from async_rlhf.pipeline.controller import Controller
from tests.helpers import ROOT, as_in_a_terminal, read_jsonl
from tests.helpers import train_command as quickstart_command
from tests.test_loss_runs import STEPS as LOSS_STEPS
from tests.test_loss_runs import assert_raises_train_reward

pytestmark = pytest.mark.slow


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def train_command(run_dir: Path, *overrides: str, config: str = "quickstart.yaml") -> list[str]:
    """`async-rlhf train` on a quickstart config with a small evaluation, as its own process (so it can be
    signalled)."""
    return quickstart_command(run_dir, "eval.every=0", "task.eval_prompts=16", *overrides,
                              config=ROOT / "configs" / config)


def test_one_ctrl_c_writes_a_checkpoint_and_stops_cleanly(tmp_path: Path) -> None:
    # A terminal's Ctrl-C signals its whole group, Ray's processes included. (A SIGTERM to the whole group ends the
    # frozen run below; a SIGHUP, the closed terminal's.)
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, "learner.steps=100000")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=as_in_a_terminal)
    try:
        wait_until(lambda: (run_dir / "metrics.jsonl").is_file()
                   and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5, timeout=300)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert_stopped_with_a_checkpoint(run_dir)


def test_a_run_frozen_past_its_timeouts_with_its_workers_goes_on_as_if_nothing_happened(tmp_path: Path) -> None:
    # `docker pause` then unpause: the driver and every worker stop together (Ctrl-Z stops the driver only: Ray's
    # processes have process groups of their own). Before, on waking, the driver took the freeze for its actors'
    # silence: a healthy generator and learner killed (in the loop), or the run ended ("generation did not finish
    # within learner.stall_timeout_s while taking a checkpoint"). A checkpoint every step puts many of the freezes
    # inside one's waits, where it was always fatal.
    run_dir, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    cmd = train_command(run_dir, "learner.steps=100000", "learner.stall_timeout_s=10", "checkpoint.every=1",
                        "checkpoint.keep_last=1", "api.enabled=false")  # hang timeout 5 s
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or metrics.is_file() and len(metrics.read_text().splitlines()) >= 5,
                   timeout=300)
        tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(12)
        for pid in tree:
            os.kill(pid, signal.SIGCONT)
        frozen_at = len(metrics.read_text().splitlines())
        wait_until(lambda: len(metrics.read_text().splitlines()) >= frozen_at + 5 or proc.poll() is not None, 120)
        # `timeout`, `kill -- -PGID`: before, Ray's GCS stopped answering and the run hung in ray.shutdown() after its
        # outputs. The driver's own handling is that of a SIGTERM to its process alone (preemption).
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "answered nothing" not in err and "finished no step" not in err, err[-3000:]
    assert_stopped_with_a_checkpoint(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] >= frozen_at + 5
    assert summary["generator_restarts"] == summary["learner_restarts"] == summary["reward_restarts"] == 0


def assert_stopped_with_a_checkpoint(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert summary["stopped_early"] and len(checkpoints) == 1
    assert checkpoints[0].name == f"step-{summary['steps']:06d}"  # taken after the last step, nothing lost
    assert (checkpoints[0] / "model.safetensors").is_file() and (run_dir / "final" / "model.safetensors").is_file()


def test_a_closed_terminal_writes_a_checkpoint_and_stops_cleanly(tmp_path: Path) -> None:
    # An ssh session dropped: the terminal hangs up (writes to it then fail with EIO) and the shell sends SIGHUP to
    # the job's process group, Ray's own processes included. Before: the driver died at once, nothing saved.
    run_dir, (terminal, tty) = tmp_path / "run", pty.openpty()

    def own_terminal() -> None:  # preexec_fn: a session whose controlling terminal is the pty, as a login's
        os.setsid()
        fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a test runner under `nohup` passes SIGHUP on ignored

    proc = subprocess.Popen(train_command(run_dir, "learner.steps=100000"), cwd=ROOT, stdin=tty, stdout=tty,
                            stderr=tty, preexec_fn=own_terminal)
    os.close(tty)

    def five_steps_shown() -> bool:  # the terminal reads what it is sent, or the run would block writing to it
        while select.select([terminal], [], [], 0)[0]:
            os.read(terminal, 65536)
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 5

    try:
        wait_until(five_steps_shown, timeout=300)
        os.close(terminal)  # the hang-up
        os.killpg(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    assert_stopped_with_a_checkpoint(run_dir)


def test_sigterm_during_start_up_stops_without_waiting_for_the_engines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, "api.enabled=false")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    try:
        for line in proc.stdout:  # the workers are starting: vLLM engines take many seconds from here
            if "starting the learner, generators" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a hang check: without the fix it waited for start-up and two evals
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "SIGTERM during start-up: stopped before the first step" in err
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_a_workers_own_run_error_reaches_the_terminal_as_its_line_not_a_remote_traceback(tmp_path: Path) -> None:
    # The learner raising RunError, as its shared-memory ring does on a full tmpfs (tests/test_shm_ring.py):
    # here from a user's loss, the one place outside code can raise inside the learner.
    (tmp_path / "refusing_loss.py").write_text(
        "from async_rlhf.failures import RunError\n"
        "def refusing_loss(inputs, params):\n"
        "    raise RunError('my_loss: this batch is not what I expected; fix the data')\n"
    )
    cmd = train_command(tmp_path / "run", "loss.import_path=refusing_loss:refusing_loss", "api.enabled=false")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "[async-rlhf] run failed: my_loss: this batch is not what I expected; fix the data")
    assert "Traceback" not in proc.stderr


def test_repeated_nonfinite_losses_stop_the_run_with_a_checkpoint(tmp_path: Path) -> None:
    # A user's loss (loaded by loss.import_path) that always yields NaN: bad input from outside.
    (tmp_path / "broken_loss.py").write_text(
        "def nan_loss(inputs, params):\n"
        "    return (inputs.logps * inputs.mask).sum() * float('nan'), {}\n"
    )
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, "loss.import_path=broken_loss:nan_loss", "learner.max_nonfinite_steps=3",
                        "api.enabled=false")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "3 consecutive learner steps had a non-finite loss (learner.max_nonfinite_steps=3)" in message
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["nonfinite"] for r in records] == [1, 1, 1] and all(r["optimizer_step"] == 0 for r in records)
    checkpoint = run_dir / "checkpoints" / "step-000003"
    assert f"checkpoint: {checkpoint}" in message and (checkpoint / "model.safetensors").is_file()


def test_flaky_remote_reward_server_run_completes_and_counts_agree(ray_local, tmp_path: Path) -> None:
    """A real HTTP reward server on localhost that fails 30% of calls and sometimes stalls."""
    from async_rlhf.api.serving import ThreadedServer
    from tests.test_remote_reward import flaky_app

    app = flaky_app(fail_rate=0.3, slow_rate=0.1, slow_s=1.5, seed=3)
    app.state.name = "sort_partial"
    server = ThreadedServer(app)
    url = server.start()
    steps = 20
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"learner.steps={steps}", "eval.every=0", "task.eval_prompts=16", "api.enabled=false",
        f"reward.remote.url={url}", "reward.remote.timeout_s=0.5", "reward.remote.retries=1",
        "reward.remote.backoff_s=0.01", f"reward.max_failed_steps={steps}"])  # a whole batch may fail: that's the point
    controller = Controller(cfg, tmp_path)
    try:
        summary = controller.run()
    finally:
        server.stop()
        for handle in [controller.parts.learner, controller.parts.reward] + [g.handle for g in controller.pool.slots]:
            ray_local.kill(handle)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    counts = controller.view.reward_counts
    assert summary["steps"] == steps  # the run completed despite the faults
    assert counts["failed"] + counts["timed_out"] > 0 and counts["ok"] > 0  # faults did get through the retries
    # Every failed completion is counted once, everywhere, and none was trained as a reward.
    assert summary["failed_reward"] == counts["failed"] + counts["timed_out"]
    assert sum(counts.values()) == summary["episodes"]
    assert sum(r["skipped_failed"] for r in records) * 4 == summary["failed_reward"]  # whole groups skipped


def test_a_run_whose_rewards_all_fail_stops_within_k_steps_with_the_reason(ray_local, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A real HTTP reward model that answers an HTML error page to every call: the run must not "complete". And a
    gold reward of the user's own that raises: its evaluation says so once, and logs how many failed."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from async_rlhf.api.serving import ThreadedServer
    from async_rlhf.pipeline.controller import RunError

    app = FastAPI()
    app.post("/score")(lambda: HTMLResponse("<html>502 Bad Gateway</html>"))
    server = ThreadedServer(app)
    url = server.start()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        "learner.steps=20", "eval.every=0", "task.eval_prompts=16", "api.enabled=false", f"reward.remote.url={url}",
        "reward.remote.retries=0", "reward.max_failed_steps=2", "reward.gold=tests.test_reward_service:raising"])
    controller = Controller(cfg, tmp_path)
    try:
        with pytest.raises(RunError) as caught:
            controller.run()
    finally:
        server.stop()
    message = str(caught.value)
    assert message.startswith("2 learner steps in a row had no usable reward from the train reward (remote reward "
                              f"model {url}): 64 of 64 items of the last batch failed, the first because: malformed "
                              "reward server reply: content type 'text/html")
    assert "(reward.max_failed_steps=2); checkpoint: " in message and "--resume RUN_DIR" in message
    assert (tmp_path / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    (initial,) = read_jsonl(tmp_path / "eval.jsonl")  # version 0's, awaited by the checkpoint
    assert initial["gold_failed"] == 16 and initial["gold_reward"] is None
    err = capsys.readouterr().err
    assert err.count("gold rewards failed") == 1
    assert ("[async-rlhf] warning: evaluation of version 0: 16 of 16 gold rewards failed (reward.gold "
            "'tests.test_reward_service:raising'), the first because: RuntimeError: reward model crashed; gold_reward "
            "leaves them out") in err


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state; the name may hold spaces


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = parent_pid(pid)
    return False


def role_pid(title: str, root: int) -> int | None:
    """The pid of the process Ray titled `ray::<title>...` (its actor) in the process tree of `root` (the
    run's CLI process: Ray's processes are its descendants), if one is running; another run's is not it."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(f"ray::{title}".encode()) \
                    and descends_from(int(entry.name), root):
                return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


def signal_at_step(run_dir: Path, step: int, title: str, signum: signal.Signals,
                   *overrides: str) -> tuple[subprocess.Popen, int]:
    """A quickstart run as its own process, and the pid of its actor `title`, sent `signum` after step `step`."""
    proc = subprocess.Popen(train_command(run_dir, *overrides, "api.enabled=false"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= step, timeout=600)
    pid = role_pid(title, proc.pid)
    assert pid is not None
    os.kill(pid, signum)
    return proc, pid


def test_a_learner_killed_past_max_restarts_ends_the_run_with_one_line_and_the_traceback_in_error_log(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, pid = signal_at_step(run_dir, 3, "Learner", signal.SIGKILL, "learner.steps=400", "learner.max_restarts=0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"[async-rlhf] run failed: the Learner actor died (pid {pid}; its log is under ")
    assert f"traceback in {run_dir / 'error.log'}" in line
    # Killed before its first checkpoint (checkpoint.every=50): nothing to --resume from, so none is offered.
    assert "start it again with `async-rlhf train " in line and "--resume" not in line
    assert line.endswith("(it wrote no checkpoint to continue from)")
    assert "Traceback" not in err and "Traceback" in (run_dir / "error.log").read_text()


def test_a_hung_generator_and_a_hung_reward_actor_are_restarted_and_every_prompt_trained_once(tmp_path: Path) -> None:
    """SIGSTOP stands in for a wedged engine, a collective that never completes or a scorer that never returns:
    alive to Ray, answering nothing. Before: the run waited for learner.stall_timeout_s (600 s) and ended. (A
    SIGKILLed generator or reward actor, in its start or mid-run: the chaos test below.) The run is RLOO's end to end
    (group baselines: tests/test_loss_runs.py's path of that kind), with its train-reward check."""
    run_dir, steps = tmp_path / "run", LOSS_STEPS
    # Every batch through the reward actor (a rule reward is otherwise scored inside the generator's call).
    cmd = train_command(run_dir, f"learner.steps={steps}", "api.enabled=false", "reward.score_in_generator=false",
                        "generation.hang_timeout_s=5", config="quickstart_rloo.yaml")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    stopped: list[int] = []
    try:
        for at_step, title in ((5, "GeneratorActor"), (15, "RewardService")):
            wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= at_step,  # noqa: B023
                       timeout=600)  # (B023: the predicate is called in this iteration only)
            pid = role_pid(title, proc.pid)
            assert pid is not None
            stopped.append(pid)
            os.kill(pid, signal.SIGSTOP)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "generator 0 has answered nothing for " in err and "the reward actor has answered nothing for " in err
    assert err.count("killing it so that Ray restarts it") == 2 and "Traceback" not in err
    # Ray's own paragraph on each worker death goes to the run's ray_errors.log, not the terminal
    assert "(raylet)" not in out + err and "worker died" not in out + err
    ray_errors = run_dir / "ray_errors.log"
    assert not ray_errors.exists() or "A worker died" in ray_errors.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["generator_restarts"] == summary["reward_restarts"] == 1
    # Same number of trained samples as an undisturbed run, each prompt exactly once, none lost.
    records = read_jsonl(metrics)
    assert sorted(pid for r in records for pid in r["prompt_ids"]) == list(range(steps * 16))
    assert summary["episodes"] == steps * 16 * 4 and all(r["staleness_max"] <= 1 for r in records)
    assert summary["failed_reward"] == 0 and summary["dropped_stale"] == 0  # generated again, not failed or stale
    assert not any(Path(f"/proc/{pid}").exists() for pid in stopped)  # killed, not left stopped
    assert_raises_train_reward("rloo", summary, records)


def stop_learner(proc: subprocess.Popen, stopped: list[int]) -> None:
    """SIGSTOP the run's learner, which stands in for a collective that never completes: alive, answering nothing."""
    pid = role_pid("Learner", proc.pid)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)


def pause_between_checkpoints(client: httpx.Client, every: int) -> None:
    """Paused, the step in flight landed (the learner idle, as for any checkpoint), at a step without a checkpoint
    of its own (a checkpoint asked for there would be the one already written)."""
    while True:
        assert client.post("/control/pause").status_code == 200
        wait_until(lambda: client.get("/status").json()["phase"] == "paused", timeout=60)
        time.sleep(2.0)
        step = client.get("/status").json()["step"]
        if step % every:
            return
        assert client.post("/control/resume").status_code == 200
        wait_until(lambda: client.get("/status").json()["step"] > step, timeout=60)  # noqa: B023 (this iteration)


def test_a_learner_that_hangs_in_its_step_or_in_a_checkpoint_is_replaced_from_the_newest_checkpoint(
        tmp_path: Path) -> None:
    """Before: hung in its step, the run ended ("no learner step finished for ..."); hung in a checkpoint's save,
    the driver waited in ray.get until Ray's keepalive gave up (~420 s). A stall timeout (5 s) below the run's
    start-up and the new learner's (~10 s each here): before, both counted, and the run ended there. The run is
    PPO's end to end (a value model: tests/test_loss_runs.py's path of that kind), with its train-reward check, so
    the value model and its optimizer also come back from the checkpoints the learner is replaced from."""
    run_dir, steps, token = tmp_path / "run", LOSS_STEPS, "test-token-0123456789abcdef"
    cmd = train_command(run_dir, f"learner.steps={steps}", "checkpoint.every=3", "learner.stall_timeout_s=5",
                        f"api.token={token}", config="quickstart_ppo.yaml")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, stopped = run_dir / "metrics.jsonl", list[int]()
    try:
        wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5, timeout=600)
        stop_learner(proc, stopped)  # in its step (the next one is dispatched as soon as step 5 is in)
        client = httpx.Client(base_url=(run_dir / "api_url").read_text().strip(), timeout=120,
                              headers={"Authorization": f"Bearer {token}"})
        wait_until(lambda: client.get("/status").json()["step"] >= 10, timeout=300)  # replaced, and training
        pause_between_checkpoints(client, every=3)
        stop_learner(proc, stopped)
        reply = client.post("/control/checkpoint")  # waits on the hung learner for learner.stall_timeout_s
        assert reply.status_code == 500, reply.text
        assert "answered nothing for 5s while saving a checkpoint" in reply.text
        assert client.post("/control/resume").status_code == 200
        _, err = proc.communicate(timeout=600)
    except BaseException:
        proc.kill()  # a failed assertion must not leave the run (and its stopped learner) behind
        print(proc.communicate()[1][-5000:])  # the run's own account, shown with the failure
        raise
    assert proc.returncode == 0, err[-3000:]
    assert "the learner has finished no step for " in err and "killing it, to replace it from the newest" in err
    assert "while saving a checkpoint (learner.stall_timeout_s=5; its log is under " in err
    summary, records = json.loads((run_dir / "summary.json").read_text()), read_jsonl(metrics)
    assert summary["steps"] == steps and summary["learner_restarts"] == 2
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert not any(Path(f"/proc/{pid}").exists() for pid in stopped)  # killed, not left stopped
    assert_raises_train_reward("ppo", summary, records)


ROLES = {"generator": "GeneratorActor", "reward": "RewardService", "learner": "Learner"}


def test_chaos_a_generator_the_reward_actor_and_the_learner_killed_at_seeded_moments(tmp_path: Path) -> None:
    """One run, each role SIGKILLed once by pid at a seeded step and delay; it finishes with the --resume
    guarantees (every step once, every prompt once, staleness within N) and counts each restart. With an
    evaluation in flight at nearly every moment (eval.every=2; the reward actor scores only evaluations here),
    each evaluation is still logged once, in version order (a dead generator or reward actor: made again; a dead
    learner: the pending ones dropped with the rolled-back steps, version 0's made again). The generator and the
    learner also die in their start (vLLM's import and engine, DeepSpeed's): both are started again and counted.
    The learner dies before the first checkpoint (step 20) and in the run's end (the final evaluation or save) too:
    replaced from the run's start, then from step 20; before, each ended the run."""
    rng = random.Random(18)
    run_dir, steps = tmp_path / "run", 30
    plan = sorted(zip(rng.sample(range(4, 24), 3), rng.sample(sorted(ROLES), 3)))
    proc = subprocess.Popen(train_command(run_dir, f"learner.steps={steps}", "checkpoint.every=20", "eval.every=2",
                                          "task.eval_prompts=64", "api.enabled=false", "learner.max_restarts=3"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        for role in ("generator", "learner"):  # in their start (each took seconds): a dead learner ended the run
            wait_until(lambda: role_pid(ROLES[role], proc.pid) is not None, timeout=300)  # noqa: B023 (this iteration)
            starting = role_pid(ROLES[role], proc.pid)
            assert starting is not None and not metrics.exists()
            os.kill(starting, signal.SIGKILL)
        for at_step, role in plan:
            wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= at_step,  # noqa: B023
                       timeout=600)  # (B023: the predicate is called in this iteration only)
            time.sleep(rng.uniform(0.0, 0.5))
            pid = role_pid(ROLES[role], proc.pid)
            assert pid is not None, role
            os.kill(pid, signal.SIGKILL)
            # Back before the next kill (B023: the predicate is called in this iteration only).
            wait_until(lambda: role_pid(ROLES[role], proc.pid) not in (None, pid), timeout=120)  # noqa: B023
        wait_until(lambda: len(metrics.read_text().splitlines()) >= steps, timeout=600)
        ending = role_pid(ROLES["learner"], proc.pid)  # in the run's end: its final evaluation's KL pass or save
        assert ending is not None
        os.kill(ending, signal.SIGKILL)  # it ended the run
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_jsonl(metrics)
    assert [r["step"] for r in records] == list(range(1, steps + 1)) and "Traceback" not in err
    assert sorted(p for r in records for p in r["prompt_ids"]) == list(range(steps * 16))
    assert all(r["staleness_max"] <= 1 for r in records)
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["version"] for e in evals] == list(range(0, steps + 1, 2)), (plan, err[-3000:])
    assert [e["episodes"] for e in evals] == [e["version"] * 16 * 4 for e in evals]  # 16 prompts x 4 samples
    restarts = {role: summary[f"{role}_restarts"] for role in ROLES}
    assert restarts == {"generator": 2, "reward": 1, "learner": 3}, (plan, restarts)
    assert "generator 0 died while starting and Ray started it again" in err
    assert "replaced it from the start (no checkpoint written yet)" in err and summary["episodes"] == steps * 16 * 4
    assert "the learner failed while starting (the Learner actor died" in err
    assert "the learner failed at step 30 (the Learner actor died" in err and "steps 21..30 are trained again" in err
