"""Output of a library run in our own process, kept off the terminal.

A vLLM engine started in the command's own process (`sample-pairs`, the benchmarks' evaluator) prints some twenty
lines while it starts: its warnings, Python's FutureWarnings, a C++ NUMA note, a "Loading safetensors" bar. In a
run the engine lives in a Ray worker, whose output goes to the worker's log file; here it goes to a file too.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything written to file descriptors 1 and 2 inside the block (Python, C++ and tqdm alike) is appended to
    `path`; the terminal gets them back when the block ends, however it ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
