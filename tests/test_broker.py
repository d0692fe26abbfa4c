"""WeightSyncBroker over the shared-memory slot ring: versions in order, publication only after the write,
leases protect what generators load, and a slot is reused in place only once nothing needs its version."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from async_rlhf.weights.broker import SharedMemoryTransport, VersionError, WeightRef, WeightSyncBroker
from async_rlhf.weights.shm_ring import ShmSlotRing
from tests.helpers import publish_state, shm_slot


def publish(broker: WeightSyncBroker, version: int, value: float | None = None) -> WeightRef:
    """What the learner and the controller do: write the staged slot, then publish."""
    return publish_state(broker, version, {"w": torch.full((4,), float(version if value is None else value))})


def content(ref: WeightRef) -> float:
    root, slot = shm_slot(ref.location)
    return float(ShmSlotRing(root).read(slot)["w"][0])


def slot_of(ref: WeightRef) -> int:
    return shm_slot(ref.location)[1]


def test_versions_publish_in_order_and_content_is_visible(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=2)
    assert broker.latest() is None and broker.latest_version == 0
    publish(broker, 1)
    ref = broker.latest()
    assert ref is not None and ref.version == 1 and ref.transport == "shm" and content(ref) == 1.0
    with pytest.raises(VersionError, match="next version to publish is 2"):
        broker.staging_location(3)
    with pytest.raises(VersionError):
        broker.publish(1)


def test_staged_but_unpublished_weights_are_not_visible(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"))
    first = publish(broker, 1)
    staged = shm_slot(broker.staging_location(2))  # the learner is still writing version 2
    latest = broker.latest()
    assert latest is not None and latest.version == 1 and staged[1] != slot_of(first)


def test_slots_are_reused_in_place_once_their_version_is_collected(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=1)
    slots = [slot_of(publish(broker, v)) for v in range(1, 7)]
    assert slots == [0, 1, 0, 1, 0, 1]  # one kept + one being written: two slots, forever
    assert sorted(p.name for p in (tmp_path / "shm").iterdir()) == ["layout.json", "slot-0.bin", "slot-1.bin"]


def test_old_versions_are_collected_unless_leased(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=1)
    publish(broker, 1)
    leased = broker.lease(1)
    publish(broker, 2)
    third = publish(broker, 3)
    assert broker.available() == [1, 3]  # 2 collected; 1 kept while a generator may be loading it
    assert content(leased) == 1.0 and slot_of(third) not in (slot_of(leased),)
    publish(broker, 4)  # never into the leased slot
    assert content(leased) == 1.0
    broker.release(1)
    assert broker.available() == [4]
    with pytest.raises(VersionError):
        broker.lease(2)
    with pytest.raises(VersionError):
        broker.release(1)


def test_close_removes_the_shared_memory_directory(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    broker = WeightSyncBroker(SharedMemoryTransport(root))
    publish(broker, 1)
    broker.close()
    assert not root.exists()


def test_fixed_delay_keeps_n_plus_2_versions_from_version_0(tmp_path: Path) -> None:
    from async_rlhf.config.learner import WeightSyncConfig
    from async_rlhf.config.run import RunConfig
    from async_rlhf.pipeline.resume import broker_versions

    cfg = RunConfig(queue={"staleness_mode": "fixed", "max_staleness": 2})
    assert broker_versions(cfg, resumed=0) == (4, -1) and broker_versions(cfg, resumed=5) == (4, 4)
    # shm publishes the starting weights too (version 0's evaluation leases them); pushed weights never go back
    assert broker_versions(RunConfig(), resumed=5) == (2, 4) and broker_versions(RunConfig(), resumed=0) == (2, -1)
    nccl = RunConfig.model_construct(**{**RunConfig().__dict__, "weight_sync": WeightSyncConfig(transport="nccl")})
    assert broker_versions(nccl, resumed=0) == (2, 0) and broker_versions(nccl, resumed=5) == (2, 4)
    keep, initial = broker_versions(cfg, resumed=0)
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep, initial)
    publish(broker, 0)  # the starting weights, so that a generator can go back to them
    leased = broker.lease(0)
    for version in range(1, 7):
        publish(broker, version)
    assert broker.available() == [0, 3, 4, 5, 6]  # latest - N - 1 ... latest, and 0 while leased
    assert content(leased) == 0.0 and [content(broker.lease(v)) for v in (3, 4, 5, 6)] == [3.0, 4.0, 5.0, 6.0]
    broker.release(0)
    assert broker.available() == [3, 4, 5, 6]


def test_a_learner_rollback_forgets_every_version_and_reuses_numbers_under_a_new_lineage(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=2)
    old = [publish(broker, v) for v in (1, 2, 3)]
    broker.roll_back(2)  # the checkpoint was at step 2: its weights are published again as version 2
    assert broker.latest() is None and broker.available() == [] and broker.latest_version == 1
    again = publish(broker, 2, value=20.0)
    assert (again.version, again.lineage) == (2, 1) and old[1].lineage == 0 and content(again) == 20.0
    assert again != old[1]  # same number, other weights: a generator holding the old one must load this


def test_a_rollback_while_a_version_is_leased_is_refused(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"))
    publish(broker, 1)
    broker.lease(1)
    with pytest.raises(VersionError, match="leased"):
        broker.roll_back(1)
