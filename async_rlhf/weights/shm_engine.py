"""The CPU weight-transfer engine: vLLM's weight-update protocol over a shared-memory slot ring.

vLLM 0.32 moves weights into a running engine through `vllm.distributed.weight_transfer`: a worker-side
`WeightTransferEngine` (init_transfer_engine, start_weight_update, update_weights, finish_weight_update)
and a trainer-side `TrainerWeightTransferEngine` (trainer_init, send_weights). Its NCCL and CUDA IPC engines
need a GPU; this one is the same protocol with the data in a `ShmSlotRing`, registered under "shm":
- trainer: `send_weights(slot)` copies the policy into a ring slot (in place) and, when it was given a
  client, drives the workers' start -> update -> finish itself, as the NCCL engine does;
- worker: `update_weights({"slot": k})` loads slot k's tensors through the model's own `load_weights`
  and re-runs each layer's `process_weights_after_loading`: on CPU that is where the linear weights are
  re-packed for oneDNN (`dispatch_cpu_unquantized_gemm` drops the plain weight), so a plain `param.copy_`
  would not reach the kernels. An unquantized CPU model loads in place (`InPlaceReload`); anything else
  goes through vLLM's layer-wise reload (start / finish), as its NCCL engine does.

The generator calls the worker side itself (a pull between generation batches, `actors/generator.py`), so
any version still in the ring can be loaded, older ones included (fixed delay); nothing of the loaded
version stays aliased to the slot, which the broker may then reuse.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from async_rlhf.weights.inplace_reload import InPlaceReload
from async_rlhf.weights.shadow_weights import ShadowWeights
from async_rlhf.weights.shm_ring import ShmSlotRing

BACKEND = "shm"
# A version is prepared beside sampling only where it is at least this big: the preparing thread slows the
# sampling thread through the GIL (measured per prepare: 2.5 ms on the quickstart's 2 x 128 policy, 14 ms on a
# 6 x 512 one), which pays against the second's load (100.8 MB: 51 ms), not the first's (2.1 MB: 6.7 ms; 16.8 MB
# load in 16.5 ms). Bytes, not a load's measured time, which a busy machine stretches past any bound.
PREPARE_AHEAD_MIN_BYTES = 32 * 2**20


@dataclass
class ShmInitInfo(WeightTransferInitInfo):
    root: str  # the ring's directory
    prepare_ahead: bool = False  # versions may be prepared beside sampling (the generator's thread asks for them)


@dataclass
class ShmUpdateInfo(WeightTransferUpdateInfo):
    slot: int
    tag: str = ""  # the version in the slot ("lineage:version"): one prepared under the same tag is swapped in


@dataclass
class ShmTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    root: str


class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Worker side: loads a slot of the ring into the model, through vLLM's layer-wise reload."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.ring: ShmSlotRing | None = None
        self.inplace = InPlaceReload(model, vllm_config.model_config.quantization)
        self.shadow: ShadowWeights | None = None  # versions prepared beside sampling (None: loaded in the call)
        self.prepare_ahead = False  # allowed by the generator, and this model's loader can be mapped (so far)
        self.shadow_wanted = False  # a prepare was asked for before the map existed: the next load takes it
        self.version_bytes = 0  # a version's size, known from the first load
        self.prepare_min_bytes = PREPARE_AHEAD_MIN_BYTES
        self.dtype = vllm_config.model_config.dtype  # a bf16 generator over a float32 learner (generation.dtype)

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        if self.ring is not None:
            self.ring.close()
        self.ring = ShmSlotRing(Path(init_info.root))
        self.prepare_ahead = init_info.prepare_ahead and self.inplace.supported

    def start_weight_update(self) -> None:
        if self.inplace.supported:
            return
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which fails on a CPU-only machine;
        # a CPU copy is synchronous anyway.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        if self.ring is None:
            raise RuntimeError("shm weight transfer: init_transfer_engine must run before update_weights")
        if not self.inplace.supported:
            model: Any = self.model  # a vLLM model: load_weights is its own method, not torch.nn.Module's
            # One tensor converted at a time: a bfloat16 GPU engine over a float32 slot never holds a second model.
            model.load_weights((name, self._cast(t)) for name, t in self.ring.read(update_info.slot).items())
        elif self.shadow is None:
            self._load_first_inplace(self._tensors(update_info.slot))
        else:
            with self.shadow.lock:  # a prepare writes the plain weights this load re-packs from
                if not self.shadow.swap(update_info.tag):
                    self.shadow.forget()
                    self.inplace.load(self._tensors(update_info.slot), self.shadow.map)

    def _load_first_inplace(self, tensors: dict[str, torch.Tensor]) -> None:
        """A load before any prepare. Once one was asked for, the map for later ones is taken first (it probes the
        live weights, so here, between generate calls; a generator that is never asked to prepare pays nothing),
        and published only after this load (a prepare on another thread then never writes beside it)."""
        shadow = self.inplace.shadow(tensors) if self.shadow_wanted else None
        self.prepare_ahead = self.prepare_ahead and not (self.shadow_wanted and shadow is None)
        self.inplace.load(tensors)
        self.version_bytes = sum(t.nbytes for t in tensors.values())
        self.shadow, self.shadow_wanted = shadow, False

    def prepare(self, slot: int, tag: str) -> bool:
        """Make the version in `slot` (`tag`) ready beside sampling, from any thread, for a later update_weights
        with the same tag to put in place at once. False where it does not: not allowed, versions too small to pay
        for it (`PREPARE_AHEAD_MIN_BYTES`), or no map yet (asked for here, taken by the next load)."""
        if self.ring is None or not self.prepare_ahead or self.version_bytes < self.prepare_min_bytes:
            return False
        if self.shadow is None:
            self.shadow_wanted = True
            return False
        self.shadow.prepare(self._tensors(slot), tag)
        return True

    def _tensors(self, slot: int) -> dict[str, torch.Tensor]:
        assert self.ring is not None
        return {name: self._cast(t) for name, t in self.ring.read(slot).items()}

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The engine's dtype before vLLM's loader sees it (which would convert too, warning per tensor)."""
        return tensor.to(self.dtype) if tensor.is_floating_point() and tensor.dtype != self.dtype else tensor

    def finish_weight_update(self) -> None:
        if self.inplace.supported:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class ShmTrainerWeightTransferEngine(TrainerWeightTransferEngine[ShmTrainerInitInfo]):
    """Trainer side: writes the source's tensors into a slot; with a client, also drives the workers."""

    init_info_cls = ShmTrainerInitInfo

    def __init__(self, *, client: Any, source: Any, is_sender: bool, root: str) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.ring = ShmSlotRing(Path(root))

    @classmethod
    def trainer_init(cls, init_info: ShmTrainerInitInfo, *, client: Any = None,
                     source: Any = None) -> ShmTrainerWeightTransferEngine:
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, root=init_info.root)
        if client is not None and engine.is_sender:
            client.init_weight_transfer_engine({"root": init_info.root})
        return engine

    def send_weights(self, slot: int = 0, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write `state` (default: the source's tensors) into `slot`; then, with a client, load it into
        the workers. Only the sender writes: the slot is one copy shared by every reader."""
        if state is None:
            if self.source is None:
                raise RuntimeError("shm weight transfer: send_weights needs `state` when the engine has no source")
            state = dict(iter(self.source))
        tensors = state
        if not self.is_sender:
            return
        self.ring.write(slot, tensors)
        if self.client is not None:
            self.client.start_weight_update()
            self.client.update_weights({"slot": slot})
            self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.ring.close()


def prepare_on_worker(worker: Any, slot: int, tag: str) -> bool:
    """`ShmWeightTransferEngine.prepare` through `collective_rpc` (which passes the worker first)."""
    return worker.weight_transfer_engine.prepare(slot, tag)


def register() -> None:
    """Make "shm" a weight-transfer backend of vLLM in this process (idempotent). Also vLLM's
    `vllm.general_plugins` entry point (pyproject.toml), so every vLLM worker process has it."""
    # Any: the two factories take engines of two different base classes (worker side, trainer side).
    sides: list[tuple[Any, type]] = [(WeightTransferEngineFactory, ShmWeightTransferEngine),
                                     (WeightTransferTrainerFactory, ShmTrainerWeightTransferEngine)]
    for factory, engine in sides:
        try:
            factory.register_engine(BACKEND, engine)
        except ValueError:  # registered already (the plugin hook and an explicit call both ran)
            pass
