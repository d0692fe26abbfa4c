"""Runs that join a Ray cluster started with `ray start` (ray.address): real clusters on this machine, one with
token authentication and one without (async_rlhf/cluster/existing_ray.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from async_rlhf.cluster.existing_ray import AUTH_MODE, prepare_join
from async_rlhf.config.base import ConfigError
from tests.helpers import ROOT, free_port, train_command

TOKEN = "0123456789abcdef0123456789abcdef"  # the token cluster's; a test token, not a credential
RAY = str(Path(sys.executable).with_name("ray"))


@contextmanager
def ray_cluster(token: str | None) -> Iterator[tuple[str, Path]]:
    """A 2-CPU head node of its own (`ray start --head --block`, stopped with everything it started when its
    process ends): its GCS address, and the RAY_TMPDIR under which `auto` finds it as it finds a default `ray
    start` under /tmp (TMP/ray/ray_current_cluster). With `token`, it asks for that token."""
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    auth = {AUTH_MODE: "token", "RAY_AUTH_TOKEN": token} if token else {AUTH_MODE: "disabled"}
    command = [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={port}", f"--temp-dir={temp / 'ray'}",
               "--include-dashboard=false", "--disable-usage-stats"]
    log = (temp / "ray_start.log").open("w")
    head = subprocess.Popen(command, env={**os.environ, **auth}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_text(temp / "ray_start.log", "ray status", head)
        yield f"127.0.0.1:{port}", temp
    finally:
        head.terminate()
        head.wait(timeout=60)
        log.close()


def wait_for_text(path: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while text not in path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, path.read_text()[-2000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def open_cluster() -> Iterator[tuple[str, Path]]:
    with ray_cluster(None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[tuple[str, Path]]:
    with ray_cluster(TOKEN) as cluster:
        yield cluster


@pytest.fixture
def no_token_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process's Ray settings cleared; HOME (where ~/.ray/auth_token lives) a fresh directory."""
    for name in (AUTH_MODE, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def token_in_home(home: Path, token: str) -> None:
    """A token where every local ray.init since Ray 2.59 leaves one."""
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)


def test_nothing_at_the_address_is_one_line_not_minutes_of_retries(no_token_here: Path) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port}: no Ray cluster answers at \S+:{port} "
                                          r"\(Connection refused\); start it with `ray start --head` there"):
        prepare_join(f"127.0.0.1:{port}")


def test_auto_with_no_cluster_found_says_so(no_token_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "not-an-address")  # what `auto` reads first
    with pytest.raises(ConfigError, match="ray.address=auto: no Ray cluster found .*`ray start --head`"):
        prepare_join("auto")


def test_an_open_cluster_is_joined_without_a_token_even_where_one_exists(open_cluster: tuple[str, Path],
                                                                         no_token_here: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    address, temp = open_cluster
    token_in_home(no_token_here, "a-token-for-some-other-cluster")
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    assert prepare_join("auto").endswith(address.rpartition(":")[2])
    assert os.environ[AUTH_MODE] == "disabled"  # Ray would have turned token mode on for `auto`: actors refused


def test_token_mode_toward_an_open_cluster_is_refused(open_cluster: tuple[str, Path], no_token_here: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_MODE, "token")
    with pytest.raises(ConfigError, match=f"has no token authentication, and with {AUTH_MODE}=token here .*; unset"):
        prepare_join(open_cluster[0])


def test_a_token_cluster_needs_token_mode_for_an_explicit_address(token_cluster: tuple[str, Path],
                                                                  no_token_here: Path) -> None:
    token_in_home(no_token_here, TOKEN)  # there, but Ray sends none to an address given by hand
    with pytest.raises(ConfigError, match=f"asks for its authentication token; run with {AUTH_MODE}=token and the "
                                          r"cluster's token \(`ray get-auth-token` on its head node\) in"):
        prepare_join(token_cluster[0])


def test_a_token_cluster_without_a_token_here_or_with_another_says_which(token_cluster: tuple[str, Path],
                                                                         no_token_here: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_MODE, "token")
    with pytest.raises(ConfigError, match="asks for its authentication token and none is set here"):
        prepare_join(token_cluster[0])
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 32)
    with pytest.raises(ConfigError, match="refuses the token set here") as refused:
        prepare_join(token_cluster[0])
    assert "f" * 32 not in str(refused.value)  # a credential is never repeated


