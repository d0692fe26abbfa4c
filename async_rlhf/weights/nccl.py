"""The NCCL weight transport (weight_sync.transport=nccl): learner rank 0 broadcasts each new version
to every generator through vLLM's weight-transfer engine, in packed buckets of weight_sync.bucket_mb.

How it fits the broker's interface: `NcclTransport` is a `WeightTransport` whose locations are
`nccl://v<version>`; the learner's `save_weights(location)` sees the scheme and broadcasts instead of
writing a file, so the controller's publish path is the same for both transports. Every generator
holds version v when the broker publishes v; a generator handed a version it does not hold fails
with a `VersionError` (see `check_generator_version`), never silently samples from other weights.

Atomicity: a generator receives a whole version inside one actor call (`GeneratorActor.receive_weights`:
vLLM's start -> update -> finish), so a generation batch queued on that actor runs before or after the
swap, never in the middle. The swap therefore happens between generation batches, as with shm.

Never a hang: rendezvous and every broadcast run under weight_sync.timeout_s (`run_with_timeout`);
past it the run stops with an error that says what was waited for and what to check.

What needs CUDA is only the communicator; the rank layout, version rules, timeout and the ZeRO-3
aware weight stream are plain Python / torch and are tested on CPU (tests/test_nccl_sync.py).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from async_rlhf.failures import RunError
from async_rlhf.weights.broker import VersionError, WeightRef

SCHEME = "nccl://"
SCHEMES = (SCHEME, "ipc://")  # ipc (one shared GPU) is pushed the same way, by vLLM's CUDA IPC engine
T = TypeVar("T")


class WeightSyncTimeout(RuntimeError):
    """A rendezvous or broadcast that did not finish within weight_sync.timeout_s."""


class NcclTransport:
    """The broker's view of NCCL weights: nothing is stored, a location only names the version."""

    def __init__(self, name: str = "nccl") -> None:
        self.name = name

    def staging_location(self, version: int) -> str:
        return f"{self.name}://v{version}"

    def commit(self, version: int) -> str:
        return self.staging_location(version)

    def announce(self, ref: WeightRef) -> None:
        """Nothing to tell: the learner pushed the version into every generator before it was published."""

    def discard(self, version: int) -> None:
        """Nothing to free: the generators hold the weights, not the broker."""

    def close(self) -> None:
        """Nothing to free (the NCCL groups belong to the learner and generator processes)."""


def nccl_version(location: str) -> int | None:
    """The version an `nccl://v<N>` (or `ipc://v<N>`) location names, or None for any other location (a directory)."""
    scheme = next((s for s in SCHEMES if location.startswith(s)), None)
    if scheme is None:
        return None
    match = re.fullmatch(r"v(\d+)", location[len(scheme):])
    if match is None:
        raise ValueError(f"malformed pushed weight location '{location}'; expected {scheme}v<version>")
    return int(match.group(1))


@dataclass(frozen=True)
class NcclLayout:
    """Ranks of the weight-sync NCCL group: the learner's rank 0 sends; generator i's TP workers
    take ranks 1 + i*TP ... (i+1)*TP (vLLM adds each worker's TP rank to the offset it is given)."""

    num_generators: int
    tensor_parallel_size: int

    @property
    def world_size(self) -> int:
        return 1 + self.num_generators * self.tensor_parallel_size

    def rank_offset(self, generator_index: int) -> int:
        if not 0 <= generator_index < self.num_generators:
            raise IndexError(f"generator {generator_index} is not one of the {self.num_generators} generators")
        return 1 + generator_index * self.tensor_parallel_size


def check_next_version(sent: int, version: int) -> None:
    """Versions never go backwards: a broadcast carries a newer version than the last one sent (a
    resume jumps ahead to its checkpoint's version) or resends it; an older one means the broker and
    the learner disagree about the policy."""
    if version < sent:
        raise VersionError(f"NCCL weight sync: asked to send version {version} but version {sent} was sent "
                           f"already; versions never go backwards")


