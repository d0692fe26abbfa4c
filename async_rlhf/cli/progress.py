"""How a run shows its progress on the terminal: a bar redrawn in place, or, where stderr is not a terminal (a
log file, `nohup`, a job scheduler's output), a plain line now and then. tqdm's bar redraws itself with carriage
returns, which in a log file make one endless line (about 1.5 KB a second at the quickstart's pace)."""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol, TextIO

LINE_EVERY_S = 30.0  # between two plain progress lines


class Progress(Protocol):
    def update(self, record: dict) -> None: ...

    def close(self) -> None: ...


def progress_display(total: int, stream: TextIO) -> Progress:
    return ProgressBar(total) if stream.isatty() else ProgressLines(total, stream)


def _postfix(record: dict) -> dict[str, Any]:
    """What both displays show of a step besides its number."""
    reward = record.get("reward_mean")
    return {"reward": f"{reward:.3f}" if reward is not None else "-", "stale": f"{record['staleness_mean']:.1f}",
            "queue": record["queue_depth"], "tok_s": f"{record['gen_tokens_per_s']:.0f}"}


class ProgressBar:
    """The train bar, made at the first learner step: its clock (rate, ETA) starts there, not at the
    process's start, so start-up neither slows the rate nor stretches the first ETA; and nothing is drawn
    between the start-up lines. Its rate counts the steps after the first."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None  # a tqdm bar, made at the first step (tqdm is imported then, not at start-up)

    def update(self, record: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=record["step"], desc="train", unit="step", dynamic_ncols=True)
        else:
            self.bar.update(record["step"] - self.bar.n)
        self.bar.set_postfix(_postfix(record))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ProgressLines:
    """One line at this process's first step, then at most one every `every_s` seconds, and one at the last
    step: step, share done, the bar's figures, steps per second since the first step and the time left."""

    def __init__(self, total: int, stream: TextIO, every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.every_s, self.clock = total, stream, every_s, clock
        self.first: tuple[int, float] | None = None  # this process's first step and when it came
        self.shown_at = float("-inf")

    def update(self, record: dict) -> None:
        now, step = self.clock(), record["step"]
        self.first = self.first or (step, now)
        if step < self.total and now - self.shown_at < self.every_s:
            return
        self.shown_at = now
        print(self.line(record, now), file=self.stream, flush=True)

    def line(self, record: dict, now: float) -> str:
        step, (first_step, first_at) = record["step"], self.first or (record["step"], now)
        figures = ", ".join(f"{key}={value}" for key, value in _postfix(record).items())
        text = f"[async-rlhf] step {step}/{self.total} ({100 * step / self.total:.0f}%), {figures}"
        if step > first_step and now > first_at:
            rate = (step - first_step) / (now - first_at)
            text += f", {rate:.2f} step/s, {_clock_text((self.total - step) / rate)} left"
        return text

    def close(self) -> None:
        pass


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
