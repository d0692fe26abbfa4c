"""Types for the sub-commands' numeric options: a value out of range is argparse's one-line usage error
(exit 2) before anything loads, instead of a failure deep inside TRL, vLLM or uvicorn after it. And the place
an output goes, made and tried before the command does its work."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

from async_rlhf.config.base import ConfigError


def _ranged(kind: Callable[[str], float], what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _ranged(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _ranged(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _ranged(float, "a positive number", lambda v: 0 < v < float("inf"))
non_negative_float = _ranged(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
fraction = _ranged(float, "a fraction in [0, 1)", lambda v: 0 <= v < 1)
port = _ranged(int, "a TCP port (0-65535)", lambda v: 0 <= v <= 65535)


def writable_place(path: Path, flag: str, command: str, directory: bool = False) -> None:
    """Make the directory an output goes into (for a directory output, that directory) and write a file there, now:
    a place that cannot be made or written is a config error naming it (exit 2), not a traceback after minutes of
    sampling or training (a read-only mount, a missing disk, a file where a directory should be)."""
    place = path if directory else path.parent
    blocker = next((p for p in (place, *place.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"config error: {command}: cannot write {flag} '{path}': '{blocker}' is a file, not a "
                          f"directory; choose another place")
    try:
        try_writing(place)
    except OSError as exc:
        raise ConfigError(f"config error: {command}: cannot write {flag} '{path}' ({exc.strerror or exc}); "
                          f"choose a place this user can write") from None


def flag_values(argv: list[str], flag: str) -> list[str]:
    """What a raw argument list gives `flag` (`--flag VALUE` or `--flag=VALUE`), as argparse reads it."""
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")] + [
        value for a, value in zip(argv, argv[1:]) if a == flag]


def try_writing(place: Path) -> None:
    """Make the directory `place` and write (and remove) a file in it: OSError where either cannot be done."""
    place.mkdir(parents=True, exist_ok=True)
    tempfile.NamedTemporaryFile(dir=place, prefix=".async-rlhf-write-test-").close()
