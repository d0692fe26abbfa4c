"""CheckpointStore: the run's `checkpoints/step-N/` directories, written atomically, the last K kept.

A checkpoint is complete when its MANIFEST.json exists: the manifest (size and sha256 of every file)
is written last, after every file is fsynced, inside `step-N.partial`, which is then renamed. A crash
at any point leaves either no `step-N` at all or a complete one; a later corruption (a truncated
or edited file) is caught by the checksums, and `latest_valid` falls back to the previous one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MANIFEST = "MANIFEST.json"
NAME = re.compile(r"^step-(\d+)$")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def write(self, step: int, fill: Callable[[Path], object]) -> Path:
        """Have `fill` write the contents into a fresh partial directory, seal it, publish it, prune."""
        final = self.path_for(step)
        if final.is_dir() and self.problem(final) is None:
            return final  # already taken at this step (e.g. periodic + SIGTERM)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left over by a crash
        partial.mkdir(parents=True)
        try:
            fill(partial)
            self._seal(partial, step)
        except BaseException:  # e.g. a full disk: what was written goes, so the run has the space back
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)  # an invalid one of the same step
        os.rename(partial, final)
        _fsync(self.root)  # the rename itself survives a power loss
        self.prune(step)
        return final

    def _seal(self, directory: Path, step: int) -> None:
        files = {}
        for path in _files(directory):
            _fsync(path)
            files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        for sub in sorted({p.parent for p in _files(directory)}, key=lambda p: -len(p.parts)):
            _fsync(sub)
        manifest = directory / MANIFEST
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync(manifest)
        _fsync(directory)

    def problem(self, path: Path) -> str | None:
        """Why `path` is not a usable checkpoint, or None when every file matches its manifest."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            return f"no {MANIFEST} (incomplete)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            return f"unreadable {MANIFEST} ({exc})"
        for rel, meta in files.items():
            file = path / rel
            if not file.is_file():
                return f"{rel} is missing"
            if file.stat().st_size != meta["size"]:
                return f"{rel} has {file.stat().st_size} bytes, the manifest says {meta['size']}"
            if _sha256(file) != meta["sha256"]:
                return f"{rel} does not match its checksum"
        return None

    def checkpoints(self) -> list[Checkpoint]:
        """Every published (renamed) checkpoint directory, oldest first; not yet verified."""
        if not self.root.is_dir():
            return []
        found = [Checkpoint(p, int(m.group(1))) for p in self.root.iterdir()
                 if (m := NAME.match(p.name)) and p.is_dir()]
        return sorted(found, key=lambda c: c.step)

    def latest_valid(self, warn: Callable[[str], None]) -> Checkpoint | None:
        """The newest checkpoint that verifies; each newer one that does not is reported through `warn`."""
        for ckpt in reversed(self.checkpoints()):
            reason = self.problem(ckpt.path)
            if reason is None:
                return ckpt
            warn(f"checkpoint {ckpt.path.name} is not usable: {reason}; falling back to the previous one")
        return None

    def prune(self, written: int) -> None:
        """Keep the newest `keep_last` checkpoints up to step `written`; remove older ones, partials left by
        crashes, and any beyond `written`: a run only goes back past a checkpoint that did not verify (resume
        and failover take the newest valid one), so those are damaged, and counting them toward `keep_last`
        would delete the valid ones a resume needs."""
        found = self.checkpoints()
        kept, abandoned = [c for c in found if c.step <= written], [c for c in found if c.step > written]
        for ckpt in kept[:-self.keep_last] + abandoned:
            shutil.rmtree(ckpt.path, ignore_errors=True)
        for partial in self.root.glob("step-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
