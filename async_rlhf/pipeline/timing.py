"""Named time and count accumulators for a run (where the time went)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import psutil


class Timing:
    def __init__(self) -> None:
        self._totals: defaultdict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}

    def add(self, name: str, amount: float) -> None:
        self._totals[name] += amount

    def get(self, name: str) -> float:
        return self._totals[name]

    def elapsed(self, name: str) -> float:
        """Total for `name` including a span that is still open."""
        start = self._open.get(name)
        return self._totals[name] + (time.perf_counter() - start if start is not None else 0.0)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._open[name] = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - self._open.pop(name))

    def is_open(self, name: str) -> bool:
        return name in self._open

    def snapshot(self) -> dict[str, float]:
        """Every total, open spans included up to now (for checkpoints)."""
        return {name: self.elapsed(name) for name in set(self._totals) | set(self._open)}

    def restore(self, totals: dict[str, float]) -> None:
        """Continue from a snapshot: spans still open keep running on top of the restored totals."""
        self._totals.clear()
        self._totals.update(totals)

    def roll_back(self, totals: dict[str, float]) -> None:
        """In-process rollback to a snapshot: the spans still open measured real time since they opened,
        so their totals are kept; every other total goes back to the snapshot's."""
        kept = {name: self._totals[name] for name in self._open}
        self.restore(totals)
        self._totals.update(kept)

    def as_dict(self) -> dict[str, float]:
        return dict(self._totals)


def process_started_at() -> float:
    """When this process started, in epoch seconds: the zero of eval.jsonl's `wall_s`, so that a run's
    reward-against-time curve counts its start-up (imports, engines, model loading) as a user waits for it."""
    return psutil.Process().create_time()
