"""Run configuration: YAML + `key.sub=value` overrides, validated whole before any worker starts.

Errors are raised as `ConfigError` with one line that names the key, what was wrong and what
is accepted; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import ConfigError, Strict, environment_checks, merge_dicts, parse_overrides
from async_rlhf.config.loss_traits import BUILTIN_LOSSES, LossTraits
from async_rlhf.config.redaction import readable_saved_config, redacted
from async_rlhf.config.task import TASK_DEFAULTS, DatasetConfig, TaskConfig

if TYPE_CHECKING:
    from learners.losses.registry import LossSpec

__all__ = ["ConfigError", "DatasetConfig", "Strict", "TASK_DEFAULTS", "TaskConfig", "parse_overrides"]


class EmbeddedModelConfig(Strict):
    """A tiny Llama built locally and warm-started by supervised learning on the task."""

    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    sft_steps: int = Field(400, ge=0)
    sft_batch_size: int = Field(64, ge=1)
    sft_lr: float = Field(2e-3, gt=0)
    sft_correct_fraction: float = Field(
        0.4, gt=0, le=1, description="share of supervised targets that are correct; the rest are corrupted"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "EmbeddedModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.embedded.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.embedded.num_heads ({self.num_heads})"
            )
        return self


# Any one of these makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_checkpoint(key: str, path: Path, tokenizer: bool) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"{key}: no config.json in '{path}'; point it at an HF checkpoint directory")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{key}: no tokenizer in '{path}' (none of {', '.join(TOKENIZER_FILES)}); "
                         f"save it there with tokenizer.save_pretrained")


GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL2


def cuda_available() -> bool:
    """torch's answer, asked only where a GPU's device file exists: importing torch costs seconds, and
    without any of these files torch finds no GPU either (check-config stays light on a CPU machine)."""
    if not any(Path(f).exists() for f in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


class ModelConfig(Strict):
    source: Literal["embedded", "local"] = "embedded"
    path: Path | None = Field(None, description="HF causal-LM checkpoint directory (with its tokenizer) when source=local")
    reference_path: Path | None = Field(None, description="frozen reference model (same tokenizer); default: path")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights of policy, reference and generators: auto = float32 on CPU, bfloat16 on GPU"
    )
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    cache_dir: Path | None = Field(None, description="default: $XDG_CACHE_HOME/async-rlhf or ~/.cache/async-rlhf")

    @field_validator("path", "reference_path")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # A registered name (async_rlhf/policies/pretrained.py, e.g. smollm2) is its prepared cache directory. Ray workers
        # need not share the driver's working directory: hand them absolute paths.
        from async_rlhf.policies.pretrained import resolve_model_path

        return resolve_model_path(path).absolute() if path is not None else None

    @model_validator(mode="after")
    def _path(self, info: ValidationInfo) -> "ModelConfig":
        if self.source == "local" and self.path is None:
            raise ValueError("model.path is required when model.source=local (an HF checkpoint directory)")
        if self.reference_path is not None and self.source != "local":
            raise ValueError("model.reference_path needs model.source=local")
        if not environment_checks(info):
            return self
        if self.path is not None and self.source == "local":
            _check_checkpoint("model.path", self.path, tokenizer=True)
        if self.reference_path is not None:
            _check_checkpoint("model.reference_path", self.reference_path, tokenizer=False)
        return self

    @property
    def torch_dtype(self) -> str:
        """The dtype name that learner and generators load with (auto resolved here)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if cuda_available() else "float32"


class GenerationConfig(Strict):
    num_generators: int = Field(1, ge=1)
    prompts_per_step: int = Field(16, ge=1, description="prompts consumed by one learner step")
    samples_per_prompt: int = Field(4, ge=1, description="K completions per prompt")
    max_new_tokens: int = Field(12, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    eval_temperature: float = Field(1.0, ge=0)
    max_model_len: int = Field(64, ge=8)
    kv_cache_gib: float = Field(1.0, gt=0)
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a generator that died; then the run stops")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per generator (vLLM tensor parallelism)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each generator GPU that vLLM may use (weights + KV cache)"
    )

    @model_validator(mode="after")
    def _split(self) -> "GenerationConfig":
        if self.prompts_per_step % self.num_generators:
            raise ValueError(
                f"generation.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"generation.num_generators ({self.num_generators})"
            )
        return self


