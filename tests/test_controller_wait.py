"""The loop's wait with nothing in flight: a stall unless the HTTP thread posted a pause or a stop.

The API thread can post a stop after the loop checked `_done()` and before it dispatched: nothing is then
sent, and the wait that follows must let the next `_done()` end the run (test_api's stop test caught this
race once in CI: the run ended FAILED with "nothing in flight").
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from async_rlhf.config.run import RunConfig
from async_rlhf.pipeline.control import RunControl
from async_rlhf.pipeline.controller import Controller


@pytest.mark.parametrize("post", [RunControl.stop, RunControl.pause])
def test_a_stop_or_pause_posted_mid_iteration_is_not_a_stall(tmp_path: Path,
                                                              post: Callable[[RunControl], None]) -> None:
    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    post(controller.control)
    controller._wait_and_handle()  # returns: nothing was dispatched because of the command
    assert controller._done() is (post is RunControl.stop)


def test_nothing_in_flight_without_a_command_is_a_stall(tmp_path: Path) -> None:
    controller = Controller(RunConfig(api={"enabled": False}), tmp_path / "run")
    with pytest.raises(RuntimeError, match="nothing in flight"):
        controller._wait_and_handle()
