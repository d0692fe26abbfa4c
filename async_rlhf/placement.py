"""Where the GPU roles run: Ray placement groups for generators (TP GPUs each) and learner ranks.

On a CPU-only Ray (no "GPU" resource) nothing here reserves GPUs, and the generators keep the
one-CPU actors they had before; placement only changes what a GPU cluster does.
"""
from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from async_rlhf.config import ConfigError, RunConfig


def use_gpus() -> bool:
    """Whether the Ray cluster (not this driver: on a cluster it may have none) has GPUs."""
    return ray.cluster_resources().get("GPU", 0) > 0


def gpus_needed(cfg: RunConfig) -> int:
    """Whole GPUs a run asks for: ipc puts everything on one; otherwise each generator's TP GPUs and
    one per learner rank."""
    if cfg.weight_sync.transport == "ipc":
        return 1
    return cfg.generation.num_generators * cfg.generation.tensor_parallel_size + cfg.learner.num_ranks


def check_cluster(cfg: RunConfig, gpus: int, nodes: int) -> None:
    """The transport against the cluster Ray found at start (GPU and node counts passed in, so this is
    tested on CPU); a one-line ConfigError before any worker starts."""
    transport = cfg.weight_sync.transport
    if transport == "shm" and nodes > 1:
        raise ConfigError(f"config error: weight_sync.transport=shm shares weights through one node's /dev/shm but "
                          f"the Ray cluster has {nodes} nodes; use weight_sync.transport=nccl across nodes")
    if transport == "nccl" and gpus == 1:
        raise ConfigError("config error: weight_sync.transport=nccl needs the generator and the learner on separate "
                          "GPUs but the Ray cluster has 1 GPU; use weight_sync.transport=ipc to share one GPU")
    if gpus and gpus < gpus_needed(cfg):
        raise ConfigError(f"config error: the run needs {gpus_needed(cfg)} GPUs (generation.num_generators x "
                          f"generation.tensor_parallel_size + learner.num_ranks) and the Ray cluster has {gpus}")


def check_started_cluster(cfg: RunConfig) -> None:
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_cluster(cfg, int(ray.cluster_resources().get("GPU", 0)), alive)


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str) -> Any:
    """A placement group of `bundles`, ready; a one-line error when the cluster cannot place it."""
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"{what} needs {len(bundles)} x {bundles[0]} and the Ray cluster could not place them "
                           f"within {timeout_s:g}s (it has {ray.cluster_resources()}); ask for less or add nodes")
    return pg


def in_bundle(pg: Any, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def learner_gpus(cfg: RunConfig) -> float:
    """GPUs of the (single-rank) learner actor: its memory share of the one GPU with ipc, else one."""
    return cfg.learner.gpu_memory_fraction if cfg.weight_sync.transport == "ipc" else 1


def generator_options(cfg: RunConfig) -> list[dict[str, Any]]:
    """Ray actor options of each generator: on GPUs, one bundle of tensor_parallel_size GPUs per
    generator (one bundle keeps a generator's TP workers on one node, as NVLink-bound TP wants)."""
    gen = cfg.generation
    base: dict[str, Any] = {"num_cpus": 1, "max_restarts": gen.max_restarts}
    if not use_gpus():
        return [base] * gen.num_generators
    if cfg.weight_sync.transport == "ipc":  # a fraction: Ray puts it next to the learner on the one GPU
        return [{**base, "num_gpus": gen.gpu_memory_utilization}]
    tp = gen.tensor_parallel_size
    pg = reserve([{"CPU": 1, "GPU": tp}] * gen.num_generators, cfg.ray.placement_strategy,
                 cfg.learner.stall_timeout_s, f"generation.num_generators={gen.num_generators}")
    return [{**base, "num_gpus": tp, "scheduling_strategy": in_bundle(pg, i)} for i in range(gen.num_generators)]