def test_a_token_cluster_is_joined_with_its_token(token_cluster: tuple[str, Path], no_token_here: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_MODE, "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert prepare_join(token_cluster[0])
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv(AUTH_MODE)
    token_in_home(no_token_here, TOKEN)
    monkeypatch.setenv("RAY_TMPDIR", str(token_cluster[1]))
    assert prepare_join("auto")  # a cluster of this node: Ray itself sends the token there


def on_cluster(address: str, script: str) -> subprocess.CompletedProcess:
    """`script` run by a driver of its own joined to the cluster (this process may hold the tests' local Ray)."""
    joined = f"import ray; ray.init(address='{address}', logging_level='ERROR')\n{script}"
    return subprocess.run([sys.executable, "-c", joined], env={**os.environ, AUTH_MODE: "disabled"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_death_on_a_joined_cluster_names_the_clusters_logs_after_ray_is_down(open_cluster: tuple[str, Path]
                                                                               ) -> None:
    """A death's line named /tmp/ray/session_latest/logs: another Ray's logs for a run on a cluster. The line is
    said after the run's Ray connection is closed (cli/main.py), so the run notes the directory on the error."""
    address, temp = open_cluster
    out = on_cluster(address, "from async_rlhf.failures import note_ray_logs, what_died\n"
                     "actor = ray.remote(num_cpus=0)(type('Doomed', (), {'ping': lambda self: 1})).remote()\n"
                     "ray.get(actor.ping.remote()); ray.kill(actor)\n"
                     "for _ in range(100):  # a call during the kill may find the actor unavailable, not yet dead\n"
                     "    try:\n        ray.get(actor.ping.remote())\n"
                     "    except ray.exceptions.ActorDiedError as exc:\n"
                     "        note_ray_logs(exc); ray.shutdown(); print(what_died(exc)); break\n"
                     "    except ray.exceptions.RayActorError:\n        pass")
    logs = re.search(r"the Doomed actor died \(.*under (\S+)\)", out.stdout)
    assert logs is not None, out.stdout + out.stderr[-2000:]
    assert Path(logs[1]).is_dir() and Path(logs[1]).is_relative_to(temp)


def test_actors_a_busy_cluster_cannot_place_are_named_and_the_wait_is_bounded(open_cluster: tuple[str, Path]
                                                                              ) -> None:
    """Another job holds both CPUs of the 2-CPU cluster: an actor asking for one waited without a word, for good
    (a run's learner and generators did). The run's watch names it, and stops the wait at its limit."""
    out = on_cluster(open_cluster[0], "from async_rlhf.cluster.placement import unplaced\n"
                     "from async_rlhf.pipeline.startup import PlacementWatch\n"
                     "holder = ray.remote(num_cpus=2)(type('Holder', (), {'ping': lambda self: 1})).remote()\n"
                     "ray.get(holder.ping.remote())\n"
                     "waiter = ray.remote(num_cpus=1)(type('Waiter', (), {'ping': lambda self: 1})).remote()\n"
                     "watch = PlacementWatch(lambda: unplaced({'the holder': holder, 'generator 0': waiter}), 30)\n"
                     "watch.check(11); watch.check(12)\n"
                     "try:\n    watch.check(31)\n"
                     "except Exception as exc:\n    print(type(exc).__name__, exc)")
    assert out.stdout.splitlines() == [
        "[async-rlhf] waiting for the Ray cluster to place generator 0 (0 of 2 CPUs free: other jobs hold the "
        "rest); the run stops if they wait past 30s",
        "RunError the Ray cluster did not place generator 0 within 30s (learner.stall_timeout_s; 0 of 2 CPUs free: "
        "other jobs hold the rest); stop those or add nodes, then start the run again"], out.stderr[-2000:]


@pytest.mark.slow
def test_a_run_on_a_cluster_joined_by_auto_trains_and_leaves_the_cluster_up(open_cluster: tuple[str, Path],
                                                                             tmp_path: Path) -> None:
    """The case that failed: `auto`, a token on this machine, a cluster without authentication (every actor's
    creation was cancelled: "the Learner actor died"). After the run the cluster is still up, with its CPUs free:
    the run's end disconnected from it and its actors went with it."""
    address, temp = open_cluster
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_TOKEN": "a-token-for-some-other-cluster"}
    env.pop(AUTH_MODE, None)  # a user's shell has none; this process has Ray's, if a test here started a local Ray
    cmd = train_command(tmp_path / "run", "ray.address=auto", "learner.steps=6", "eval.every=0", "api.enabled=false")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining the Ray cluster at" in done.stdout and "Traceback" not in done.stderr
    wait_for_free_cpus(address, {**env, AUTH_MODE: "disabled"})


def test_an_unset_address_starts_a_ray_of_the_runs_own_beside_a_cluster_on_this_machine(
        open_cluster: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: with ray.address unset ("a Ray of the run's own") ray.init joined the cluster that $RAY_ADDRESS or a
    # `ray start` on this machine named, and the run failed: "When connecting to an existing cluster, num_cpus and
    # num_gpus must not be provided."
    from async_rlhf.cli.main import environment_notes
    from async_rlhf.config.run import RunConfig

    address, temp = open_cluster
    code = ("import ray\nfrom async_rlhf.cluster.local_ray import shutdown_local_ray\n"
            "from async_rlhf.config.run import RunConfig\nfrom async_rlhf.pipeline.startup import ray_init_kwargs\n"
            "ray.init(**ray_init_kwargs(RunConfig(), 1))\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\nshutdown_local_ray()")
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_ADDRESS": address, AUTH_MODE: "disabled"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=180)
    gcs = re.search(r"GCS (\S+)", out.stdout)
    assert gcs is not None, out.stderr[-3000:]
    assert gcs.group(1).rpartition(":")[2] != address.rpartition(":")[2]  # a Ray of its own
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    [note] = environment_notes(RunConfig())
    assert note.startswith("note: RAY_ADDRESS is set but ray.address is not: this run starts a Ray of its own")
    assert environment_notes(RunConfig(ray={"address": "auto"})) == []


def wait_for_free_cpus(address: str, env: dict[str, str]) -> None:
    """`ray status` of the cluster shows none of its 2 CPUs in use (Ray's accounting lags an exit by a moment)."""
    deadline = time.monotonic() + 60
    while True:
        status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True,
                                timeout=60)
        if " 0.0/2.0 CPU" in status.stdout:
            return
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)


@pytest.mark.slow
def test_a_cluster_whose_gcs_dies_mid_run_ends_it_with_its_line_and_the_resume_command(tmp_path: Path) -> None:
    """The run waited in a generator's restart probe until Ray's core worker ended the driver 60 s later with a C++
    line and no way on. Its own line now comes first, naming the newest checkpoint's way back."""
    with ray_cluster(None) as (address, temp):
        run_dir = tmp_path / "run"
        cmd = train_command(run_dir, f"ray.address={address}", "learner.steps=5000", "checkpoint.every=5",
                            "eval.every=0", "api.enabled=false")
        run = subprocess.Popen(cmd, env={**os.environ, AUTH_MODE: "disabled"}, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while not list((run_dir / "checkpoints").glob("step-*")):
                assert run.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
            gcs = subprocess.run(["pgrep", "-f", f"gcs_server.*{temp}"], capture_output=True, text=True).stdout
            os.kill(int(gcs.split()[0]), 9)
            _, err = run.communicate(timeout=50)  # well inside Ray's own 60 s
        finally:
            run.kill()
    assert run.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("[async-rlhf] run failed: RayLost: Ray's GCS stopped answering") and "Traceback" not in err
    assert line.endswith(f"--resume {run_dir}` (from its newest checkpoint)")