ScorerName = Literal[  # reward_models/rules.py
    "sort_partial", "sort_exact", "arith_partial", "arith_exact",
    "reference_exact", "reference_contains", "reference_final", "reference_similarity", "vader_compound",
]


class RemoteRewardConfig(Strict):
    """An HTTP reward model for the train role (protocol: docs/reward_protocol.md)."""

    url: str = Field(pattern=r"^https?://", description="base URL, e.g. http://127.0.0.1:8500")
    timeout_s: float = Field(10.0, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="on timeouts, connection errors, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first back-off; doubles per retry, with jitter")
    deadline_s: float = Field(60.0, gt=0, description="per batch, retries included; then failed / timed out")


class LearnedRewardConfig(Strict):
    """A learned reward model for the train role: an HF sequence-classification checkpoint with a scalar
    head (e.g. from `async-rlhf train-rm`), served batched inside the reward actor."""

    path: Path = Field(description="reward model directory (config.json, weights, tokenizer)")
    batch_size: int = Field(16, ge=1, description="pairs per forward pass")
    max_length: int = Field(512, ge=8, description="tokens of prompt + response; longer ones lose the prompt's start")
    threads: int = Field(1, ge=1, description="torch threads of the reward actor (it shares the cores)")

    @field_validator("path")
    @classmethod
    def _dir(cls, path: Path) -> Path:
        from reward_models.learned import check_reward_model_dir

        check_reward_model_dir("reward.learned.path", path)
        return path.absolute()  # Ray workers need not share the driver's working directory


class RewardConfig(Strict):
    """Scorers by role; each scores one task (checked against task.name in RunConfig)."""

    train: ScorerName = Field("sort_partial", description="reward the learner optimises (proxy)")
    gold: ScorerName = Field("sort_exact", description="evaluation-only reward (gold)")
    timeout_s: float = Field(30.0, gt=0)
    remote: RemoteRewardConfig | None = Field(
        None, description="when set, the train reward comes from this HTTP reward model instead of reward.train"
    )
    learned: LearnedRewardConfig | None = Field(
        None, description="when set, the train reward comes from this learned reward model instead of reward.train"
    )
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead reward actor (it holds no state); the batches it was "
                             "scoring are scored again"
    )
    max_failed_steps: int = Field(
        3, ge=1, description="learner steps in a row whose batch has no usable train reward: then the run writes a "
                             "checkpoint and stops (exit 1) naming the first reason, instead of training on nothing"
    )
    score_in_generator: bool = Field(
        True, description="a rule train reward (no reward.remote / reward.learned) is scored inside the generator's "
                          "call, with the reward actor's failure handling, instead of one more Ray round trip per "
                          "batch on the generator's critical path; false: every batch goes to the reward actor"
    )

    @model_validator(mode="after")
    def _one_train_source(self) -> "RewardConfig":
        if self.remote is not None and self.learned is not None:
            raise ValueError("reward.remote and reward.learned both replace the train reward; set only one "
                             "(serve the learned model with `async-rlhf serve-reward` to use it remotely)")
        return self

    @property
    def train_replaced(self) -> bool:
        """The train role is scored by a model (remote or learned), not by the reward.train rule."""
        return self.remote is not None or self.learned is not None

    @property
    def in_generator(self) -> bool:
        """Train rewards are scored inside the generators' calls (a rule, cheap and stateless)."""
        return self.score_in_generator and not self.train_replaced


class QueueConfig(Strict):
    max_staleness: int = Field(
        1, ge=0, description="N: train only on samples at most N versions old; 0 = synchronous"
    )
    capacity: int | None = Field(None, ge=1, description="groups; default (N+1) * prompts_per_step")
    staleness_mode: Literal["bound", "fixed"] = Field(
        "bound", description="bound: N is an upper bound, generators sample with the newest weights; fixed: the "
                             "prompts trained at step t are sampled with version max(0, t - N), so from step N on "
                             "every sample is exactly N versions old (the paper's off-policy setting; shm only)",
    )


