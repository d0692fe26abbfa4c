"""Where a run executes and what it serves and writes: `ray:`, `resources:`, `api:`, `eval:`, `logging:` and
`checkpoint:`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, Mapping

from pydantic import Field, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import Strict, environment_checks


class RayConfig(Strict):
    """Where the Ray cluster is: None starts a local one; 'auto' or 'HOST:6379' joins one started with
    `ray start` (README "On a GPU cluster")."""

    address: str | None = Field(None, description="None = a local Ray for this run; 'auto' = the node's cluster")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="GPU placement groups of the learner ranks and of each generator's TP workers"
    )

    @field_validator("address")
    @classmethod
    def _joinable(cls, address: str | None) -> str | None:
        """Ray read a malformed address only in ray.init, after start-up ("Invalid address format"), and a Ray
        Client address (ray://) would run the driver's Ray calls through a proxy the run was never built for."""
        if address is None or address == "auto":
            return address
        if address.startswith("ray://"):
            raise ValueError(f"ray.address '{address}' is a Ray Client address, which runs cannot use; run "
                             "`async-rlhf train` on a node of the cluster with ray.address=auto, or submit it there "
                             "with `ray job submit`")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"ray.address '{address}' is not HOST:PORT; give the head node's GCS address (`ray "
                             "start --head` prints it, port 6379 by default) or auto")
        return address


# A local Ray keeps its sockets under $RAY_TMPDIR, else $TMPDIR, else /tmp (ray._common.utils), the longest being
# <dir>/ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store; AF_UNIX allows 107 bytes.
SOCKET_TAIL = len("/ray/session_2026-12-05_13-24-06_358370_4194304/sockets/plasma_store")
SOCKET_PATH_MAX = 107


def check_ray_temp_dir(env: Mapping[str, str]) -> None:
    """A temp directory that a local Ray cannot use (missing, unwritable, or so long that its socket paths pass
    AF_UNIX's limit, as a scheduler's per-job TMPDIR can be) failed in ray.init with an OSError after start-up
    had begun; this says so before anything starts."""
    var = next((v for v in ("RAY_TMPDIR", "TMPDIR") if v in env), None)
    base = env[var] if var else "/tmp"
    name = f"${var} ('{base}')" if var else "/tmp"
    if len(base.encode()) + SOCKET_TAIL > SOCKET_PATH_MAX:
        room = SOCKET_PATH_MAX - SOCKET_TAIL
        raise ValueError(f"{name} is too long for a local Ray: its socket paths there would pass the 107 bytes a "
                         f"Unix socket allows; set RAY_TMPDIR to a writable directory of at most {room} characters "
                         f"(e.g. /tmp/ray-$USER)")
    problem = _unwritable(Path(base))
    if problem:
        raise ValueError(f"{name} cannot hold a local Ray's session files ({problem}); set RAY_TMPDIR (or TMPDIR) "
                         "to a writable directory")


def check_ray_home(env: Mapping[str, str]) -> None:
    """A local Ray turns token authentication on and keeps its token in ~/.ray/auth_token, made at its first start:
    under a read-only HOME (a container's) ray.init failed after start-up had begun ("[Errno 30] Read-only file
    system: '/home/u/.ray'"). Nothing is needed where the token is given or authentication is off."""
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled" or "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env:
        return
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if (home / ".ray" / "auth_token").is_file():
        return
    problem = _unwritable(home / ".ray")
    if problem:
        raise ValueError(f"a local Ray keeps its authentication token in ~/.ray, which cannot be made ({problem}); "
                         "set HOME to a writable directory, or give Ray a token in $RAY_AUTH_TOKEN")


def _unwritable(directory: Path) -> str | None:
    """Why no file can be made in `directory` (created if missing, as Ray would), or None. Tried, not looked up:
    root passes every permission check, and yet cannot write under /proc or a read-only mount."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return f"{exc.strerror or exc}: '{exc.filename or directory}'"


class ResourcesConfig(Strict):
    num_cpus: int | None = Field(None, ge=1)
    pin_cores: Literal["auto", "off"] = Field(
        "auto", description="auto: async with enough cores, a core per generator and the rest to the learner; "
                            "otherwise the generators split the cores (no two thread pools on one core) and the "
                            "learner shares them; off: every role on every core"
    )
    balance_cores: bool = Field(
        True, description="with pinned cores: the learner also trains on the generators' cores while they idle, "
                          "layer by layer (SmolLM2 on 2 cores: 1.09x the synchronous run, 1.34x the pinned one; "
                          "docs/benchmarks.md, 'Cores by load')"
    )

    @field_validator("pin_cores", mode="before")
    @classmethod
    def _off_read_as_false(cls, value: object) -> object:
        """YAML reads a bare `off` (`pin_cores: off`, `resources.pin_cores=off`) as false: that is the 'off' meant."""
        return "off" if value is False else value


# The control token from the environment (api.token unset); `async-rlhf status` sends it too.
API_TOKEN_ENV = "ASYNC_RLHF_API_TOKEN"


class ApiConfig(Strict):
    """HTTP status and control, served by the controller while a run is alive."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address; reads need the token too when not loopback")
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (printed and written to run_dir/api_url)")
    token: str | None = Field(
        None, min_length=16,
        description="bearer token for /control; default $ASYNC_RLHF_API_TOKEN, else generated into run_dir/api_token",
        json_schema_extra={"secret": True},  # written as *** (async_rlhf/config/redaction.py)
    )


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="gold evaluation every E steps; 0 = only at start and end")
    chunk_prompts: int = Field(
        0, ge=0,
        description="eval prompts per generate call, sent to generator 0 when no training batch holds it, so a "
                    "batch waits behind one such call at most; 0 = as many as a training batch's samples "
                    "(prompts per generator chunk x samples per prompt). With nccl/ipc an evaluation is one call",
    )
    win_rate_judge: Literal["gold", "train"] = Field(
        "gold", description="reward that judges completion vs reference (prompts with a reference only)"
    )
    samples: int = Field(
        3, ge=0, description="completions of the first S eval prompts kept in each eval.jsonl record (`samples`: "
                             "prompt, completion and its gold and proxy reward); 0 = none"
    )


class LoggingConfig(Strict):
    """Metric sinks besides the JSONL files (always written); the same metric names in each."""

    tensorboard: bool = Field(False, description="event files in run_dir/tensorboard (needs `tensorboard`)")
    wandb: bool = Field(False, description="Weights & Biases run in run_dir/wandb (needs `wandb`)")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline needs no network or account")
    wandb_project: str = "async-rlhf"

    @model_validator(mode="after")
    def _installed(self, info: ValidationInfo) -> "LoggingConfig":
        import importlib.util

        if not environment_checks(info):
            return self
        for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, key) and importlib.util.find_spec(package) is None:
                raise ValueError(f"logging.{key}: the '{package}' package is not installed; "
                                 f"run `make install` (or pip install {package}) or set logging.{key}=false")
        return self


class CheckpointConfig(Strict):
    """Checkpoints under run_dir/checkpoints (also written on SIGTERM, /control/checkpoint and a non-finite stop)."""

    every: int = Field(0, ge=0, description="write one every E learner steps; 0 = only when asked (see above)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept; older ones are deleted once a newer one is complete")
    final_wait_s: float = Field(600.0, ge=0, allow_inf_nan=False,
                                description="a final/ save that fails for want of space is tried again every 10 s "
                                            "for this long while you free space (the trained weights live only in "
                                            "the learner until then); 0: the run fails at once")
