"""Where the GPU roles run: Ray placement groups for generators (TP GPUs each) and learner ranks.

On a CPU-only Ray (no "GPU" resource) nothing here reserves GPUs, and the generators keep the
one-CPU actors they had before; placement only changes what a GPU cluster does.

weight_sync.transport=ipc puts the learner and the generator on ONE GPU: one placement group of one
bundle {CPU: 2, GPU: 1}, whose GPU both actors take a fraction of (their memory shares). Fractional
requests without the bundle could land on two GPUs of a multi-GPU node, where CUDA IPC handles of
one GPU mean nothing to the other.
"""
from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from async_rlhf.cluster import actor_table
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import RunConfig


def use_gpus() -> bool:
    """Whether the Ray cluster (not this driver: on a cluster it may have none) has GPUs."""
    return ray.cluster_resources().get("GPU", 0) > 0


def gpus_needed(cfg: RunConfig) -> int:
    """Whole GPUs a run asks for: ipc puts everything on one; otherwise each generator's TP GPUs and
    one per learner rank."""
    if cfg.weight_sync.transport == "ipc":
        return 1
    return cfg.generation.num_generators * cfg.generation.tensor_parallel_size + cfg.learner.num_ranks


def cpus_needed(cfg: RunConfig) -> int:
    """Ray CPUs a run asks for: one per generator and one per learner rank (their actors' num_cpus)."""
    return cfg.generation.num_generators + cfg.learner.num_ranks


def check_cluster(cfg: RunConfig, gpus: int, nodes: int, cpus: int | None = None) -> None:
    """The transport and the run's size against the cluster Ray found at start (GPU, node and CPU counts passed
    in, so this is tested on CPU); a one-line ConfigError before any worker starts."""
    transport = cfg.weight_sync.transport
    # The driver of a cluster run skips its own CUDA check (its GPUs are not the workers'): this is where it is made.
    if transport in ("nccl", "ipc") and gpus == 0:
        raise ConfigError(f"config error: weight_sync.transport={transport} sends weights from GPU to GPU but the "
                          f"Ray cluster has no GPU; use weight_sync.transport=shm on CPU")
    if transport == "shm" and nodes > 1:
        raise ConfigError(f"config error: weight_sync.transport=shm shares weights through one node's /dev/shm but "
                          f"the Ray cluster has {nodes} nodes; use weight_sync.transport=nccl across nodes")
    if transport == "nccl" and gpus == 1:
        raise ConfigError("config error: weight_sync.transport=nccl needs the generator and the learner on separate "
                          "GPUs but the Ray cluster has 1 GPU; use weight_sync.transport=ipc to share one GPU")
    if gpus and gpus < gpus_needed(cfg):
        raise ConfigError(f"config error: the run needs {gpus_needed(cfg)} GPUs (generation.num_generators x "
                          f"generation.tensor_parallel_size + learner.num_ranks) and the Ray cluster has {gpus}")
    # A Ray this run did not start (a cluster, or the caller's ray.init) may hold fewer: the actors would wait
    # for CPUs forever.
    if cpus is not None and cpus < cpus_needed(cfg):
        raise ConfigError(f"config error: the run needs {cpus_needed(cfg)} Ray CPUs (one per generator and per "
                          f"learner rank) and the Ray cluster has {cpus}; give Ray more (ray.init(num_cpus=...), "
                          f"`ray start --num-cpus`) or lower generation.num_generators or learner.num_ranks")


def cluster_counts() -> tuple[int, int, int]:
    """GPUs, live nodes and CPUs of the Ray cluster this driver joined."""
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)), alive, int(resources.get("CPU", 0))


def check_started_cluster(cfg: RunConfig) -> None:
    check_cluster(cfg, *cluster_counts())


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str, name: str = "") -> Any:
    """A placement group of `bundles`, ready; a one-line error when the cluster cannot place it."""
    pg = placement_group(bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"{what} needs {len(bundles)} x {bundles[0]} and the Ray cluster could not place them "
                           f"within {timeout_s:g}s (it has {ray.cluster_resources()}); ask for less or add nodes")
    return pg


def in_bundle(pg: Any, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


# ipc: the learner's and the generator's CPU, and their one GPU
SHARED_GPU_BUNDLE: dict[str, float] = {"CPU": 2, "GPU": 1}


def shared_gpu_group(cfg: RunConfig) -> Any:
    """The ipc run's placement group of one SHARED_GPU_BUNDLE, created by the first of learner and
    generator to ask and found by name by the other (and by a learner started again), so neither
    start-up path has to hand it to the other. Named per Ray job: two drivers on one cluster never share it."""
    name = f"async-rlhf-shared-gpu-{ray.get_runtime_context().get_job_id()}"
    try:
        return get_placement_group(name)
    except ValueError:  # not created yet in this job
        return reserve([SHARED_GPU_BUNDLE], "STRICT_PACK", cfg.learner.stall_timeout_s,
                       "weight_sync.transport=ipc (learner and generator on one GPU)", name=name)


def shared_gpu_options(cfg: RunConfig, gpu_share: float) -> dict[str, Any]:
    """Ray actor options of one of the two ipc roles: its memory share of the bundle's one GPU."""
    return {"num_gpus": gpu_share, "scheduling_strategy": in_bundle(shared_gpu_group(cfg), 0)}


def learner_options(cfg: RunConfig) -> dict[str, Any]:
    """Ray actor options of a single-rank learner: no GPU on CPU, its share of the shared GPU with ipc, else one."""
    base: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0, "max_concurrency": 1}
    if not use_gpus():
        return base
    if cfg.weight_sync.transport == "ipc":
        return {**base, **shared_gpu_options(cfg, cfg.learner.gpu_memory_fraction)}
    return {**base, "num_gpus": 1}


def generator_options(cfg: RunConfig) -> list[dict[str, Any]]:
    """Ray actor options of each generator: on GPUs, one bundle of tensor_parallel_size GPUs per
    generator (one bundle keeps a generator's TP workers on one node, as NVLink-bound TP wants)."""
    gen = cfg.generation
    base: dict[str, Any] = {"num_cpus": 1, "max_restarts": gen.max_restarts}
    if not use_gpus():
        return [base] * gen.num_generators
    if cfg.weight_sync.transport == "ipc":  # its share of the learner's GPU, in the learner's bundle
        return [{**base, **shared_gpu_options(cfg, gen.gpu_memory_utilization)}]
    tp = gen.tensor_parallel_size
    pg = reserve([{"CPU": 1, "GPU": tp}] * gen.num_generators, cfg.ray.placement_strategy,
                 cfg.learner.stall_timeout_s, f"generation.num_generators={gen.num_generators}")
    return [{**base, "num_gpus": tp, "scheduling_strategy": in_bundle(pg, i)} for i in range(gen.num_generators)]


def unplaced(actors: dict[str, Any]) -> list[str]:
    """The names of `actors` (name -> handle) that the cluster has given no worker yet: they wait for resources
    other jobs hold. [] where Ray's actor table is not found (the run then waits as before, without saying why)."""
    lookup = actor_table.table()
    if lookup is None:
        return []
    return [name for name, handle in actors.items() if (row := actor_table.record(lookup, handle)) and row.port == 0]


def free_resources() -> str:
    """'0 of 2 CPUs free' (and GPUs where the cluster has them)."""
    free, total = ray.available_resources(), ray.cluster_resources()
    kinds = ["CPU", "GPU"] if total.get("GPU") else ["CPU"]
    return ", ".join(f"{free.get(kind, 0):g} of {total.get(kind, 0):g} {kind}s free" for kind in kinds)
