"""What leaves a Learner as files or pushes: published weights (`WeightExport`) and checkpoints (`LearnerStateStore`).

Split from learners/learner.py by role: the Learner trains and holds one of each, delegating its Ray methods
(`save_weights`, `connect_generators`, `weights_digest`, `save_state`, `load_state`, `save_pretrained`,
`save_value_model`, `load_value_model`) to them. With R ranks every rank calls these (ZeRO-3 shards are
gathered collectively first); only rank 0 writes the files that are the same on every rank.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file

from async_rlhf.config.run import RunConfig
from async_rlhf.weights.nccl import NcclLayout, check_pushable, nccl_version
from async_rlhf.weights.shm_ring import ShmSlotRing
from async_rlhf.weights.slot_location import parse_slot_location
from learners.distributed import RankInfo, full_parameters
from learners.value_model import ValueTrainer

if TYPE_CHECKING:  # imported where used (transformers is slow to import; only nccl and ipc need the senders)
    from transformers import PreTrainedModel

    from learners.weight_sender import PushedWeightSender

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "*.model", "chat_template*")
VALUE_MODEL_DIR = "value_model"  # sub-directory of a checkpoint (vLLM only reads the top level)
STATE_FILE = "learner_state.pkl"  # version and RNG states, next to the engines' DeepSpeed checkpoints


def readable_as_umask(directory: Path) -> None:
    """safetensors writes through a private temporary file, so its weights came out -rw------- while the rest of
    the checkpoint follows the umask: a teammate could read final/'s config but not load its weights."""
    mode = 0o666 & ~process_umask()
    for path in directory.rglob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600 != mode:
            path.chmod(mode)


def process_umask() -> int:
    """This process's umask, from /proc (setting it to read it back would race the process's other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o022
    found = [line.split()[1] for line in status.splitlines() if line.startswith("Umask:")]
    return int(found[0], 8) if found else 0o022


def hf_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors `model.save_pretrained` would write, under the same names, as contiguous CPU tensors.

    Uses the two steps save_pretrained itself applies: drop tied aliases (safetensors refuses shared
    storage; e.g. lm_head tied to embed_tokens) and undo load-time weight renaming/conversion.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v.detach() for k, v in model.state_dict().items()}
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    return {k: v.to("cpu").contiguous() for k, v in state.items()}


class WeightExport:
    """Publishes the policy's current weights to the generators: nccl/ipc pushes, the shm ring, or a file."""

    def __init__(self, policy: PreTrainedModel, cfg: RunConfig, rank: RankInfo) -> None:
        self.policy = policy  # the engine's module: the parameters the optimizer updates in place
        self.cfg = cfg
        self.rank = rank
        self.sender: PushedWeightSender | None = None  # set by connect_generators (weight_sync.transport=nccl)
        self.ring: ShmSlotRing | None = None  # weight_sync.transport=shm: the broker's slot ring

    def connect_generators(self, handles: list, tensor_parallel_size: int, version: int) -> None:
        """Join the learner-driven weight group with the generators (weight_sync.transport=nccl or ipc);
        `version` is the learner's, the one a first group starts from.

        Called again when a generator was restarted: its process lost the group, so every member forms a
        new one (the old is shut down on both sides) and the version sent last is sent again, which the
        restarted generator needs and the others hold already."""
        from learners.weight_sender import IpcWeightSender, NcclWeightSender

        check_pushable(self.policy, self.cfg.weight_sync.transport)
        rejoin, sent = self.sender is not None, self.sender.sent if self.sender is not None else version
        if self.sender is not None:
            self.sender.close()
        sender: PushedWeightSender
        zero_stage = self.cfg.learner.zero_stage
        if self.cfg.weight_sync.transport == "ipc":  # one generator on this learner's GPU
            sender = IpcWeightSender(self.policy, zero_stage, handles, self.cfg.weight_sync, self.rank, sent)
        else:
            layout = NcclLayout(len(handles), tensor_parallel_size)
            sender = NcclWeightSender(self.policy, zero_stage, handles, layout, self.cfg.weight_sync, self.rank, sent)
        self.sender = sender
        if rejoin:
            sender.send(sent)

    def save_weights(self, path: str) -> None:
        """Publish the current weights at `path`, a broker location: an `nccl://v<N>` location is
        broadcast to the generators (connect_generators first); a `shm-slot://<root>#<k>` location is
        copied in place into slot k of the broker's ring (HF names; generators load it with the "shm"
        weight-transfer engine). A plain directory gets `model.safetensors`, written to a temporary name
        and renamed (an export: tests compare it with the other paths).
        """
        version = nccl_version(path)
        if version is not None:
            if self.sender is None:
                raise RuntimeError("weight_sync.transport=nccl: connect_generators must run before the first publish")
            self.sender.send(version)
            return
        slot = parse_slot_location(path)
        with full_parameters(self.policy, self.cfg.learner.zero_stage):
            if not self.rank.is_main:
                return
            if slot is not None:
                self._ring(slot[0]).write(slot[1], hf_state_dict(self.policy))
                return
            out = Path(path)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "model.safetensors.partial"
            save_file(hf_state_dict(self.policy), str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out / "model.safetensors")

    def _ring(self, root: Path) -> ShmSlotRing:
        """This process's mapping of the broker's slot ring (a resumed run's broker has a new root)."""
        if self.ring is None or self.ring.root != root:
            self.ring = ShmSlotRing(root)
        return self.ring

    def weights_digest(self) -> str:
        """sha256 of the full policy weights: equal on every rank while the ranks are in step."""
        digest = hashlib.sha256()
        with full_parameters(self.policy, self.cfg.learner.zero_stage):
            for name, tensor in sorted(hf_state_dict(self.policy).items()):
                digest.update(name.encode())
                digest.update(tensor.float().numpy().tobytes())
        return digest.hexdigest()


