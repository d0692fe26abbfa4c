"""The learner's torch.distributed world: one rank per Learner process (gloo on CPU, nccl on GPU).

Every rank must run the same collectives in the same order, so any decision that can differ between
ranks (a rank whose share of the batch selected nothing, a non-finite loss on one rank) is agreed on
with `all_agree` before it changes what the ranks do next; otherwise one rank would wait forever.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the learner's world; `master_*` is rank 0's rendezvous address."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free one (single rank only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(info: RankInfo | None = None) -> RankInfo:
    """Join (or create) the learner's world. Must run before deepspeed is imported: DS_ACCELERATOR
    is read at import time. Reuses an existing process group (a second Learner in one process)."""
    info = info or RankInfo()
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return info
    port = info.master_port or free_port()
    # Ray gives each GPU rank its own CUDA_VISIBLE_DEVICES, so the local device is always 0.
    os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(port), RANK=str(info.rank),
                      WORLD_SIZE=str(info.world_size), LOCAL_RANK="0")
    backend = "gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else "nccl"
    if backend == "gloo":
        skip_unused_cpu_ops()
    if info.world_size == 1:
        # A world of one needs no rendezvous: an in-memory store, so no TCP port that another process
        # (a vLLM engine starting next to it) can take between free_port() and the bind (EADDRINUSE).
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)  # adopts the group above when there is one
    return info


# DeepSpeed's CPU comm backend compiles this C++ op when it starts (27 s of g++ on 2 cores, 52 s of CPU, on
# a machine's first learner start and again whenever the venv moves: torch's extension cache is keyed by
# name, not path). It serves only `inference_all_reduce`, DeepSpeed's tensor-parallel CPU inference; training
# uses gloo. DeepSpeed reads this table before it builds the op and goes without it where it is False.
UNUSED_CPU_OPS = ("deepspeed_shm_comm",)


def skip_unused_cpu_ops() -> None:
    import deepspeed.ops

    for name in UNUSED_CPU_OPS:
        deepspeed.ops.__compatible_ops__[name] = False


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is true on every rank (an all-reduce MIN; free with one rank)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def all_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over the ranks (an all-reduce MAX; free with one rank)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the ranks: for modules trained outside DeepSpeed (the value model)."""
    size = world_size()
    if size == 1:
        return
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(size)


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, zero_stage: int) -> Iterator[None]:
    """Inside: every parameter of `module` whole on this rank. ZeRO-3 keeps only a shard per rank;
    gathering is a collective, so every rank must enter this together."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
