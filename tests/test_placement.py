"""Where the roles land on a GPU cluster (async_rlhf/cluster/placement.py), checked on CPU.

Ray schedules by declared resources, not by devices: a Ray started with `num_gpus=2` on this CPU machine
places, packs and assigns GPU ids exactly as it would on a 2-GPU node. No CUDA call is made; the probe
actors below stand in for the Learner and the GeneratorActor (which would need a real GPU) and take the
very options the controller starts those with. The Ray instance is a subprocess's own, because this
pytest process may already hold the session's CPU-only Ray (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from async_rlhf.cluster.placement import SHARED_GPU_BUNDLE
from async_rlhf.config.run import load_config
from tests.helpers import QUICKSTART, ROOT

PROBE = """
import json, sys
import ray
from ray.util.placement_group import placement_group_table
from async_rlhf.config.run import load_config
from async_rlhf.cluster.placement import generator_options, learner_options, shared_gpu_group

class Probe:
    def where(self):
        ctx = ray.get_runtime_context()
        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pg": ctx.get_placement_group_id(),
                "node": ctx.get_node_id(), "resources": ctx.get_assigned_resources()}

ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
cfg = load_config(sys.argv[1], sys.argv[2:], environment=False)
learner = ray.remote(Probe).options(**learner_options(cfg)).remote()   # the controller starts the learner first
generator = ray.remote(Probe).options(**generator_options(cfg)[0]).remote()
places = ray.get([learner.where.remote(), generator.where.remote()], timeout=120)
groups = [{"bundles": list(g["bundles"].values()), "name": g["name"]} for g in placement_group_table().values()
          if g["state"] != "REMOVED"]
again = shared_gpu_group(cfg).id.hex() == places[0]["pg"] if cfg.weight_sync.transport == "ipc" else None
print(json.dumps({"learner": places[0], "generator": places[1], "groups": groups, "same_group_again": again}))
ray.shutdown()
"""


def _placed(overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}  # a Ray of its own, never the session's
    proc = subprocess.run([sys.executable, "-c", PROBE, str(QUICKSTART), *overrides], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ipc_learner_and_generator_share_one_bundle_and_one_gpu_of_two() -> None:
    placed = _placed(["weight_sync.transport=ipc", "generation.gpu_memory_utilization=0.5",
                      "learner.gpu_memory_fraction=0.4"])
    learner, generator = placed["learner"], placed["generator"]
    assert learner["pg"] is not None and learner["pg"] == generator["pg"]
    assert len(learner["gpu_ids"]) == 1 and learner["gpu_ids"] == generator["gpu_ids"]  # one GPU of the two
    assert learner["resources"]["GPU"] == 0.4 and generator["resources"]["GPU"] == 0.5
    assert placed["groups"] == [{"bundles": [SHARED_GPU_BUNDLE], "name": placed["groups"][0]["name"]}]
    assert placed["same_group_again"]  # a learner started again finds the same group, not a second one


def test_nccl_puts_learner_and_generator_on_their_own_gpus() -> None:
    placed = _placed(["weight_sync.transport=nccl"])
    learner, generator = placed["learner"], placed["generator"]
    assert learner["resources"]["GPU"] == 1 and generator["resources"]["GPU"] == 1
    assert set(learner["gpu_ids"]).isdisjoint(generator["gpu_ids"])


def test_the_shared_bundle_holds_both_shares_of_a_split_the_config_accepts() -> None:
    cfg = load_config(QUICKSTART, ["weight_sync.transport=ipc", "generation.gpu_memory_utilization=0.5"],
                      environment=False)
    assert cfg.generation.gpu_memory_utilization + cfg.learner.gpu_memory_fraction <= SHARED_GPU_BUNDLE["GPU"]
    assert SHARED_GPU_BUNDLE["CPU"] == 2  # one CPU each: the learner's and the generator's actor options ask for 1


@pytest.mark.parametrize(("transport", "learner_first"), [("ipc", True), ("nccl", False)])
def test_with_ipc_the_generators_start_once_the_learner_is_up(monkeypatch, tmp_path, transport: str,
                                                               learner_first: bool) -> None:
    # GPU only in life (fakes here): vLLM's memory profile asserts that no other process on its GPU changed its
    # memory meanwhile, and the learner's start on the shared GPU would. With a GPU each, all start side by side.
    from async_rlhf.pipeline import builder as builder_module
    from async_rlhf.pipeline.builder import ComponentBuilder
    from async_rlhf.pipeline.state import Components, RunStats

    cfg = load_config(QUICKSTART, [f"weight_sync.transport={transport}", "generation.gpu_memory_utilization=0.45"],
                      environment=False)
    events: list[str] = []
    ready = SimpleNamespace(remote=lambda: "ready-ref")
    build = ComponentBuilder(cfg, tmp_path, Components(), None, tmp_path, RunStats())  # type: ignore[arg-type]
    monkeypatch.setattr(build, "start_learner", lambda: setattr(build.parts, "learner",
                                                                SimpleNamespace(__ray_ready__=ready)))
    monkeypatch.setattr(builder_module, "ray", SimpleNamespace(get=lambda ref: events.append(f"get {ref}")))
    monkeypatch.setattr(build, "_start_generators", lambda: events.append("generators"))
    monkeypatch.setattr(build, "_start_reward", lambda: events.append("reward"))
    build._start_workers(SimpleNamespace())  # type: ignore[arg-type]
    assert events == (["get ready-ref"] if learner_first else []) + ["generators", "reward"]
