"""Joining a Ray cluster started with `ray start` (`ray.address`): asked first, joined only if it can take the run.

Found by hand (Ray 2.60, a `ray start --head` cluster on this machine):
- nothing at the address: ray.init retried its GCS connection for minutes (a 300 s `timeout` ended it still
  retrying, a warning on the terminal every few seconds), with Ctrl-C held all along;
- a cluster with token authentication (Ray 2.59+ turns it on where ~/.ray/auth_token exists, and every local
  ray.init writes one) joined without RAY_AUTH_MODE=token: 20 s of warnings, then "Failed to connect";
- `auto` with a token on this machine, toward a cluster without authentication: Ray turned the driver's token
  mode on, the cluster's calls back to the driver carried no token and were refused, and every actor's creation
  was cancelled ("the Learner actor died").
So the cluster's GCS is asked first, from child processes (Ray reads RAY_AUTH_MODE once per process:
gcs_probe.py), whether it answers and whether it asks for a token. A cluster that cannot take the run is said in
one line before anything starts; one that can is joined in its own authentication mode. A token is sent only
where Ray itself would send it: with RAY_AUTH_MODE=token, or to `auto` (a cluster of this node).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from async_rlhf.config.base import ConfigError

AUTH_MODE = "RAY_AUTH_MODE"
PROBE_S = 30.0  # a GCS that has not answered in this long is taken for down
TOKEN_PLACES = "$RAY_AUTH_TOKEN, a file named by $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


@dataclass(frozen=True)
class GcsAnswer:
    """What gcs_probe.py printed: its answer, the GCS it asked (HOST:PORT) and Ray's reason, if any."""

    answer: str
    gcs: str = ""
    detail: str = ""


def prepare_join(address: str) -> str:
    """The GCS address (HOST:PORT) of the cluster at `address`, with RAY_AUTH_MODE set for ray.init to join it in
    its own mode (the module docstring says why); ConfigError if it cannot take this run."""
    user_mode = os.environ.get(AUTH_MODE, "").lower() or None
    first = ask_gcs(address, "disabled")
    where = f"config error: ray.address={address}"
    if first.answer == "open":
        if user_mode == "token":
            raise ConfigError(f"{where}: the Ray cluster at {first.gcs} has no token authentication, and with "
                              f"{AUTH_MODE}=token here this driver would refuse the cluster's calls; unset {AUTH_MODE}")
        os.environ[AUTH_MODE] = "disabled"  # else ray.init turns token mode on for `auto` where a token exists
        return first.gcs
    if first.answer != "auth":
        raise ConfigError(f"{where}: {unreachable(first)}")
    if user_mode != "token" and not (user_mode is None and address == "auto"):
        raise ConfigError(f"{where}: the Ray cluster at {first.gcs} asks for its authentication token; run with "
                          f"{AUTH_MODE}=token and the cluster's token (`ray get-auth-token` on its head node) in "
                          f"{TOKEN_PLACES}")
    second = ask_gcs(address, "token")
    if second.answer != "open":
        raise ConfigError(f"{where}: {token_problem(second)}")
    return second.gcs


def ask_gcs(address: str, mode: str) -> GcsAnswer:
    """gcs_probe.py's answer from a child process in authentication mode `mode`."""
    command = [sys.executable, "-m", "async_rlhf.cluster.gcs_probe", address]
    try:
        done = subprocess.run(command, env={**os.environ, AUTH_MODE: mode}, capture_output=True, text=True,
                              timeout=PROBE_S)
    except subprocess.TimeoutExpired:
        return GcsAnswer("unreachable", gcs=address, detail=f"no answer in {PROBE_S:g}s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return GcsAnswer("unreachable", gcs=address, detail=f"the probe failed: {why}")
    return GcsAnswer(**json.loads(lines[-1]))


def unreachable(answer: GcsAnswer) -> str:
    if answer.answer == "not-found":
        return (f"no Ray cluster found ({answer.detail}); start one with `ray start --head`, give its HOST:PORT, or "
                "leave ray.address unset for a Ray of the run's own")
    return (f"no Ray cluster answers at {answer.gcs} ({answer.detail}); start it with `ray start "
            "--head` there, or fix ray.address (unset: a Ray of the run's own)")


def token_problem(answer: GcsAnswer) -> str:
    if answer.answer == "no-token":
        return (f"the Ray cluster at {answer.gcs} asks for its authentication token and none is set here; put the "
                f"cluster's token (`ray get-auth-token` on its head node) in {TOKEN_PLACES}")
    if answer.answer == "auth":
        return (f"the Ray cluster at {answer.gcs} refuses the token set here ({TOKEN_PLACES}); use the cluster's "
                "(`ray get-auth-token` on its head node)")
    return unreachable(answer)
