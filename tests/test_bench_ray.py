"""The benchmarks' own Ray (bench/common.py start_bench_ray) refuses a temp directory Ray cannot use, as a run
does, before it starts anything."""
from __future__ import annotations

import pytest

from async_rlhf.config.base import ConfigError
from bench.common import start_bench_ray


def test_a_temp_directory_ray_cannot_use_is_one_config_error_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    running = ray.is_initialized()  # another test's Ray (tests/conftest.py ray_local) may be up already
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/proc/nope")  # cannot be made, even by root
    with pytest.raises(ConfigError, match=r"^config error: \$TMPDIR \('/proc/nope'\) cannot hold a local Ray's "
                                          r"session files .*; set RAY_TMPDIR \(or TMPDIR\) to a writable directory$"):
        start_bench_ray()
    assert ray.is_initialized() is running  # none started
