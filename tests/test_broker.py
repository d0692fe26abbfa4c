"""WeightSyncBroker: versions in order, atomic publication, leases protect what generators load."""
from __future__ import annotations

from pathlib import Path

import pytest

from async_rlhf.broker import SharedMemoryTransport, VersionError, WeightSyncBroker


def publish(broker: WeightSyncBroker, version: int, payload: str = "w") -> None:
    stage = Path(broker.staging_location(version))
    (stage / "model.safetensors").write_text(f"{payload}{version}")
    broker.publish(version)


def test_versions_publish_in_order_and_content_is_visible(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=2)
    assert broker.latest() is None and broker.latest_version == 0
    publish(broker, 1)
    ref = broker.latest()
    assert ref.version == 1 and ref.transport == "shm"
    assert (Path(ref.location) / "model.safetensors").read_text() == "w1"
    with pytest.raises(VersionError, match="next version to publish is 2"):
        broker.staging_location(3)
    with pytest.raises(VersionError):
        broker.publish(1)


def test_staged_but_unpublished_weights_are_not_visible(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"))
    publish(broker, 1)
    broker.staging_location(2)  # the learner is still writing version 2
    assert broker.latest().version == 1
    assert not (tmp_path / "shm" / "v2").exists()


def test_old_versions_are_collected_unless_leased(tmp_path: Path) -> None:
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep_versions=1)
    publish(broker, 1)
    leased = broker.lease(1)
    publish(broker, 2)
    publish(broker, 3)
    assert broker.available() == [1, 3]  # 2 collected; 1 kept while a generator may be loading it
    assert Path(leased.location).exists()
    broker.release(1)
    assert broker.available() == [3]
    assert not Path(leased.location).exists()
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
    from async_rlhf.config import RunConfig
    from async_rlhf.resume import broker_versions

    cfg = RunConfig(queue={"staleness_mode": "fixed", "max_staleness": 2})
    assert broker_versions(cfg, resumed=0) == (4, -1) and broker_versions(cfg, resumed=5) == (4, 4)
    assert broker_versions(RunConfig(), resumed=5) == (2, 4) and broker_versions(RunConfig(), resumed=0) == (2, 0)
    keep, initial = broker_versions(cfg, resumed=0)
    broker = WeightSyncBroker(SharedMemoryTransport(tmp_path / "shm"), keep, initial)
    publish(broker, 0)  # the starting weights, so that a generator can go back to them
    leased = broker.lease(0)
    for version in range(1, 7):
        publish(broker, version)
    assert broker.available() == [0, 3, 4, 5, 6]  # latest - N - 1 ... latest, and 0 while leased
    assert (Path(leased.location) / "model.safetensors").read_text() == "w0"
    broker.release(0)
    assert broker.available() == [3, 4, 5, 6]
