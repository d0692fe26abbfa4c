"""bench/every_config.py's arithmetic, hand-computed (its runs are whole training jobs: docs/benchmarks.md)."""
from __future__ import annotations

from pathlib import Path

from bench.every_config import cpu_configs, overrides, table


def run(config: str, bound: int, wall: float) -> dict:
    return {"config": config, "max_staleness": bound, "wall_s": wall}


def test_the_speedup_is_the_median_sync_loop_over_the_median_async_one() -> None:
    runs = [run("a", 0, 30.0), run("a", 1, 20.0), run("a", 0, 36.0), run("a", 1, 24.0), run("a", 1, 100.0),
            run("b", 0, 10.0)]  # b has no async run yet: no row
    assert table(runs) == [{"config": "a", "sync_wall_s": 33.0, "async_wall_s": 24.0, "speedup": 1.375, "runs": 5}]


def test_every_top_level_config_is_swept_with_its_own_overrides() -> None:
    names = cpu_configs()
    assert "quickstart" in names and "smollm2_gold_proxy" in names and not any("/" in n for n in names)
    assert overrides("quickstart", 40, Path("m")) == ["learner.steps=40", "eval.every=0", "api.enabled=false"]
    assert overrides("byo_example", 40, Path("m"))[-1] == "model.path=m"
    assert overrides("smollm2_gold_proxy", 40, Path("m"))[:1] == ["learner.steps=6"]
    assert "reward.learned=null" in overrides("smollm2_gold_proxy", 40, Path("m"))