class LearnerStateStore:
    """A Learner's checkpoints: the resumable state (save_state / load_state) and the HF export (save_pretrained).

    Everything a checkpoint must hold goes through `engines` and `frozen`: a new DeepSpeed-trained module
    is one more entry in `engines` (the value model has its own path: it is not a DeepSpeed engine).
    """

    def __init__(self, engines: dict[str, Any], frozen: dict[str, torch.nn.Module], value: ValueTrainer | None,
                 model_dir: Path, rank: RankInfo, zero_stage: int, loss_name: str) -> None:
        self.engines = engines  # name -> deepspeed.DeepSpeedEngine ("policy" first: its module is the policy)
        self.frozen = frozen
        self.value = value  # None unless the loss declares needs_value_model
        self.model_dir = model_dir  # the tokenizer files of save_pretrained come from here
        self.rank = rank
        self.zero_stage = zero_stage
        self.loss_name = loss_name  # only for the error of a value-model call without one

    @property
    def policy(self) -> PreTrainedModel:
        return self.engines["policy"].module

    def save_state(self, path: str, version: int) -> None:
        """Everything `load_state` needs to continue bit for bit: each engine's DeepSpeed checkpoint
        (module, optimizer with its ZeRO partitions, scheduler, step counters), the frozen modules,
        `version` and the RNG states of this process."""
        out = Path(path)
        for name, engine in self.engines.items():  # a collective: every rank writes its ZeRO partition
            engine.save_checkpoint(str(out / "engines"), tag=name, save_latest=False)
        state = {"version": version, "torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": np.random.get_state()}
        with (out / self._state_file()).open("wb") as fh:
            pickle.dump(state, fh)
        if not self.rank.is_main:  # the rest is the same on every rank
            return
        for name, module in self.frozen.items():
            torch.save(module.state_dict(), out / f"{name}.pt")  # keeps tied weights tied
        if self.value:  # not a DeepSpeed engine (learners/value_model.py says why): its own format
            self.save_value_model(str(out / VALUE_MODEL_DIR))

    def _state_file(self) -> str:
        # Rank 0 keeps the single-rank name, so single-rank checkpoints are unchanged.
        return STATE_FILE if self.rank.is_main else f"learner_state.rank{self.rank.rank}.pkl"

    def load_state(self, path: str, device: torch.device) -> int:
        """Restore what `save_state` wrote (same config, same modules) onto `device`; returns the version."""
        src = Path(path)
        for name, engine in self.engines.items():
            load_dir, _ = engine.load_checkpoint(str(src / "engines"), tag=name)
            if load_dir is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for engine '{name}' under {src / 'engines'}")
        for name, module in self.frozen.items():
            module.load_state_dict(torch.load(src / f"{name}.pt", map_location=device, weights_only=True))
        if self.value:
            self.load_value_model(str(src / VALUE_MODEL_DIR))
        with (src / self._state_file()).open("rb") as fh:
            state = pickle.load(fh)  # our own checkpoint, verified by its manifest before this is called
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        return int(state["version"])

    def save_pretrained(self, path: str) -> None:
        """Full HF checkpoint: config, generation config, weights, and the tokenizer files of model_dir;
        plus `value_model/` when the loss has a value model."""
        with full_parameters(self.policy, self.zero_stage):
            if self.rank.is_main:
                self.policy.save_pretrained(str(path))
        if not self.rank.is_main:
            return
        out = Path(path)
        for pattern in TOKENIZER_FILES:
            for src in self.model_dir.glob(pattern):
                if src.is_file():
                    shutil.copy2(src, out / src.name)
        if self.value:
            self.save_value_model(str(out / VALUE_MODEL_DIR))
        readable_as_umask(out)

    def save_value_model(self, path: str) -> None:
        """The value model's weights and AdamW state under `path` (for resume); an error without one."""
        self._require_value_model().save(path)

    def load_value_model(self, path: str) -> None:
        """Restore what `save_value_model` wrote (e.g. `<checkpoint>/value_model`)."""
        self._require_value_model().load(path)

    def _require_value_model(self) -> ValueTrainer:
        if self.value is None:
            raise ValueError(f"loss '{self.loss_name}' has no value model (only losses with needs_value_model do)")
        return self.value