class LossConfig(Strict):
    """The loss and its hyper-parameters; each loss's formula and options are in docs/losses.md."""

    name: str = Field("online_dpo", description="a registered loss; set from import_path when that is given")
    beta: float = Field(
        0.1, gt=0, description="KL-to-reference coefficient: DPO/IPO beta, RLOO's KL penalty, GRPO's k3 weight, PPO's per-token KL"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clip range of proximal_rloo, grpo and ppo")
    importance_sampling: Literal["none", "truncated"] = Field(
        "none", description="stale-sample correction: truncated = per-token min(pi/mu, is_cap) weight"
    )
    is_cap: float = Field(2.0, ge=1, description="truncation of the importance weight")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount of GAE over completion tokens")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE's lambda (0 = one-step TD, 1 = Monte Carlo return)")
    value_clip_eps: float = Field(
        0.2, gt=0, description="ppo: the value is clipped to old value +- this in the value loss"
    )
    value_lr: float | None = Field(
        None, gt=0, description="ppo: learning rate of the value model's own AdamW; default learner.lr"
    )
    ppo_epochs: int = Field(
        1, ge=1, le=16, description="ppo: optimizer steps on each batch (> 1 makes both clips bind)"
    )
    import_path: str | None = Field(
        None, description="'pkg.module:function' of your own loss; overrides name with what it registers"
    )

    @model_validator(mode="before")
    @classmethod
    def _import(cls, data: Any) -> Any:
        # Runs before `name` is checked, so that the user's loss is registered by then. import_path
        # overrides name (so `loss.import_path=...` works on top of a YAML that names a loss).
        if not isinstance(data, dict) or not data.get("import_path"):
            return data
        from learners.losses import load_import_path

        spec = load_import_path(str(data["import_path"]))  # LossImportError: one line, "loss.import_path: ..."
        return {**data, "name": spec.name}

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name in BUILTIN_LOSSES:  # no torch: the built-ins' declarations are a table (async_rlhf/config/loss_traits.py)
            return name
        from learners.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(f"loss.name: unknown loss '{name}'; valid names: {', '.join(sorted(LOSSES))}")
        return name

    @property
    def traits(self) -> LossTraits | LossSpec:
        """What the loss declares: a built-in's from the table, a loss.import_path one's from the registry
        (its module, imported by `_import`, has imported torch already)."""
        if self.name in BUILTIN_LOSSES:
            return BUILTIN_LOSSES[self.name]
        from learners.losses import LOSSES

        return LOSSES[self.name]

    @model_validator(mode="after")
    def _importance_sampling(self) -> "LossConfig":
        if self.importance_sampling != "none" and not self.traits.supports_importance_sampling:
            able = ", ".join(sorted(n for n, t in BUILTIN_LOSSES.items() if t.supports_importance_sampling))
            raise ValueError(
                f"loss.importance_sampling: loss '{self.name}' does not support '{self.importance_sampling}'; "
                f"set loss.importance_sampling=none or use one of: {able}"
            )
        if self.ppo_epochs > 1 and not self.traits.supports_epochs:
            able = ", ".join(sorted(n for n, t in BUILTIN_LOSSES.items() if t.supports_epochs))
            raise ValueError(
                f"loss.ppo_epochs: loss '{self.name}' takes one optimizer step per batch; "
                f"set loss.ppo_epochs=1 or use one of: {able}"
            )
        return self


class MCValuesConfig(Strict):
    """Monte Carlo value estimation on the generators, used when the loss declares `needs_mc_values`
    (vineppo; ignored otherwise). Formula and cost: docs/losses.md."""

    k_mc: int = Field(
        4, ge=1, le=64,
        description="continuations sampled from every unique state (prompt or step prefix); V = their mean reward",
    )


