"""The learner's sections: `learner:` (optimisation, ranks, limits) and `weight_sync:` (how weights reach the
generators)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from async_rlhf.config.base import Strict


class LearnerConfig(Strict):
    steps: int = Field(200, ge=1, description="learner steps (policy versions) to train")
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="the learning rate over the run after the warm-up: constant, linear to 0 or a half "
                                "cosine to 0 at learner.steps (HF's shapes; learners/lr_schedule.py); the value "
                                "model's value_lr follows it too"
    )
    warmup_steps: int = Field(0, ge=0, description="learner steps of linear warm-up from lr / warmup_steps to lr")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage (3 shards the parameters too). Unset: 0 for one rank on float32 weights "
                       "(the CPU), where ZeRO 1-2 have nothing to partition and only add flat copies of weights and "
                       "gradients (1.25x slower SmolLM2 steps, docs/benchmarks.md); 2 otherwise (bf16 weights "
                       "keep float32 master copies in ZeRO's optimizer)",
    )
    num_ranks: int = Field(
        1, ge=1, le=1024,
        description="R data-parallel learner processes (Ray actors in one torch.distributed group: nccl on GPU, "
                    "gloo on CPU), one GPU each on GPU; each rank trains on prompts_per_step / R groups",
    )
    autocast: Literal["none", "bfloat16"] = Field(
        "none",
        description="bfloat16: the learner's forward passes (policy, reference, value model) run under torch.autocast "
                    "in bfloat16 on float32 weights (mixed precision: optimizer, master weights and log-softmax stay "
                    "float32). About 1.6x faster steps on a CPU with native bf16 (avx512_bf16 or AMX in lscpu's "
                    "flags; slower without); the learner's log-probs then differ from a float32 generator's by "
                    "about 1e-2 per token (logprob_gap). A no-op with model.dtype=bfloat16",
    )
    fused_optimizer: bool = Field(
        True,
        description="AdamW's fused kernel (TRL's default with torch >= 2.8): one pass over the weights per step "
                    "instead of a dozen elementwise ones, each a fresh weight-sized buffer. About 1.25x faster "
                    "SmolLM2 steps on 2 CPU cores (docs/benchmarks.md). Rounds differently from false (torch's "
                    "for-each kernels): resume a run with the setting it started with for bit-identical weights",
    )
    disable_dropout: bool = Field(
        True,
        description="dropout off in the policy and value model (TRL's default): the generator samples without it, "
                    "so with it the learner's log-probs differ from the sampling ones at random, and so do the "
                    "ratios, KLs and DPO margins built on them (GPT-2 and OPT checkpoints ship 0.1); false keeps "
                    "the checkpoint's rates",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1,
        description="accumulate each step's gradient over micro-batches of whole rollout groups whose padded "
                    "tokens (rows x longest prompt+completion) stay under this (a larger group is its own "
                    "micro-batch); None = the whole step in one forward. Losses averaging over sequences or "
                    "pairs (DPO, IPO, RLOO, GRPO) get the whole step's gradient; token-mean losses (best-of-N "
                    "SFT, PPO, VinePPO) average tokens per micro-batch, and PPO whitens advantages per micro-batch",
    )
    stall_timeout_s: float = Field(
        600.0, gt=0, description="stop with an error when no learner step finishes for this long (never hang)"
    )
    gpu_memory_fraction: float = Field(
        0.45, gt=0, lt=1, description="weight_sync.transport=ipc (one shared GPU): the learner's share of it; "
                                      "with generation.gpu_memory_utilization it must fit in 0.95 of the GPU",
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="consecutive steps with a non-finite loss (each skipped) before the run stops with a "
                             "checkpoint"
    )
    max_restarts: int = Field(
        2, ge=0, description="a dead learner is replaced in the same process from the newest checkpoint (or the "
                             "run's start, before its first) this many times; then the run stops with the --resume "
                             "command"
    )

    @model_validator(mode="after")
    def _warmup_within_the_run(self) -> "LearnerConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"learner.warmup_steps ({self.warmup_steps}) must be below learner.steps ({self.steps}): "
                             "the run would end before its learning rate reaches learner.lr")
        return self


class WeightSyncConfig(Strict):
    transport: Literal["shm", "nccl", "ipc"] = Field(
        "shm", description="shm: safetensors in shared memory (CPU or GPU, one node); nccl: bucketed broadcast from "
                           "learner rank 0 to every generator through vLLM's weight-transfer engine (GPUs, one or "
                           "more nodes); ipc: vLLM's CUDA IPC engine, learner and one generator sharing ONE GPU",
    )
    shm_root: Path = Path("/dev/shm")
    keep_versions: int = Field(2, ge=1)
    bucket_mb: int = Field(256, ge=1, le=16384, description="nccl: size of one packed broadcast buffer")
    timeout_s: float = Field(
        300.0, gt=0, description="nccl, ipc: a rendezvous or push that takes longer fails with an error (never a "
                                 "hang). A push waits for each generator's batch in flight (its receive call queues "
                                 "behind it), so this must cover the slowest generate call (VinePPO: with its MC "
                                 "rollouts) plus the transfer"
    )


PUSHED_TRANSPORTS = ("nccl", "ipc")  # the learner pushes each version into the generators' GPU memory
# Left to the CUDA context, NCCL/cuBLAS workspaces and fragmentation of the two processes sharing a GPU.
SHARED_GPU_HEADROOM = 0.05


def check_memory_split(generator_share: float, learner_share: float) -> None:
    """One GPU shared by vLLM and the learner: their shares must leave SHARED_GPU_HEADROOM free."""
    if generator_share + learner_share > 1 - SHARED_GPU_HEADROOM:
        raise ValueError(f"generation.gpu_memory_utilization ({generator_share:g}) + learner.gpu_memory_fraction "
                         f"({learner_share:g}) exceed {1 - SHARED_GPU_HEADROOM:g} of the one GPU they share "
                         f"(weight_sync.transport=ipc); lower one of them, e.g. generation.gpu_memory_utilization=0.45")
