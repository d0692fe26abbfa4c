"""Prints of the model directories a run was given, which `--resume` must find unchanged.

A resume loads the policy's trained weights from the checkpoint, but the frozen reference (model.path, or
model.reference_path) and a learned reward model (reward.learned.path) from where the config points: a directory
overwritten since (an SFT model trained again into the same place) would change the KL and the rewards of the
rest of the run without a word. The config check catches a new path; this catches new contents.

A directory's print covers the files that define a model (weights, configs, tokenizer, custom code), each by name,
size and a hash of its first and last MiB and 64 blocks between: milliseconds for any size, where hashing a 14 GB
checkpoint whole would take a minute at every start. It tells a model trained again (every tensor changes), not
one tensor edited by hand. The embedded and prepared policies are left out: their cache is built from the config,
which the resume compares already.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from async_rlhf.config.run import RunConfig

MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".tiktoken", ".py", ".jinja")
EDGE_BYTES = 1 << 20  # read whole at each end of a file
SAMPLE_BYTES = 1 << 16  # a block read
SAMPLES = 64  # blocks read between the ends


def model_dirs(cfg: RunConfig) -> dict[str, Path]:
    """The model directories the config names that a resume loads again, by config key."""
    given = {"model.path": cfg.model.path if cfg.model.source == "local" else None,
             "model.reference_path": cfg.model.reference_path,
             "reward.learned.path": cfg.reward.learned.path if cfg.reward.learned else None}
    return {key: Path(path) for key, path in given.items() if path is not None}


def input_prints(cfg: RunConfig) -> dict[str, str]:
    """The print of each model directory the config names, by its config key."""
    return {key: directory_print(path) for key, path in model_dirs(cfg).items()}


def directory_print(directory: Path) -> str:
    """A digest of the model files under `directory` (names, sizes, both ends of each)."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in MODEL_FILES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory)}\0{size}\0".encode())
        with path.open("rb") as fh:
            for offset in sampled_offsets(size):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def sampled_offsets(size: int) -> list[int]:
    """Where a file is read: all of a small one; the first and last MiB and `SAMPLES` blocks between of a big one
    (a model trained again changes every tensor, so every block)."""
    if size <= 2 * EDGE_BYTES:
        return list(range(0, size, SAMPLE_BYTES))
    edges = [*range(0, EDGE_BYTES, SAMPLE_BYTES), *range(size - EDGE_BYTES, size, SAMPLE_BYTES)]
    step = (size - 2 * EDGE_BYTES) // (SAMPLES + 1)
    return sorted({*edges, *(EDGE_BYTES + step * k for k in range(1, SAMPLES + 1))})


def changed_inputs(then: dict[str, str], now: dict[str, str]) -> list[str]:
    """The config keys whose directory's print differs (a key the older run did not print is not compared)."""
    return [key for key, value in now.items() if key in then and then[key] != value]