def check_generator_version(held: int, wanted: int, generator_id: int) -> None:
    """A generator handed NCCL weights of version `wanted` must hold them or newer ones.

    Newer is right, not an error: the learner pushes v+1 through its own actor calls, which can reach a
    generator ahead of a batch the controller queued with a lease of v (any N >= 1, or a changed
    max_staleness). The batch is then sampled, and tagged, with v+1: its staleness can only be smaller,
    so the bound holds (fixed delay, which needs exact older versions, is refused with nccl). Older
    means the push never arrived."""
    if held < wanted:
        raise VersionError(f"generator {generator_id} holds weights version {held} but was asked to sample with "
                           f"version {wanted}; with weight_sync.transport=nccl versions are pushed by the learner "
                           f"before they are published (a restarted generator must rejoin the group first)")


def check_pushable(model: torch.nn.Module, transport: str) -> None:
    """Pushed transports send the learner's parameters under the names this process loaded them with; the shm
    path writes what save_pretrained would (hf_state_dict). transformers converts some checkpoints at load
    (`_weight_conversions`: fused MoE experts such as Mixtral's `mlp.experts.gate_up_proj`, renamed keys), names
    vLLM's loaders do not know (Mixtral's expects `block_sparse_moe.experts.<i>.w1`), so such a model is refused
    with the way out instead of a push vLLM cannot apply."""
    conversions = getattr(model, "_weight_conversions", None) or []
    if conversions:
        model_type = getattr(getattr(model, "config", None), "model_type", "this")
        kinds = ", ".join(sorted({type(c).__name__ for c in conversions}))
        raise RunError(f"weight_sync.transport={transport} pushes the learner's parameters by the names they were "
                       f"loaded with, and transformers converted this {model_type} checkpoint at load ({kinds}: e.g. "
                       f"fused MoE experts), names vLLM does not know; use weight_sync.transport=shm (learner and "
                       f"generators on one node)")


def run_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread; past `timeout_s` raise `WeightSyncTimeout` naming `what`.

    An NCCL call cannot be cancelled, so the thread is left blocked; a daemon thread does not hold up the
    process's exit (a thread pool's worker would: Python joins those at exit). What matters is that the run
    fails with a reason instead of hanging.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=call, name="weight-sync", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise WeightSyncTimeout(
            f"{what} did not finish within weight_sync.timeout_s={timeout_s:g}s; a generator may have died, "
            f"or NCCL cannot connect the nodes (check NCCL_SOCKET_IFNAME and that the ports are open)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def gathered_parameters(module: torch.nn.Module, zero_stage: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter in `named_parameters` order, gathering ZeRO-3 shards
    one parameter at a time (a collective: every learner rank iterates in step). Under ZeRO-3 the
    tensor is a copy, because the gathered storage is freed when its context exits."""
    for name, param in module.named_parameters():
        if zero_stage != 3:
            yield name, param.detach()
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach().clone()


def parameter_metadata(module: torch.nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, whole shape) of each parameter without gathering (ZeRO-3 keeps it in ds_shape)."""
    return [(name, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for name, p in module.named_parameters()]


class GeneratorSyncClient:
    """vLLM's trainer-side client protocol over our GeneratorActor handles.

    vLLM's trainer engine calls start -> update -> finish; a generator does all three in one actor call
    (`receive_weights`), run when the engine calls `update_weights`, so start and finish are no-ops here.
    Each generator gets its own rank offset (`NcclLayout`): separate vLLM engines, one NCCL group.
    """

    def __init__(self, handles: list[Any], layout: NcclLayout | None, timeout_s: float) -> None:
        self.handles, self.layout, self.timeout_s = handles, layout, timeout_s
        self.version = 0  # the version the next update carries (set by the sender before each send)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        import ray

        # IPC has no ranks to offset (layout None): its init info carries only `packed`.
        layout = self.layout
        offset = (lambda i: {"rank_offset": layout.rank_offset(i)}) if layout else (lambda i: {})
        refs = [h.init_weight_transfer.remote({**init_info, **offset(i)})
                for i, h in enumerate(self.handles)]
        ray.get(refs, timeout=self.timeout_s)

    def start_weight_update(self) -> None:
        """Done inside each generator's `receive_weights` (see the class docstring)."""

    def update_weights(self, update_info: Any) -> None:
        import ray

        ray.get([h.receive_weights.remote(update_info, self.version) for h in self.handles], timeout=self.timeout_s)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Done inside each generator's `receive_weights` (see the class docstring)."""
