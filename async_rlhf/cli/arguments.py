"""Types for the sub-commands' numeric options: a value out of range is argparse's one-line usage error
(exit 2) before anything loads, instead of a failure deep inside TRL, vLLM or uvicorn after it."""
from __future__ import annotations

import argparse
from typing import Callable


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
