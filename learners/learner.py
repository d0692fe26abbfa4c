"""The learner: a DeepSpeed engine around the policy, a frozen reference, and a loss from the registry.

One instance = one rank. The controller runs it as `ray.remote(Learner).options(num_cpus=...)`; tests
call it directly. It is loss-agnostic: `train_step` is select -> forward -> loss -> backward -> step,
with every loss-specific decision behind the `LossSpec` (learners/losses/registry.py).

Single-rank for now: __init__ creates a world of size 1 on 127.0.0.1 and a free port. A multi-rank
learner would receive MASTER_ADDR/PORT and its rank from the controller instead.
"""
from __future__ import annotations

import math
import os
import pickle
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from async_rlhf.config import LearnerConfig, RunConfig
from async_rlhf.resources import pin_process
from async_rlhf.rollout import RolloutGroup
from learners.logprobs import PackedBatch, behaviour_logprobs, completion_logprobs, pack
from learners.losses import LossInputs, Selection, resolve_loss

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "*.model", "chat_template*")
KL_CHUNK = 64  # sequences per no-grad forward in kl_to_reference: bounds activation memory
STATE_FILE = "learner_state.pkl"  # version and RNG states, next to the engines' DeepSpeed checkpoints


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_rank_distributed() -> None:
    """World of one process (gloo on CPU). Must run before deepspeed is imported: DS_ACCELERATOR
    is read at import time. Reuses an existing process group (a second Learner in one process)."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else "nccl"
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(learner: LearnerConfig) -> dict:
    # One micro-batch per step: the learner forwards the whole selection at once, so DeepSpeed's
    # batch-size fields only fix the gradient scaling (1/accumulation steps = 1).
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": learner.zero_stage},
        "gradient_clipping": learner.grad_clip,  # 0 disables clipping
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the controller logs metrics; keep DeepSpeed quiet
    }


def load_causal_lm(model_dir: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


class Learner:
    """Trains the policy one step per call on rollout groups; publishes weights as files."""

    def __init__(self, cfg: RunConfig, model_dir: str, cores: list[int] | None = None,
                 threads: int | None = None) -> None:
        pin_process(cores, threads)
        init_single_rank_distributed()
        import deepspeed

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.spec = resolve_loss(cfg.loss)  # imports loss.import_path again in this process
        self.version = 0  # == number of train_step calls; the queue's staleness rule relies on it
        policy = load_causal_lm(model_dir)
        self.pad_id = int(getattr(policy.config, "pad_token_id", None) or 0)  # any valid id: padding is masked
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr,
                                      weight_decay=cfg.learner.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               config=deepspeed_config(cfg.learner))
        self.device = self.engine.device
        self.reference = load_causal_lm(model_dir).to(self.device).eval().requires_grad_(False)
        # Everything a checkpoint must hold goes through these two maps (save_state / load_state):
        # a new trainable module (e.g. a value model) is one more entry in `engines`.
        self.engines: dict[str, "deepspeed.DeepSpeedEngine"] = {"policy": self.engine}
        self.frozen: dict[str, torch.nn.Module] = {"reference": self.reference}
        pin_process(None, threads or (len(cores) if cores else None))  # DeepSpeed may resize the pool

    @property
    def policy(self) -> torch.nn.Module:
        """The HF model inside the engine (same parameters the optimizer updates)."""
        return self.engine.module

    # ------------------------------------------------------------------ training

    def train_step(self, groups: list[RolloutGroup]) -> dict:
        """One optimizer step on `groups`; always advances `version` by one.

        `loss`, `kl` and the loss's metrics are measured with the weights before this step's update.
        With no usable sequences (all groups tied or failed) the step makes no update but still
        counts: version must equal the number of steps taken, because staleness = learner version -
        sample version, and the controller/queue count versions, not successful updates.
        """
        start = time.perf_counter()
        selection = self.spec.select(groups)
        if len(selection):
            metrics = self._optimize(selection)
        else:
            metrics = {"loss": math.nan, "kl": math.nan, "train_tokens": 0, "nonfinite": 0,
                       "optimizer_step": 0}
        self.version += 1
        return {**selection.stats, **metrics, "version": self.version,
                "step_s": time.perf_counter() - start}

    def _optimize(self, selection: Selection) -> dict:
        batch = self._pack(selection)
        self.engine.train()
        logps = completion_logprobs(self.engine, batch)
        with torch.no_grad():
            ref_logps = completion_logprobs(self.reference, batch)
        loss, loss_metrics = self.spec.fn(self._inputs(selection, batch, logps, ref_logps), self.cfg.loss)
        finite = bool(torch.isfinite(loss))
        if finite:  # a NaN/inf step would poison the weights and AdamW state for good
            self.engine.backward(loss)
            self.engine.step()
        kl = ((logps.detach() - ref_logps) * batch.completion_mask).sum(-1).mean()
        return {**loss_metrics, "loss": float(loss.detach()), "kl": float(kl),
                "train_tokens": batch.num_completion_tokens, "forward_tokens": batch.num_tokens,
                "nonfinite": int(not finite), "optimizer_step": int(finite)}

    def _inputs(self, selection: Selection, batch: PackedBatch, logps: torch.Tensor,
                ref_logps: torch.Tensor) -> LossInputs:
        """Everything a loss may read, filled the same way for every loss (the spec only gates the
        reference, so a loss that does not declare it cannot silently depend on it)."""
        completions = selection.completions
        return LossInputs(
            logps=logps, mask=batch.completion_mask,
            rewards=torch.tensor([c.reward for c in completions], dtype=torch.float32, device=self.device),
            ref_logps=ref_logps if self.spec.needs_reference else None,
            behaviour_logps=behaviour_logprobs(completions, logps.shape[1]).to(self.device),
            group_ids=torch.tensor(selection.group_ids, dtype=torch.long, device=self.device),
        )

    def _pack(self, selection: Selection) -> PackedBatch:
        completions = [c.token_ids for c in selection.completions]
        return pack(selection.prompts, completions, self.pad_id).to(self.device)

    @torch.no_grad()
    def kl_to_reference(self, groups: list[RolloutGroup]) -> float:
        """Mean over all scored completions of sum_t (log pi(y_t) - log ref(y_t)): a sample estimate
        of KL(pi || ref) when the completions were sampled from pi. NaN if nothing is scored."""
        rows = [(list(g.prompt.token_ids), c) for g in groups for c in g.scored]
        if not rows:
            return math.nan
        self.policy.eval()
        total = 0.0
        for i in range(0, len(rows), KL_CHUNK):
            chunk = rows[i:i + KL_CHUNK]
            sel = Selection(prompts=[p for p, _ in chunk], completions=[c for _, c in chunk])
            batch = self._pack(sel)
            diff = completion_logprobs(self.policy, batch) - completion_logprobs(self.reference, batch)
            total += float((diff * batch.completion_mask).sum())
        return total / len(rows)

    # ------------------------------------------------------------------ publishing

    def save_weights(self, path: str) -> None:
        """Write `path/model.safetensors` (HF names) for vLLM's in-place `reload_weights`.

        Written to a temporary name and renamed, so a reader never sees a half-written file.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.safetensors.partial"
        save_file(hf_state_dict(self.policy), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, path: str) -> None:
        """Everything `load_state` needs to continue bit for bit: each engine's DeepSpeed checkpoint
        (module, optimizer with its ZeRO partitions, scheduler, step counters), the frozen modules,
        the version and the RNG states of this process."""
        out = Path(path)
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(out / "engines"), tag=name, save_latest=False)
        for name, module in self.frozen.items():
            torch.save(module.state_dict(), out / f"{name}.pt")  # keeps tied weights tied
        state = {"version": self.version, "torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": np.random.get_state()}
        with (out / STATE_FILE).open("wb") as fh:
            pickle.dump(state, fh)

    def load_state(self, path: str) -> int:
        """Restore what `save_state` wrote (same config, same modules); returns the version."""
        src = Path(path)
        for name, engine in self.engines.items():
            load_dir, _ = engine.load_checkpoint(str(src / "engines"), tag=name)
            if load_dir is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for engine '{name}' under {src / 'engines'}")
        for name, module in self.frozen.items():
            module.load_state_dict(torch.load(src / f"{name}.pt", map_location=self.device, weights_only=True))
        with (src / STATE_FILE).open("rb") as fh:
            state = pickle.load(fh)  # our own checkpoint, verified by its manifest before this is called
        self.version = state["version"]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        return self.version

    def save_pretrained(self, path: str) -> None:
        """Full HF checkpoint: config, generation config, weights, and the tokenizer files of model_dir."""
        out = Path(path)
        self.policy.save_pretrained(str(out))
        for pattern in TOKENIZER_FILES:
            for src in self.model_dir.glob(pattern):
                if src.is_file():
                    shutil.copy2(src, out / src.name)
