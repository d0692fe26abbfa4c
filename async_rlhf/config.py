"""Run configuration: YAML + `key.sub=value` overrides, validated whole before any worker starts.

Errors are raised as `ConfigError` with one line that names the key, what was wrong and what
is accepted; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Strict):
    """The embedded task (async_rlhf/tasks.py): `sort` digits, or `arith` multi-step word problems.

    The digit knobs apply to sort only, the step and operand knobs to arith only.
    """

    name: Literal["sort", "arith"] = "sort"
    min_digits: int = Field(4, ge=1, le=32, description="sort: shortest digit string")
    max_digits: int = Field(7, ge=2, le=32, description="sort: longest digit string")
    min_steps: int = Field(2, ge=1, le=6, description="arith: fewest operations (solution lines) per problem")
    max_steps: int = Field(3, ge=1, le=6, description="arith: most operations per problem")
    min_operand: int = Field(1, ge=1, le=49, description="arith: smallest start value / operand")
    max_operand: int = Field(9, ge=1, le=49, description="arith: largest start value / operand (values stay <= 99)")
    eval_prompts: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "TaskConfig":
        for low, high in (("min_digits", "max_digits"), ("min_steps", "max_steps"), ("min_operand", "max_operand")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"task.{low} ({getattr(self, low)}) must be <= task.{high} ({getattr(self, high)})"
                )
        return self

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt of this task in tokens, BOS included."""
        from async_rlhf.tasks import task_class

        return task_class(self.name).max_prompt_tokens(self)

    @property
    def max_answer_tokens(self) -> int:
        """Longest correct completion of this task in tokens, EOS included."""
        from async_rlhf.tasks import task_class

        return task_class(self.name).max_answer_tokens(self)


# Defaults that differ by task, filled in (RunConfig._task_defaults) under every key the config
# leaves unset; the sort task uses the class defaults. The arith warm start needs a third layer
# (with a narrower MLP, to pay for it) and more, smaller updates to learn to copy operands and add
# within ~80 s on 2 cores; its prompts and worked solutions need a longer context.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arith": {
        "model": {"embedded": {
            "num_layers": 3, "intermediate_size": 256, "sft_batch_size": 32, "sft_steps": 700,
            "sft_correct_fraction": 0.5,
        }},
        "generation": {"max_new_tokens": 40, "max_model_len": 128},
        "reward": {"train": "arith_partial", "gold": "arith_exact"},
    },
}


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


class ModelConfig(Strict):
    source: Literal["embedded", "local"] = "embedded"
    path: Path | None = Field(None, description="HF checkpoint directory when source=local")
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    cache_dir: Path | None = Field(None, description="default: $XDG_CACHE_HOME/async-rlhf or ~/.cache/async-rlhf")

    @model_validator(mode="after")
    def _path(self) -> "ModelConfig":
        if self.source == "local":
            if self.path is None:
                raise ValueError("model.path is required when model.source=local (an HF checkpoint directory)")
            if not (self.path / "config.json").is_file():
                raise ValueError(f"model.path: no config.json in '{self.path}'; point it at an HF checkpoint directory")
        return self


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

    @model_validator(mode="after")
    def _split(self) -> "GenerationConfig":
        if self.prompts_per_step % self.num_generators:
            raise ValueError(
                f"generation.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"generation.num_generators ({self.num_generators})"
            )
        return self


ScorerName = Literal["sort_partial", "sort_exact", "arith_partial", "arith_exact"]  # reward_models/rules.py


class RemoteRewardConfig(Strict):
    """An HTTP reward model for the train role (protocol: docs/reward_protocol.md)."""

    url: str = Field(pattern=r"^https?://", description="base URL, e.g. http://127.0.0.1:8500")
    timeout_s: float = Field(10.0, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="on timeouts, connection errors, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first back-off; doubles per retry, with jitter")
    deadline_s: float = Field(60.0, gt=0, description="per batch, retries included; then failed / timed out")


class RewardConfig(Strict):
    """Scorers by role; each scores one task (checked against task.name in RunConfig)."""

    train: ScorerName = Field("sort_partial", description="reward the learner optimises (proxy)")
    gold: ScorerName = Field("sort_exact", description="evaluation-only reward (gold)")
    timeout_s: float = Field(30.0, gt=0)
    remote: RemoteRewardConfig | None = Field(
        None, description="when set, the train reward comes from this HTTP reward model instead of reward.train"
    )


