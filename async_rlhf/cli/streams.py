"""The command's terminal streams, which outlive their reader.

`async-rlhf train ... | head`, a pager closed early, a log collector that went away: the next line written to
the pipe raised BrokenPipeError, and the run failed on a line of progress. A closed terminal (an ssh session
dropped) answers EIO, after the SIGHUP that stops the run with a checkpoint (pipeline/signals.py). What a run
writes to the terminal is also in its files, so once the reader is gone the lines are dropped and the work goes on.
"""
from __future__ import annotations

import errno
from typing import Any, TextIO


class ReaderGoneStream:
    """Wraps sys.stdout or sys.stderr: from the first write or flush that meets a closed pipe or terminal on,
    what is written is dropped."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._gone_or_raise(exc)
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._gone_or_raise(exc)

    def _gone_or_raise(self, exc: OSError) -> None:
        """EPIPE: a pipe's reader exited; EIO: the terminal closed (hung up)."""
        if exc.errno not in (errno.EPIPE, errno.EIO):
            raise exc
        self.reader_gone = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)
