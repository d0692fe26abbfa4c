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

from async_rlhf.weights.announce import announce, version_tag
from async_rlhf.weights.slot_location import slot_location


@dataclass(frozen=True)
class WeightRef:
    """What a generator needs to load one published version."""

    version: int
    transport: str
    location: str
    lineage: int = 0  # bumped when the learner rolls back to a checkpoint: later numbers name other weights


class WeightTransport(Protocol):
    """How weights travel: slots in shared memory (shm), or a broadcast from the learner (nccl)."""

    name: str

    def staging_location(self, version: int) -> str: ...
    def commit(self, version: int) -> str: ...
    def announce(self, ref: WeightRef) -> None: ...
    def discard(self, version: int) -> None: ...
    def close(self) -> None: ...


class SharedMemoryTransport:
    """Versions in the slots of a `ShmSlotRing` under a tmpfs root (async_rlhf/weights/shm_ring.py).

    A version is staged into the lowest slot that no kept or leased version holds, so the ring grows to
    keep_versions + leased + 1 slots and then stays there, every slot already touched: a write is one copy.
    The broker discards a version only when it is unleased and past keep_versions, which frees its slot.
    """

    name = "shm"

    def __init__(self, root: Path) -> None:
        self.root = root  # made with the first version: a broker built for a run that never starts leaves nothing
        self._slots: dict[int, int] = {}  # version -> slot

    def staging_location(self, version: int) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if version not in self._slots:
            used = set(self._slots.values())
            self._slots[version] = next(i for i in range(len(used) + 1) if i not in used)
        return slot_location(self.root, self._slots[version])

    def commit(self, version: int) -> str:
        # Nothing to rename: the learner's write is finished when the controller publishes, and no
        # generator is handed the slot before that.
        return slot_location(self.root, self._slots[version])

    def announce(self, ref: WeightRef) -> None:
        """Each listening generator prepares `ref` beside sampling (async_rlhf/weights/announce.py)."""
        announce(self.root, self._slots[ref.version], version_tag(ref.lineage, ref.version))

    def discard(self, version: int) -> None:
        self._slots.pop(version, None)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class VersionError(RuntimeError):
    """A publication out of order, or a request for a version that is not available."""


class WeightSyncBroker:
    def __init__(self, transport: WeightTransport, keep_versions: int = 2, initial_version: int = 0) -> None:
        self.transport = transport
        self.keep_versions = keep_versions
        self.latest_version = initial_version  # version 0 = the weights generators start from
        self.lineage = 0
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
        ref = WeightRef(version, self.transport.name, self.transport.commit(version), self.lineage)
        self._published[version] = ref
        self.latest_version = version
        self._collect()
        self.transport.announce(ref)
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

    def roll_back(self, next_version: int) -> None:
        """The learner went back to a checkpoint: every version is forgotten (none may be leased) and the
        next one published is `next_version`. Numbers from there on are reused for other weights, so the
        lineage changes: a generator holding an old version of the same number loads the new one."""
        if any(self._leases.values()):
            raise VersionError(f"cannot roll back while versions are leased: {dict(+self._leases)}")
        for version in list(self._published):
            self.transport.discard(version)
        self._published.clear()
        self.latest_version = next_version - 1
        self.lineage += 1

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
