"""The learner's side of weight_sync.transport=nccl (async_rlhf/weights/nccl.py has the protocol).

Every learner rank builds a sender (under ZeRO-3 each rank holds shards, so each must join every
gather); only rank 0 opens the NCCL endpoint to the generators and broadcasts.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from async_rlhf.config.learner import WeightSyncConfig
from async_rlhf.weights.nccl import (
    GeneratorSyncClient,
    NcclLayout,
    check_next_version,
    gathered_parameters,
    parameter_metadata,
    run_with_timeout,
)
from learners.distributed import RankInfo, free_port


def policy_weight_source(module: torch.nn.Module, zero_stage: int) -> Any:
    """A vLLM `WeightSource` over the policy: metadata without gathering, whole tensors when iterated."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PolicySource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, dtype, shape) for name, dtype, shape in parameter_metadata(module)]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return gathered_parameters(module, zero_stage)

    return PolicySource()


class PushedWeightSender:
    """Sends versions in order through a vLLM trainer engine, each under the timeout."""

    engine: Any
    client: GeneratorSyncClient
    timeout_s: float
    sent: int

    def close(self) -> None:
        """Leave the weight group (before a new one is formed with a restarted generator)."""
        self.engine.shutdown()

    def send(self, version: int) -> float:
        """Push the policy as `version` to every generator; seconds taken."""
        check_next_version(self.sent, version)
        self.client.version = version
        start = time.perf_counter()
        if torch.cuda.is_available():
            # vLLM packs and sends on CUDA streams of its own, which do not wait for this one: without this, the
            # push may read parameters that the optimizer step's kernels are still writing (a mix of two versions).
            torch.cuda.current_stream().synchronize()
        run_with_timeout(self.engine.send_weights, self.timeout_s, f"push of weights version {version}")
        self.sent = version
        return time.perf_counter() - start


class IpcWeightSender(PushedWeightSender):
    """weight_sync.transport=ipc: the generator shares this learner's GPU and maps the policy's own
    CUDA tensors (unpacked: no staging copy, and the whole version is one update call, so one
    `receive_weights` actor call, as the atomicity rule in nccl_sync.py wants)."""

    def __init__(self, module: torch.nn.Module, zero_stage: int, handles: list[Any], cfg: WeightSyncConfig,
                 rank: RankInfo, version: int) -> None:
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

        self.timeout_s, self.sent = cfg.timeout_s, version
        self.client = GeneratorSyncClient(handles, None, cfg.timeout_s)
        init = IPCTrainerInitInfo(rank=rank.rank, packed=False)
        source = policy_weight_source(module, zero_stage)
        self.engine = run_with_timeout(
            lambda: IPCTrainerWeightTransferEngine.trainer_init(init, client=self.client, source=source),
            cfg.timeout_s, "CUDA IPC handshake of the learner with its generator")


class NcclWeightSender(PushedWeightSender):
    """Opens the weight-sync NCCL group (rank 0) and sends versions in order, each under the timeout."""

    def __init__(self, module: torch.nn.Module, zero_stage: int, handles: list[Any], layout: NcclLayout,
                 cfg: WeightSyncConfig, rank: RankInfo, version: int) -> None:
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.timeout_s, self.sent = cfg.timeout_s, version
        self.client = GeneratorSyncClient(handles, layout, cfg.timeout_s)
        host = ray.util.get_node_ip_address()
        init = NCCLTrainerInitInfo(master_address=host, master_port=free_port(host) if rank.is_main else 0,
                                   world_size=layout.world_size, packed=True,
                                   packed_buffer_size_bytes=cfg.bucket_mb << 20, rank=rank.rank)
        source = policy_weight_source(module, zero_stage)
        self.engine = run_with_timeout(
            lambda: NCCLTrainerWeightTransferEngine.trainer_init(init, client=self.client, source=source),
            cfg.timeout_s, f"NCCL rendezvous of the learner with {layout.world_size - 1} generator worker(s)")