class LearnerConfig(Strict):
    steps: int = Field(200, ge=1, description="learner steps (policy versions) to train")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (3 shards the parameters too)")
    num_ranks: int = Field(
        1, ge=1, le=1024,
        description="R data-parallel learner processes (Ray actors in one torch.distributed group: nccl on GPU, "
                    "gloo on CPU), one GPU each on GPU; each rank trains on prompts_per_step / R groups",
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
        3, ge=1, description="consecutive steps with a non-finite loss (each skipped) before the run stops with a checkpoint"
    )
    max_restarts: int = Field(
        2, ge=0, description="a dead learner is replaced in the same process from the newest checkpoint this many "
                             "times (needs checkpoint.every); then the run stops with the --resume command"
    )


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
        300.0, gt=0, description="nccl: a rendezvous or broadcast that takes longer fails with an error (never a hang)"
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


class RayConfig(Strict):
    """Where the Ray cluster is: None starts a local one; 'auto' or 'HOST:6379' joins one started with
    `ray start` (README "On a GPU cluster")."""

    address: str | None = Field(None, description="None = a local Ray for this run; 'auto' = the node's cluster")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="GPU placement groups of the learner ranks and of each generator's TP workers"
    )


class ResourcesConfig(Strict):
    num_cpus: int | None = Field(None, ge=1)
    pin_cores: Literal["auto", "off"] = Field(
        "auto", description="auto: one core per role when async and enough cores; off: share all"
    )
    balance_cores: bool = Field(
        False, description="with pinned cores: while the learner is the bottleneck (busy well above the "
                           "generators) it trains on every core, and back on its own once the generators are; "
                           "off by default: on a loaded 2-core machine the two-thread learner was slower "
                           "(docs/benchmarks.md, 'Cores by load')"
    )


