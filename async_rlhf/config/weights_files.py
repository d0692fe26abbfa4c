"""A checkpoint's safetensors files checked before any worker loads them: a truncated or overwritten file
(an interrupted download or copy, a full disk) is named with the fix at config time, instead of failing
inside the learner's and every generator's start.

Only the format's framing is read (an 8-byte header length, the JSON header, the tensors' byte ranges), so
the check costs a few kilobytes of reading whatever the model's size, and needs neither torch nor safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the header


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= min(MAX_HEADER, size - 8):
            return f"{size} bytes, not a safetensors file (truncated or overwritten)"
        try:
            header = json.loads(f.read(header_len))
            ends = [int(meta["data_offsets"][1]) for name, meta in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header (overwritten or damaged)"
    data = size - 8 - header_len
    if max(ends, default=0) != data:
        return f"truncated or damaged: its header describes {max(ends, default=0)} bytes of tensors, it holds {data}"
    return None


def damaged_weights(directory: Path) -> str | None:
    """'FILE: why' for the first damaged safetensors file in a checkpoint directory, or None."""
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            return f"'{path}': {problem}"
    return None


def check_weights(key: str, directory: Path, fix: str) -> None:
    """Config time: a ValueError naming `key`, the damaged file and `fix`."""
    damaged = damaged_weights(directory)
    if damaged is not None:
        raise ValueError(f"{key}: {damaged}; {fix}")
