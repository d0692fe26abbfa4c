"""A model loaded or saved in our own process says nothing on the terminal but our lines.

`from_pretrained` draws transformers' "Loading weights" bar and `save_pretrained` its "Writing model shards" bar,
and the save's unwrap (accelerate) imports DeepSpeed, which warns that it guessed the accelerator ("Setting
accelerator to CPU...") where DS_ACCELERATOR is unset. `export-model`, `prepare`, `serve-reward`, a first run's
warm start and the benchmarks load or save in the command's own process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def accelerator() -> str:
    """The DeepSpeed accelerator this process would detect: cuda where torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Load or save inside this block: no progress bar, and DeepSpeed told the accelerator it would have detected.

    Both are put back afterwards, so nothing else in the process (or a Ray worker it starts) inherits them."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    had_accelerator = "DS_ACCELERATOR" in os.environ
    os.environ.setdefault("DS_ACCELERATOR", accelerator())
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if not had_accelerator:
            os.environ.pop("DS_ACCELERATOR", None)