class QueueConfig(Strict):
    max_staleness: int = Field(
        1, ge=0, description="N: train only on samples at most N versions old; 0 = synchronous"
    )
    capacity: int | None = Field(None, ge=1, description="groups; default (N+1) * prompts_per_step")


class LossConfig(Strict):
    """The loss and its hyper-parameters; each loss's formula and options are in docs/losses.md."""

    name: str = Field("online_dpo", description="a registered loss; set from import_path when that is given")
    beta: float = Field(
        0.1, gt=0, description="KL-to-reference coefficient: DPO/IPO beta, RLOO's KL penalty, GRPO's k3 weight"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clip range of proximal_rloo and grpo")
    importance_sampling: Literal["none", "truncated"] = Field(
        "none", description="stale-sample correction: truncated = per-token min(pi/mu, is_cap) weight"
    )
    is_cap: float = Field(2.0, ge=1, description="truncation of the importance weight")
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
        from learners.losses import LOSSES

        if name not in LOSSES:
            raise ValueError(f"loss.name: unknown loss '{name}'; valid names: {', '.join(sorted(LOSSES))}")
        return name

    @model_validator(mode="after")
    def _importance_sampling(self) -> "LossConfig":
        from learners.losses import LOSSES

        if self.importance_sampling != "none" and not LOSSES[self.name].supports_importance_sampling:
            able = ", ".join(sorted(n for n, spec in LOSSES.items() if spec.supports_importance_sampling))
            raise ValueError(
                f"loss.importance_sampling: loss '{self.name}' does not support '{self.importance_sampling}'; "
                f"set loss.importance_sampling=none or use one of: {able}"
            )
        return self


class LearnerConfig(Strict):
    steps: int = Field(200, ge=1, description="learner steps (policy versions) to train")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2] = 2
    stall_timeout_s: float = Field(
        600.0, gt=0, description="stop with an error when no learner step finishes for this long (never hang)"
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="consecutive steps with a non-finite loss (each skipped) before the run stops with a checkpoint"
    )


class WeightSyncConfig(Strict):
    transport: Literal["shm"] = Field("shm", description="shm: safetensors in shared memory (CPU)")
    shm_root: Path = Path("/dev/shm")
    keep_versions: int = Field(2, ge=1)


class ResourcesConfig(Strict):
    ray_address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    pin_cores: Literal["auto", "off"] = Field(
        "auto", description="auto: one core per role when async and enough cores; off: share all"
    )


class ApiConfig(Strict):
    """HTTP status and control, served by the controller while a run is alive."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address; reads need the token too when not loopback")
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (printed and written to run_dir/api_url)")
    token: str | None = Field(
        None, min_length=16,
        description="bearer token for /control; default $ASYNC_RLHF_API_TOKEN, else generated into run_dir/api_token",
    )


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="gold evaluation every E steps; 0 = only at start and end")


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
    learner: LearnerConfig = LearnerConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    resources: ResourcesConfig = ResourcesConfig()
    eval: EvalConfig = EvalConfig()
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
        return _merge(defaults, data) if defaults else data

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        from learners.losses import LOSSES

        need = LOSSES[self.loss.name].min_samples_per_prompt
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

    def _check_task_fit(self) -> None:
        """Scorers score this task; its prompts and answers fit the generation budget and model."""
        from reward_models.rules import SCORER_TASK
        from async_rlhf.tasks import task_class

        task, gen = self.task.name, self.generation
        roles = ("gold",) if getattr(self.reward, "remote", None) else ("train", "gold")  # remote replaces train
        for role in roles:
            scorer = getattr(self.reward, role)
            if SCORER_TASK[scorer] != task:
                valid = ", ".join(sorted(s for s, t in SCORER_TASK.items() if t == task))
                raise ValueError(
                    f"reward.{role}: scorer '{scorer}' does not score task '{task}'; valid for {task}: {valid}"
                )
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
        context = task_class(task).context_len
        if self.model.source == "embedded" and gen.max_model_len > context:
            raise ValueError(
                f"generation.max_model_len ({gen.max_model_len}) exceeds the embedded model's context for "
                f"task '{task}' ({context})"
            )

    @property
    def queue_capacity(self) -> int:
        return self.queue.capacity or (self.queue.max_staleness + 1) * self.generation.prompts_per_step


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"config error: override '{pair}' is not of the form key.sub=value (e.g. queue.max_staleness=0)")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: override '{pair}' conflicts with an earlier override of '{part}'")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent_loc, key = err["loc"][:-1], err["loc"][-1]
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


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"config error: {first}{more}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
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
    return validate_config(_merge(data, parse_overrides(overrides or [])))


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
