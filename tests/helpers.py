"""Small builders and readers shared by tests: rollouts, CLI commands, run-directory files, weight slots."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from async_rlhf.rollout import Completion, Prompt, RewardStatus, RolloutGroup

if TYPE_CHECKING:  # torch only where weights are handled: config and CLI tests stay light
    import torch

    from async_rlhf.weights.broker import WeightRef, WeightSyncBroker

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# The arith warm start at 150 SFT steps instead of its 700: built in ~20 s, not ~90 s, on a machine whose model cache
# is empty (CI's). For tests of the MC and VinePPO mechanics, which it answers in the same format.
QUICK_ARITH = "model.embedded.sft_steps=150"
T = TypeVar("T")


# ------------------------------------------------------------------ rollouts

def make_group(version: int, rewards: Sequence[float | None] = (1.0, 0.0), prompt_id: int = 0) -> RolloutGroup:
    completions = [
        Completion([3, 4], "12", [-0.5, -0.5], "stop", r, "ok" if r is not None else "failed")
        for r in rewards
    ]
    return RolloutGroup(Prompt(prompt_id, "21>", [1, 5, 4, 13]), completions, version, 0, 0.0)


def completion(ids: list[int], reward: float | None, status: RewardStatus = "ok", logprob: float = -0.5
               ) -> Completion:
    """A completion of `ids` sampled with the same log-prob `logprob` at every token."""
    return Completion(token_ids=ids, text="", logprobs=[logprob] * len(ids), finish_reason="stop",
                      reward=reward, reward_status=status)


# ------------------------------------------------------------------ the CLI as a process

def cli_command(*args: str) -> list[str]:
    """`async-rlhf ARGS` run by this interpreter (the console script may not be on PATH in a test run)."""
    return [sys.executable, "-m", "async_rlhf.cli", *args]


def one_line_error(capsys: Any, args: list[str], code: int, prefix: str) -> str:
    """`async-rlhf ARGS` run in this process: it exits with `code` and says one line on stderr, starting `prefix`."""
    from async_rlhf.cli.main import main

    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix)
    return err


def train_command(run_dir: Path, *overrides: str, config: Path = QUICKSTART, resume: bool = False) -> list[str]:
    """`async-rlhf train CONFIG OVERRIDES --run-dir RUN_DIR` (or `--resume RUN_DIR`)."""
    return cli_command("train", str(config), *overrides, "--resume" if resume else "--run-dir", str(run_dir))


# ------------------------------------------------------------------ ports

@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port that something listens on for the block's length: an address a server cannot bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def free_port() -> int:
    """A loopback port nothing listens on (just now): an address no server answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ run directories

def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file a run writes (metrics.jsonl, eval.jsonl, ...)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ weight slots

def shm_slot(location: str) -> tuple[Path, int]:
    """(root, slot) of a location that must be an shm slot (the tests' brokers use SharedMemoryTransport)."""
    from async_rlhf.weights.slot_location import parse_slot_location

    parsed = parse_slot_location(location)
    assert parsed is not None, f"not an shm slot location: {location}"
    return parsed


def publish_state(broker: WeightSyncBroker, version: int, state: dict[str, torch.Tensor]) -> WeightRef:
    """What the learner and the controller do: write the slot the broker stages, then publish it."""
    from async_rlhf.weights.shm_ring import ShmSlotRing

    root, slot = shm_slot(broker.staging_location(version))
    ShmSlotRing(root).write(slot, state)
    return broker.publish(version)


def token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """The ids of `tokens` (transformers types convert_tokens_to_ids as int | list[int] for any input)."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert isinstance(ids, list)
    return ids


def present(value: T | None) -> T:
    """`value`, failing the test when it is None (an optional the test expects filled, e.g. a gradient)."""
    assert value is not None
    return value


def as_in_a_terminal() -> None:
    """A subprocess' preexec_fn: SIGINT at its default, as a command typed in a terminal has it. A test runner
    started in the background (`nohup ... &`) passes SIGINT on ignored, and Python keeps an ignored SIGINT
    ignored, so a Ctrl-C test would otherwise test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mount_tmpfs(where: Path, size: str) -> bool:
    """A tmpfs of `size` at `where` (made here), to fill: a real full disk. False where this process may not mount
    one (not root, no mount); the caller unmounts it (`umount -l`)."""
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


def fill_disk(disk: Path) -> None:
    """Take what room is left on `disk` (a last partial page included), as a file `rest`."""
    fd = os.open(disk / "rest", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (4096, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def kill_seen_by_ray(handle: Any, pid: int) -> None:
    """SIGKILL an actor's process and wait (up to 10 s) until Ray's actor table no longer has it alive in it: the
    raylet reports the death within milliseconds, and a count read before then does not see it."""
    from async_rlhf.cluster import actor_table

    os.kill(pid, signal.SIGKILL)
    lookup = present(actor_table.table())
    for _ in range(100):
        row = actor_table.record(lookup, handle)
        if row is None or row.state != "ALIVE" or row.pid != pid:
            return
        time.sleep(0.1)
