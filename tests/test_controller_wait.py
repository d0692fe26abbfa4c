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
from async_rlhf.pipeline.controller import Controller, first_ready
from tests.standins import Sequential


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


def test_of_several_done_results_the_earliest_sent_is_handled_first(ray_local) -> None:
    """Real Ray: `ray.wait` alone returns any done ref (it picked the later one ~40% of the time here), and the
    loop handling a generator's second chunk before its first trained the newer chunk first and dropped the
    older one as stale."""
    actor = ray_local.remote(num_cpus=0)(Sequential).remote()
    for _ in range(30):
        refs = [actor.call.remote(i) for i in range(4)]
        ray_local.get(refs)  # all done before the loop looks
        assert ray_local.get(first_ready(refs, timeout_s=1.0)) == 0
    assert first_ready([actor.call.remote(0)], timeout_s=1.0) is not None
    ray_local.kill(actor)


@pytest.mark.parametrize("transport", ["shm", "nccl"])
def test_with_pushed_weights_no_step_starts_while_a_generator_rejoins(tmp_path: Path, transport: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's push goes to every generator (nccl, ipc: GPU only, so the controller is not started): while one is
    restarting, outside the group, a step would wait on it until weight_sync.timeout_s. shm is not held up."""
    from async_rlhf.pipeline.state import GeneratorSlot

    cfg = RunConfig.model_validate({"api": {"enabled": False}, "weight_sync": {"transport": transport}},
                                   context={"environment": False})
    controller = Controller(cfg, tmp_path / "run")
    controller.pool.slots = [GeneratorSlot(None, 0, recovering=True)]
    dispatched: list[int] = []
    monkeypatch.setattr(controller.steps, "dispatch", lambda gate_inputs: dispatched.append(1))
    controller._dispatch_learning()
    assert dispatched == ([1] if transport == "shm" else [])
    controller.pool.slots[0].recovering = False  # back in the group
    controller._dispatch_learning()
    assert dispatched == [1] * (2 if transport == "shm" else 1)