class ApiConfig(Strict):
    """HTTP status and control, served by the controller while a run is alive."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address; reads need the token too when not loopback")
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (printed and written to run_dir/api_url)")
    token: str | None = Field(
        None, min_length=16,
        description="bearer token for /control; default $ASYNC_RLHF_API_TOKEN, else generated into run_dir/api_token",
        json_schema_extra={"secret": True},  # written as *** (async_rlhf/config/redaction.py)
    )


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="gold evaluation every E steps; 0 = only at start and end")
    win_rate_judge: Literal["gold", "train"] = Field(
        "gold", description="reward that judges completion vs reference (prompts with a reference only)"
    )


class LoggingConfig(Strict):
    """Metric sinks besides the JSONL files (always written); the same metric names in each."""

    tensorboard: bool = Field(False, description="event files in run_dir/tensorboard (needs `tensorboard`)")
    wandb: bool = Field(False, description="Weights & Biases run in run_dir/wandb (needs `wandb`)")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline needs no network or account")
    wandb_project: str = "async-rlhf"

    @model_validator(mode="after")
    def _installed(self, info: ValidationInfo) -> "LoggingConfig":
        import importlib.util

        if not environment_checks(info):
            return self
        for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, key) and importlib.util.find_spec(package) is None:
                raise ValueError(f"logging.{key}: the '{package}' package is not installed; "
                                 f"run `make install` (or pip install {package}) or set logging.{key}=false")
        return self


class CheckpointConfig(Strict):
    """Checkpoints under run_dir/checkpoints (also written on SIGTERM, /control/checkpoint and a non-finite stop)."""

    every: int = Field(0, ge=0, description="write one every E learner steps; 0 = only when asked (see above)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept; older ones are deleted once a newer one is complete")


class RunConfig(Strict):
    seed: int = 0
    run_dir: Path | None = Field(None, description="default runs/<timestamp>")
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()
    queue: QueueConfig = QueueConfig()
    loss: LossConfig = LossConfig()
    mc_values: MCValuesConfig = MCValuesConfig()
    learner: LearnerConfig = LearnerConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    resources: ResourcesConfig = ResourcesConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    api: ApiConfig = ApiConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Fill in the task's own defaults (TASK_DEFAULTS) for every key the config leaves unset."""
        if not isinstance(data, dict):
            return data
        task = data.get("task")
        name = task.get("name") if isinstance(task, dict) else getattr(task, "name", None)
        defaults = TASK_DEFAULTS.get(name) if isinstance(name, str) else None  # a bad name: TaskConfig says so
        return merge_dicts(defaults, data) if defaults else data

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> "RunConfig":
        self._check_distributed()
        self._check_fixed_delay()
        self._check_truncated_sampling()
        self._check_shared_gpu()
        if environment_checks(info) and self.ray.address is None:
            self._check_cuda()

        need = self.loss.traits.min_samples_per_prompt
        if self.generation.samples_per_prompt < need:
            raise ValueError(
                f"generation.samples_per_prompt ({self.generation.samples_per_prompt}) must be >= {need} "
                f"for loss '{self.loss.name}'"
            )
        self._check_task_fit()
        if self.queue.capacity is not None and self.queue.capacity < self.generation.prompts_per_step:
            raise ValueError(
                f"queue.capacity ({self.queue.capacity}) must hold one step's "
                f"generation.prompts_per_step ({self.generation.prompts_per_step}) groups"
            )
        return self

    def _check_distributed(self) -> None:
        ranks, step = self.learner.num_ranks, self.generation.prompts_per_step
        if step % ranks:
            raise ValueError(f"generation.prompts_per_step ({step}) must be a multiple of learner.num_ranks "
                             f"({ranks}): every rank trains on the same number of prompt groups")

    def _check_fixed_delay(self) -> None:
        # An NCCL broadcast pushes each new version into the generators: no older version is left to sample with.
        transport = self.weight_sync.transport
        if self.queue.staleness_mode == "fixed" and transport in PUSHED_TRANSPORTS:
            raise ValueError(f"queue.staleness_mode=fixed samples with older versions, which weight_sync.transport="
                             f"{transport} does not keep (it pushes only the newest); use weight_sync.transport=shm")

    def _check_shared_gpu(self) -> None:
        if self.weight_sync.transport != "ipc":
            return
        gen, ranks = self.generation, self.learner.num_ranks
        if gen.num_generators > 1 or ranks > 1 or gen.tensor_parallel_size > 1:
            raise ValueError(f"weight_sync.transport=ipc shares one GPU between one generator and one learner rank "
                             f"(got generation.num_generators={gen.num_generators}, learner.num_ranks={ranks}, "
                             f"generation.tensor_parallel_size={gen.tensor_parallel_size}); use "
                             f"weight_sync.transport=nccl across GPUs or nodes")
        check_memory_split(gen.gpu_memory_utilization, self.learner.gpu_memory_fraction)

    def _check_truncated_sampling(self) -> None:
        """Ratios to a top-p-truncated behaviour policy: the learner sees the full softmax, so every
        ratio would be off by the kept mass (the generator drops top_p when greedy: no ratio then)."""
        ratios = self.loss.traits.needs_behaviour_logprobs or self.loss.importance_sampling != "none"
        if ratios and self.generation.top_p < 1 and self.generation.temperature > 0:
            raise ValueError(f"generation.top_p ({self.generation.top_p}) truncates the sampling distribution, "
                             f"which loss '{self.loss.name}' cannot take ratios to; set generation.top_p=1")

    def _check_cuda(self) -> None:
        """GPU-only settings on a machine with no GPU. Checked in the driver only for a local Ray
        (ray.address unset): on a cluster the GPUs are on the workers, which check at start."""
        if cuda_available():
            return
        if self.model.dtype == "bfloat16":
            raise ValueError("model.dtype: bfloat16 needs a GPU and none is visible; use model.dtype=float32 "
                             "(or auto) on CPU")
        if self.weight_sync.transport in PUSHED_TRANSPORTS:
            raise ValueError(f"weight_sync.transport: {self.weight_sync.transport} needs CUDA GPUs and none is "
                             f"visible; use weight_sync.transport=shm on CPU")
        if self.generation.tensor_parallel_size > 1:
            raise ValueError(f"generation.tensor_parallel_size ({self.generation.tensor_parallel_size}) needs "
                             f"CUDA GPUs and none is visible; use generation.tensor_parallel_size=1 on CPU")

    def _check_task_fit(self) -> None:
        """Scorers score this task; its prompts and answers fit the generation budget and model."""
        from reward_models.rules import NEEDS_REFERENCE, SCORER_TASK
        from async_rlhf.tasks.builtin import task_class

        task, gen = self.task.name, self.generation
        roles = ("gold",) if self.reward.train_replaced else ("train", "gold")
        for role in roles:
            scorer = getattr(self.reward, role)
            if SCORER_TASK[scorer] != task:
                valid = ", ".join(sorted(s for s, t in SCORER_TASK.items() if t == task))
                raise ValueError(
                    f"reward.{role}: scorer '{scorer}' does not score task '{task}'; valid for {task}: {valid}"
                )
            if scorer in NEEDS_REFERENCE and self.task.dataset is not None and self.task.dataset.reference_column is None:
                raise ValueError(f"reward.{role}: scorer '{scorer}' compares with a reference answer; "
                                 f"set task.dataset.reference_column")
        if task == "dataset" and self.model.source != "local":
            raise ValueError("task.name=dataset needs model.source=local and model.path (the embedded model knows "
                             "only its own tasks; `async-rlhf export-model DIR` writes it as a checkpoint)")
        prompt_len = self.task.max_prompt_tokens
        if prompt_len + gen.max_new_tokens > gen.max_model_len:
            raise ValueError(
                f"generation.max_model_len ({gen.max_model_len}) is shorter than the longest "
                f"prompt ({prompt_len}) + generation.max_new_tokens ({gen.max_new_tokens})"
            )
        if gen.max_new_tokens < self.task.max_answer_tokens:
            raise ValueError(
                f"generation.max_new_tokens ({gen.max_new_tokens}) is shorter than the longest correct answer "
                f"of task '{task}' ({self.task.max_answer_tokens} tokens with EOS)"
            )
        self._check_local_context()
        context = task_class(task).context_len
        if self.model.source == "embedded" and gen.max_model_len > context:
            raise ValueError(
                f"generation.max_model_len ({gen.max_model_len}) exceeds the embedded model's context for "
                f"task '{task}' ({context})"
            )

    def _check_local_context(self) -> None:
        """A local checkpoint's positions bound generation.max_model_len (vLLM would fail late, in a worker)."""
        if self.model.source != "local" or self.model.path is None:
            return
        import json

        try:
            positions = json.loads((self.model.path / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return  # transformers reports an unreadable config.json when the model loads
        if isinstance(positions, int) and self.generation.max_model_len > positions:
            raise ValueError(f"generation.max_model_len ({self.generation.max_model_len}) exceeds the "
                             f"max_position_embeddings ({positions}) of model.path '{self.model.path}'")

    @property
    def queue_capacity(self) -> int:
        return self.queue.capacity or (self.queue.max_staleness + 1) * self.generation.prompts_per_step


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent_loc = err["loc"][:-1]
        model: type[BaseModel] = RunConfig
        for part in parent_loc:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        valid = ", ".join(model.model_fields)
        where = ".".join(str(p) for p in parent_loc) or "the top level"
        return f"unknown key '{loc}'; valid keys at {where}: {valid}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # our validators write whole messages that name their keys
        return msg
    got = err.get("input")
    secret = "token" in loc  # never echo a credential into logs
    shown = "" if isinstance(got, dict) or got is None or secret else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


def validate_config(data: dict[str, Any], environment: bool = True) -> RunConfig:
    """`environment=False` checks the config alone (see config_base.environment_checks)."""
    try:
        return RunConfig.model_validate(data, context={"environment": environment})
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"config error: {first}{more}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, environment: bool = True) -> RunConfig:
    """Read a YAML file (or start from defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config error: config file '{file}' not found; pass a YAML file such as configs/quickstart.yaml")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error: '{file}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: '{file}' must hold a mapping of sections (task:, model:, ...), not {type(data).__name__}")
        data = readable_saved_config(data, RunConfig)  # a run's config.yaml has its secrets as ***
    return validate_config(merge_dicts(data, parse_overrides(overrides or [])), environment)


def dump_config(cfg: RunConfig, path: Path) -> None:
    """The resolved config, secrets written as *** (async_rlhf/config/redaction.py)."""
    path.write_text(config_yaml(cfg))


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(redacted(cfg), sort_keys=False)
