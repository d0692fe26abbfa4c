"""The command's terminal streams, which outlive their reader.

`async-rlhf train ... | head`, a pager closed early, a log collector that went away: the next line written to
the pipe raised BrokenPipeError, and the run failed on a line of progress. What a run writes to the terminal is
also in its files, so once the reader is gone the lines are dropped and the work goes on.
"""
from __future__ import annotations

from typing import Any, TextIO


class ReaderGoneStream:
    """Wraps sys.stdout or sys.stderr: writes and flushes that meet a closed pipe are dropped from then on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self.reader_gone = True
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self.reader_gone = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)
