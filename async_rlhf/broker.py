"""WeightSyncBroker: versioned publication of policy weights from the learner to the generators.

The learner writes version v through a transport; generators load the newest version only
between generation batches. Versions handed to a generator are leased so that garbage
collection never removes weights a generator is about to load.
"""
from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class WeightRef:
    """What a generator needs to load one published version."""

    version: int
    transport: str
    location: str


class WeightTransport(Protocol):
    """How weights travel. CPU: files in shared memory. A GPU transport (NCCL broadcast) plugs in here."""

    name: str

    def staging_location(self, version: int) -> str: ...
    def commit(self, version: int) -> str: ...
    def discard(self, version: int) -> None: ...
    def close(self) -> None: ...


class SharedMemoryTransport:
    """safetensors files under a tmpfs directory, loaded by vLLM's in-place `reload_weights`."""

    name = "shm"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def staging_location(self, version: int) -> str:
        path = self.root / f"v{version}.partial"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def commit(self, version: int) -> str:
        # A rename is atomic: a generator never sees a half-written version.
        final = self.root / f"v{version}"
        (self.root / f"v{version}.partial").rename(final)
        return str(final)

    def discard(self, version: int) -> None:
        shutil.rmtree(self.root / f"v{version}", ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class VersionError(RuntimeError):
    """A publication out of order, or a request for a version that is not available."""


class WeightSyncBroker:
    def __init__(self, transport: WeightTransport, keep_versions: int = 2, initial_version: int = 0) -> None:
        self.transport = transport
        self.keep_versions = keep_versions
        self.latest_version = initial_version  # version 0 = the weights generators start from
        self._published: dict[int, WeightRef] = {}
        self._leases: Counter = Counter()

    def staging_location(self, version: int) -> str:
        """Where the learner writes `version` before `publish`."""
        if version != self.latest_version + 1:
            raise VersionError(f"next version to publish is {self.latest_version + 1}, not {version}")
        return self.transport.staging_location(version)

    def publish(self, version: int) -> WeightRef:
        if version != self.latest_version + 1:
            raise VersionError(f"next version to publish is {self.latest_version + 1}, not {version}")
        ref = WeightRef(version, self.transport.name, self.transport.commit(version))
        self._published[version] = ref
        self.latest_version = version
        self._collect()
        return ref

    def latest(self) -> WeightRef | None:
        """The newest published weights, or None while only the initial weights exist."""
        return self._published.get(self.latest_version)

    def lease(self, version: int) -> WeightRef:
        if version not in self._published:
            raise VersionError(f"version {version} is not available (published: {sorted(self._published)})")
        self._leases[version] += 1
        return self._published[version]

    def release(self, version: int) -> None:
        if self._leases[version] <= 0:
            raise VersionError(f"version {version} is not leased")
        self._leases[version] -= 1
        self._collect()

    def available(self) -> list[int]:
        return sorted(self._published)

    def _collect(self) -> None:
        newest = sorted(self._published, reverse=True)
        for version in newest[self.keep_versions:]:
            if self._leases[version] == 0:
                self.transport.discard(version)
                del self._published[version]

    def close(self) -> None:
        self.transport.close()
