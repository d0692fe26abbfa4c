"""GPU memory of one learner rank, estimated from the config and the model's shape (docs/gpu_sizing.md).

What `learner.max_tokens_per_micro_batch` is sized by: the padded tokens of one forward are the only
term a config can turn down once the model, ZeRO stage and rank count are chosen. The estimate is
deliberately conservative (fp32 gradient accumulation, every token counted as a completion token for
the fp32 log-softmax, a fixed workspace, 10% allocator slack); each `configs/paper/` config carries its
result as one comment line, which tests/test_paper_configs.py recomputes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from async_rlhf.config.run import RunConfig

GIB = 2**30
MIB = 2**20
ALLOCATOR_SLACK = 0.10  # PyTorch caching-allocator fragmentation and what the estimate leaves out
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS and NCCL workspaces
DEEPSPEED_BUCKET_GIB = 1.0  # ZeRO reduce buckets (5e8 bf16 elements); ZeRO-3 live gathered parameters: 2
# bf16 parameter, fp32 gradient accumulation, fp32 master copy + AdamW m and v.
PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12
REFERENCE_BYTES = 2  # the frozen bf16 reference: a whole copy on every rank (never ZeRO-partitioned)
LOGIT_BYTES = 14  # per vocab entry and token: bf16 logits 2 + fp32 gathered 4 + log-softmax 4 + its gradient 4
COMMENT = re.compile(r"^# memory/rank \(docs/gpu_sizing\.md\) for (?P<name>\S+) \[params=(?P<params>\S+) "
                     r"hidden=(?P<hidden>\d+) layers=(?P<layers>\d+) mlp=(?P<mlp>\d+) vocab=(?P<vocab>\d+)\]:")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a causal LM (its config.json: hidden_size, num_hidden_layers, ...)."""

    params: float
    hidden: int
    layers: int
    mlp: int  # intermediate_size
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    states_gib: float  # weights, gradients, optimizer states, reference: fixed for the run
    workspace_gib: float
    per_token_mib: float  # activations + logits of one padded token of a training forward
    usable_gib: float  # the rank's share of the GPU less the allocator slack

    def peak_gib(self, tokens: int) -> float:
        return self.states_gib + self.workspace_gib + tokens * self.per_token_mib * MIB / GIB

    @property
    def max_tokens(self) -> int:
        """The largest micro-batch (padded tokens) that fits."""
        return int((self.usable_gib - self.states_gib - self.workspace_gib) * GIB / (self.per_token_mib * MIB))


def state_bytes_per_param(zero_stage: int, ranks: int) -> float:
    """ZeRO-1 partitions the optimizer states over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too."""
    share = [1.0 if zero_stage < stage else 1 / ranks for stage in (3, 2, 1)]
    return PARAM_BYTES * share[0] + GRAD_BYTES * share[1] + OPTIMIZER_BYTES * share[2]


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool) -> float:
    """bf16 tensors a layer keeps for backward per token: ~8 of width hidden (norm input, q/k/v, attention
    output, projections) and 4 of width mlp (gate, up, activation, product; GELU MLPs keep fewer). SDPA
    never stores the s x s scores. Checkpointing keeps each layer's input and recomputes one layer at a time."""
    layer = 2 * (8 * shape.hidden + 4 * shape.mlp)
    kept = shape.layers * 2 * shape.hidden + layer if checkpointing else shape.layers * layer
    return kept + LOGIT_BYTES * shape.vocab


def estimate(cfg: RunConfig, shape: ModelShape, gpu_gib: float = 80.0) -> MemoryEstimate:
    """One learner rank's memory: its share of the GPU (with ipc vLLM holds the rest of it)."""
    learner, ranks = cfg.learner, cfg.learner.num_ranks
    copies = 2 if cfg.loss.traits.needs_value_model else 1  # PPO's value model: its own trunk, gradients and AdamW
    states = shape.params * (copies * state_bytes_per_param(learner.zero_stage, ranks) + REFERENCE_BYTES)
    workspace = CONTEXT_GIB + DEEPSPEED_BUCKET_GIB * (2 if learner.zero_stage == 3 else 1)
    if cfg.weight_sync.transport == "nccl":  # packed broadcast buffers, double-buffered
        workspace += 2 * cfg.weight_sync.bucket_mb * MIB / GIB
    share = learner.gpu_memory_fraction if cfg.weight_sync.transport == "ipc" else 1.0
    per_token = copies * activation_bytes_per_token(shape, learner.gradient_checkpointing)
    return MemoryEstimate(states / GIB, workspace, per_token / MIB, gpu_gib * share * (1 - ALLOCATOR_SLACK))


def comment_line(cfg: RunConfig, name: str, shape: ModelShape, gpu_gib: float = 80.0) -> str:
    """The one-line estimate a config carries above its learner.max_tokens_per_micro_batch."""
    est, tokens = estimate(cfg, shape, gpu_gib), cfg.learner.max_tokens_per_micro_batch or 0
    return (f"# memory/rank (docs/gpu_sizing.md) for {name} [params={shape.params:.3g} hidden={shape.hidden} "
            f"layers={shape.layers} mlp={shape.mlp} vocab={shape.vocab}]: states {est.states_gib:.1f} + workspace "
            f"{est.workspace_gib:.1f} + {tokens} tok x {est.per_token_mib:.2f} MiB = {est.peak_gib(tokens):.1f} "
            f"of {est.usable_gib:.0f} GiB usable on {gpu_gib:.0f} (fits {est.max_tokens} tok)")


def parse_comment(line: str) -> tuple[str, ModelShape] | None:
    """The model name and shape of a config's estimate line, or None if the line is not one."""
    match = COMMENT.match(line.strip())
    if match is None:
        return None
    g = match.groupdict()
    return g["name"], ModelShape(float(g["params"]), int(g["hidden"]), int(g["layers"]), int(g["mlp"]), int(g["vocab"]))
