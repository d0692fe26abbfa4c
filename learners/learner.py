"""The learner: a DeepSpeed engine around the policy, a frozen reference, and a loss from the registry.

One instance = one rank. The controller runs it as `ray.remote(Learner).options(num_cpus=...)`; tests
call it directly. It is loss-agnostic: `train_step` is select -> forward -> loss -> backward -> step,
with every loss-specific decision behind the `LossSpec` (learners/losses/registry.py).

With `rank=None` __init__ creates a world of size 1 on 127.0.0.1 and a free port. With R ranks
(learner.num_ranks; learners/group.py starts them) each rank trains on its share of the groups and
DeepSpeed averages the gradients; rank 0 alone writes weights and checkpoint files (all ranks take
part in gathering ZeRO-3 shards first).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from async_rlhf.cluster.busy_board import BusyBoard
from async_rlhf.cluster.gc_pause import paused_gc
from async_rlhf.cluster.resources import CoreLoan, pin_process
from async_rlhf.config.learner import LearnerConfig
from async_rlhf.config.run import RunConfig
from async_rlhf.rollout import RolloutGroup
from learners.core_lending import CoreLending
from learners.distributed import RankInfo, all_agree, all_max, init_distributed
from learners.dropout import disable_dropout
from learners.logprobs import (
    PackedBatch,
    behaviour_logprobs,
    completion_logprobs,
    gap_sums,
    mc_advantages,
    pack,
    sampled_kl,
)
from learners.losses import LossInputs, Selection, resolve_loss
from learners.losses.contract import loss_call, loss_result
from learners.lr_schedule import lr_factor, set_lr
from learners.micro_batches import (
    GroupSize,
    MicroBatch,
    combine_metrics,
    split_by_tokens,
    split_further,
    sum_stats,
    weigh,
)
from learners.persistence import LearnerStateStore, WeightExport
from learners.value_model import ValueModel, ValueTrainer

if TYPE_CHECKING:  # transformers is slow to import: only its types are needed here
    from transformers import PreTrainedModel

KL_CHUNK = 64  # sequences per no-grad forward in kl_to_reference: bounds activation memory


def deepspeed_config(learner: LearnerConfig, dtype: str = "float32") -> dict:
    # The learner owns gradient accumulation: a step has as many micro-batches as its tokens need
    # (learner.max_tokens_per_micro_batch), each loss already scaled by its share of the step's rows.
    # Unmanaged accumulation: engine.backward only accumulates, engine.step() is the boundary that
    # reduces over the ranks and updates; the batch-size fields then only fix the gradient scaling
    # (1/accumulation steps = 1).
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": learner.zero_stage},
        "gradient_clipping": learner.grad_clip,  # 0 disables clipping
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},  # the engine's dtype must be the weights' (model.dtype)
        "steps_per_print": 10**9,  # the controller logs metrics; keep DeepSpeed quiet
        **autocast_config(learner),
    }


def autocast_config(learner: LearnerConfig) -> dict:
    """learner.autocast as DeepSpeed's own `torch_autocast`: an engine without it turns off CUDA autocast
    around its forward (found on an H200: the policy ran in float32 while the reference, called directly, ran
    in bfloat16). No module's gradients are marked for lower-precision reduction: they stay the weights' dtype."""
    if learner.autocast != "bfloat16":
        return {}
    return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}


def load_causal_lm(model_dir: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """Any HF causal LM, in `dtype` (model.torch_dtype: float32 on CPU, where vLLM's logprobs then match)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))


def load_trained_lm(model_dir: str | Path, cfg: RunConfig) -> PreTrainedModel:
    """A causal LM the learner trains (the policy, a value model's body), with learner.disable_dropout."""
    model = load_causal_lm(model_dir, cfg.model.torch_dtype)
    if cfg.learner.disable_dropout:
        disable_dropout(model)
    return model


def epoch_metrics(epochs: list[dict]) -> dict:
    """One step's record from its epochs: the first epoch's (measured before any update of this
    batch), the optimizer steps of all, and the last epoch's loss and clip rates when there were more."""
    first, last = epochs[0], epochs[-1]
    if len(epochs) == 1:
        return first
    tail = {f"last_epoch_{k}": last[k] for k in ("loss", "clip_frac", "value_clip_frac") if k in last}
    return {**first, **tail, "epochs": len(epochs), "nonfinite": last["nonfinite"],
            "nonfinite_micro_batches": last["nonfinite_micro_batches"],
            "optimizer_step": sum(e["optimizer_step"] for e in epochs)}


def padding_loss(logps: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """A loss with exactly zero gradient that still reaches every trained parameter: a padding pass
    runs the same collectives (ZeRO-3 gathers, value-model gradient averaging) as a real one, and
    cannot turn non-finite the way `real loss * 0` would on a NaN reward."""
    loss = logps.sum() * 0.0
    return loss + values.sum() * 0.0 if values is not None else loss


class Learner:
    """Trains the policy one step per call on rollout groups; publishes weights as files."""

    @paused_gc()  # the start's imports and model loads (gc_pause.py)
    def __init__(self, cfg: RunConfig, model_dir: str, cores: list[int] | None = None,
                 threads: int | None = None, rank: RankInfo | None = None, loan: CoreLoan | None = None) -> None:
        pin_process(cores, threads)
        self.rank = init_distributed(rank)
        import deepspeed

        torch.manual_seed(cfg.seed)
        if cfg.weight_sync.transport == "ipc" and torch.cuda.is_available():
            # The GPU is shared with vLLM: stay inside the share the config checked (an OOM here, not in vLLM).
            torch.cuda.set_per_process_memory_fraction(cfg.learner.gpu_memory_fraction)
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.spec = resolve_loss(cfg.loss)  # imports loss.import_path again in this process
        self.version = 0  # == number of train_step calls; the queue's staleness rule relies on it
        self._fresh: set[int] = set()  # id() of this step's staleness-0 completions
        dtype = cfg.model.torch_dtype
        policy = load_trained_lm(model_dir, cfg)
        # Any valid id will do (padding is masked out); many checkpoints (GPT-2, Llama) define no pad token.
        self.pad_id = int(getattr(policy.config, "pad_token_id", None) or 0)
        if cfg.learner.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        # Fused: the for-each kernels make a weight-sized temporary per elementwise op, and on CPU each
        # fresh page is a page fault (a large part of a SmolLM2 step's time; docs/benchmarks.md).
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay,
                                      fused=cfg.learner.fused_optimizer)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               config=deepspeed_config(cfg.learner, dtype))
        self.optimizers = [(optimizer, cfg.learner.lr)]  # and the value model's: their rates follow lr_schedule
        self.device = self.engine.device
        reference_dir = cfg.model.reference_path or model_dir
        self.reference = load_causal_lm(reference_dir, dtype).to(self.device).eval().requires_grad_(False)
        # None unless the loss declares needs_value_model; resume saves / restores it with
        # save_value_model / load_value_model (also written by save_pretrained).
        self.value: ValueTrainer | None = self._build_value_model() if self.spec.needs_value_model else None
        if self.value:
            self.optimizers.append((self.value.optimizer, cfg.loss.value_lr or cfg.learner.lr))
        self.export = WeightExport(self.policy, cfg, self.rank)
        # Everything a checkpoint must hold goes through the store's `engines` and `frozen` maps.
        self.store = LearnerStateStore({"policy": self.engine}, {"reference": self.reference}, self.value,
                                     self.model_dir, self.rank, cfg.learner.zero_stage, self.spec.name)
        pin_process(None, threads or (len(cores) if cores else None))  # DeepSpeed may resize the pool
        self.lending = self._lend(loan) if loan else None

    def _lend(self, loan: CoreLoan) -> CoreLending:
        """Every model this learner runs checks, layer by layer, whether it may use the generators' cores."""
        lending = CoreLending(loan.own, loan.every, BusyBoard.attach(loan.board))
        for model in (self.policy, self.reference, self.value.model if self.value else None):
            if model is not None:
                lending.watch(model)
        return lending

    def _build_value_model(self) -> ValueTrainer:
        model = ValueModel.from_causal_lm(load_trained_lm(self.model_dir, self.cfg)).to(self.device)
        learner = self.cfg.learner
        return ValueTrainer(model, lr=self.cfg.loss.value_lr or learner.lr, weight_decay=learner.weight_decay,
                            grad_clip=learner.grad_clip, fused=learner.fused_optimizer)

    @property
    def policy(self) -> PreTrainedModel:
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
        start, started_at = time.perf_counter(), time.time()
        sizes, chunks = self._split(groups)
        selections = [self.spec.select(groups[c.start:c.stop]) for c in chunks]
        stats = sum_stats(selections)  # == selecting the whole list (selectors decide group by group)
        # Staleness-0 rows for logprob_gap_fresh, by identity: selections hold the groups' own completions.
        self._fresh = {id(c) for g in groups if g.policy_version == self.version for c in g.completions}
        lr = self._schedule()
        # Ranks skip together and run as many passes (ZeRO-3 gathers parameters collectively in each
        # forward), or one would wait forever.
        if all_agree(any(len(s) for s in selections), self.device):
            count = all_max(len(chunks), self.device)
            if len(chunks) < count:
                chunks = split_further(sizes, chunks, count)
                selections = [self.spec.select(groups[c.start:c.stop]) for c in chunks]
            metrics = self._optimize([MicroBatch(s, self._pack(s), w) for s, w in weigh(selections, count)])
        else:
            metrics = {"loss": math.nan, "kl": math.nan, "logprob_gap": math.nan, "logprob_gap_fresh": math.nan,
                       "train_tokens": 0, "nonfinite": 0,
                       "optimizer_step": 0, "micro_batches": 0, "nonfinite_micro_batches": 0}
        self.version += 1
        wide = {"wide_s": self.lending.take_wide_s()} if self.lending else {}
        return {**stats, **metrics, **wide, "lr": lr, "version": self.version, "step_s": time.perf_counter() - start,
                "started_at": started_at}  # (wall clock) calls queued ahead of it on this actor ran before

    def _split(self, groups: list[RolloutGroup]) -> tuple[list[GroupSize], list[range]]:
        """Each group's size (its selection alone) and the chunks of learner.max_tokens_per_micro_batch;
        with no budget, one chunk of everything and no sizes (nothing is selected twice)."""
        budget = self.cfg.learner.max_tokens_per_micro_batch
        if budget is None:
            return [], [range(len(groups))]
        sizes = [GroupSize.of(self.spec.select([group])) for group in groups]
        return sizes, split_by_tokens(sizes, budget)

    def _optimize(self, micro: list[MicroBatch]) -> dict:
        """`loss.ppo_epochs` updates on one batch (1 unless the loss declares supports_epochs), each
        accumulated over the same micro-batches.

        Fixed across epochs: the reference log-probs and, with a value model, the "old" values. The
        generators run no value model, so V_old is the value model before this batch's first update
        (a no-grad pass): in the first epoch V = V_old and the value clip cannot bind; it does from
        the second on, like the ratio clip against the behaviour log-probs beyond their staleness.
        """
        with torch.no_grad(), self.compute():  # one micro-batch at a time: only the [B, C] results are kept
            for mb in (mb for mb in micro if mb.weight > 0):  # a padding pass reads neither
                # At the sampling temperature too: KL(pi_T || ref_T) is 0 at the start and the
                # reference enters PPO's shaped rewards next to the (tempered) behaviour log-probs.
                mb.ref_logps = completion_logprobs(self.reference, mb.batch, self.temperature)
                mb.old_values = self.value.values(mb.batch) if self.value else None
        epochs: list[dict] = []
        for _ in range(self.cfg.loss.ppo_epochs):
            epochs.append(self._update(micro))
            if epochs[-1]["nonfinite"]:
                break
        return epoch_metrics(epochs)

    def _schedule(self) -> float:
        """This step's learning rate (learners/lr_schedule.py), set on every optimizer; returned for its metrics."""
        learner = self.cfg.learner
        factor = lr_factor(self.version, learner.steps, learner.warmup_steps, learner.lr_schedule)
        set_lr(self.optimizers, factor)
        return learner.lr * factor

    def _update(self, micro: list[MicroBatch]) -> dict:
        """One optimizer step: gradients accumulated over the micro-batches whose loss is finite.

        A non-finite micro-batch is left out (its NaN/inf would poison the weights and AdamW state
        for good); the rest still train and the step reports nonfinite=1. With none left, no step.
        """
        self.engine.train()
        passes = [self._accumulate(mb) for mb in micro]
        stepped = any(p["finite"] for p in passes)  # agreed pass by pass, so the same on every rank
        metrics = combine_metrics(passes)
        if stepped:
            self.engine.step()
            if self.value:  # the losses' backward filled the value model's grads too
                metrics["value_grad_norm"] = self.value.step()
        nonfinite = not all(p["finite"] for p in passes)
        return {**metrics, "nonfinite": int(nonfinite), "optimizer_step": int(stepped)}

    def _accumulate(self, mb: MicroBatch) -> dict:
        """Forward one micro-batch; if its loss is finite on every rank, backward it scaled by its weight."""
        with self.compute():
            logps = completion_logprobs(self.engine, mb.batch, self.temperature)
            values = self.value.values(mb.batch) if self.value else None
        gap: dict = {}
        if mb.weight > 0:
            # Filled for every weighted micro-batch before the first update (train_step), and by _inputs.
            assert mb.ref_logps is not None
            inputs = self._inputs(mb.selection, mb.batch, logps, mb.ref_logps, values, mb.old_values)
            assert inputs.behaviour_logps is not None
            answer = loss_call(self.spec.name, self.spec.fn, inputs, self.cfg.loss)
            loss, measures = loss_result(self.spec.name, answer)
            kl = ((logps.detach() - mb.ref_logps) * mb.batch.completion_mask).sum(-1).mean()
            measures = {**measures, "loss": float(loss.detach()), "kl": float(kl)}
            gap = gap_sums(logps, inputs.behaviour_logps, inputs.mask, self._fresh_rows(mb.selection))
        else:
            loss, measures = padding_loss(logps, values), {}
        finite = all_agree(bool(torch.isfinite(loss)), self.device)
        if finite:
            self.engine.backward(loss * mb.weight)  # weight 1.0 (one micro-batch) is exact: today's step
        return {"weight": mb.weight, "finite": finite, "train_tokens": mb.batch.num_completion_tokens,
                "forward_tokens": mb.batch.num_tokens, "measures": measures, "gap": gap}

    def compute(self) -> torch.autocast:
        """The context of every forward pass: bfloat16 autocast with learner.autocast, else plain float32."""
        enabled = self.cfg.learner.autocast == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def temperature(self) -> float:
        """The generators' sampling temperature: log-probs are taken of that distribution (logprobs.py)."""
        return self.cfg.generation.temperature

    def _fresh_rows(self, selection: Selection) -> torch.Tensor:
        return torch.tensor([id(c) in self._fresh for c in selection.completions], device=self.device)

    def _inputs(self, selection: Selection, batch: PackedBatch, logps: torch.Tensor, ref_logps: torch.Tensor,
                values: torch.Tensor | None = None, old_values: torch.Tensor | None = None) -> LossInputs:
        """Everything a loss may read, filled the same way for every loss (the spec only gates the
        reference and the value model, so a loss that does not declare them cannot depend on them)."""
        completions = selection.completions
        return LossInputs(
            logps=logps, mask=batch.completion_mask,
            rewards=torch.tensor([c.reward for c in completions], dtype=torch.float32, device=self.device),
            ref_logps=ref_logps if self.spec.needs_reference else None,
            behaviour_logps=behaviour_logprobs(completions, logps.shape[1]).to(self.device),
            group_ids=torch.tensor(selection.group_ids, dtype=torch.long, device=self.device),
            values=values, old_values=old_values,
            advantages=(mc_advantages(completions, logps.shape[1]).to(self.device)
                        if self.spec.needs_mc_values else None),
        )

    def _pack(self, selection: Selection) -> PackedBatch:
        completions = [c.token_ids for c in selection.completions]
        return pack(selection.prompts, completions, self.pad_id).to(self.device)

    @torch.no_grad()
    def kl_to_reference(self, groups: list[RolloutGroup]) -> float:
        """Mean over all scored completions of sum_t (log pi(y_t) - log ref(y_t)): a sample estimate
        of KL(pi || ref) when the completions were sampled from pi. NaN if nothing is scored."""
        selections, rows = self._scored_selections(groups)
        if not rows:
            return math.nan
        self.policy.eval()
        total = 0.0
        for sel in selections:
            batch = self._pack(sel)
            with self.compute():
                diff = completion_logprobs(self.policy, batch) - completion_logprobs(self.reference, batch)
            total += float((diff * batch.completion_mask).sum())
        return total / rows

    @torch.no_grad()
    def sampled_kl_to_reference(self, groups: list[RolloutGroup], temperature: float) -> float:
        """kl_to_reference of the weights that sampled `groups`, whatever this learner holds by now (an
        evaluation runs beside training): logprobs.sampled_kl. NaN if nothing is scored."""
        selections, rows = self._scored_selections(groups)
        with self.compute():
            total = sum(sampled_kl(self.reference, self._pack(s), s.completions, temperature) for s in selections)
        return total / rows if rows else math.nan

    @staticmethod
    def _scored_selections(groups: list[RolloutGroup]) -> tuple[list[Selection], int]:
        """The scored completions of `groups`, KL_CHUNK to a Selection (one no-grad forward each), and how many."""
        rows = [(list(g.prompt.token_ids), c) for g in groups for c in g.scored]
        chunks = [rows[i:i + KL_CHUNK] for i in range(0, len(rows), KL_CHUNK)]
        return [Selection(prompts=[p for p, _ in ch], completions=[c for _, c in ch]) for ch in chunks], len(rows)

    # ------------------------------------------------------------------ publishing and checkpoints
    # Ray methods (the controller and learners/group.py call them by name): learners/persistence.py does the work.

    def connect_generators(self, handles: list, tensor_parallel_size: int) -> None:
        """Join (or, after a generator restart, re-form) the weight group with the generators (nccl or ipc)."""
        self.export.connect_generators(handles, tensor_parallel_size, self.version)

    def save_weights(self, path: str) -> None:
        """Publish the current weights at `path`, a broker location or a plain directory (WeightExport)."""
        self.export.save_weights(path)

    def weights_digest(self) -> str:
        """sha256 of the full policy weights: equal on every rank while the ranks are in step."""
        return self.export.weights_digest()

    def save_state(self, path: str) -> None:
        """Everything `load_state` needs to continue bit for bit (LearnerStateStore.save_state)."""
        self.store.save_state(path, self.version)

    def load_state(self, path: str) -> int:
        """Restore what `save_state` wrote (same config, same modules); returns the version."""
        self.version = self.store.load_state(path, self.device)
        return self.version

    def save_pretrained(self, path: str) -> None:
        """Full HF checkpoint with the tokenizer files of model_dir (and `value_model/` with a value model)."""
        self.store.save_pretrained(path)

    def save_value_model(self, path: str) -> None:
        """The value model's weights and AdamW state under `path` (for resume); an error without one."""
        self.store.save_value_model(path)

    def load_value_model(self, path: str) -> None:
        """Restore what `save_value_model` wrote (e.g. `<checkpoint>/value_model`)."""
        self.store.load_value_model(path)
