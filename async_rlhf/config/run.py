"""Run configuration: YAML + `key.sub=value` overrides, validated whole before any worker starts.

Errors are raised as `ConfigError` with one line that names the key, what was wrong and what
is accepted; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, model_validator

from async_rlhf.config.base import ConfigError, Strict, environment_checks, load_yaml, merge_dicts, parse_overrides
from async_rlhf.config.generation import SAMPLING_DEFAULTS, GenerationConfig, MCValuesConfig, QueueConfig
from async_rlhf.config.learner import PUSHED_TRANSPORTS, LearnerConfig, WeightSyncConfig, check_memory_split
from async_rlhf.config.loss import LossConfig
from async_rlhf.config.model import ModelConfig, cuda_available
from async_rlhf.config.redaction import may_be_secret, readable_saved_config, redacted
from async_rlhf.config.reward import RewardConfig
from async_rlhf.config.runtime import (
    ApiConfig,
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    RayConfig,
    ResourcesConfig,
    check_ray_home,
    check_ray_temp_dir,
)
from async_rlhf.config.task import TASK_DEFAULTS, TaskConfig
from reward_models.rules import NEEDS_REFERENCE, SCORER_TASK

VALUE_MODEL_KEYS = ("gamma", "lam", "value_clip_eps", "value_lr")  # loss keys only a value model reads (ppo)


class RunConfig(Strict):
    seed: int = Field(0, ge=0, lt=2**32, description="one seed for every role (torch's takes at most 64 bits)")
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
        self._default_zero_stage()
        self._check_distributed()
        self._check_fixed_delay()
        self._check_generator_dtype()
        self._check_truncated_sampling()
        self._check_shared_gpu()
        self._check_hang_timeout()
        if environment_checks(info) and self.ray.address is None:
            self._check_cuda()
            check_ray_temp_dir(os.environ)
            check_ray_home(os.environ)

        need = self.loss.traits.min_samples_per_prompt
        if self.generation.samples_per_prompt < need:
            raise ValueError(
                f"generation.samples_per_prompt ({self.generation.samples_per_prompt}) must be >= {need} "
                f"for loss '{self.loss.name}'"
            )
        self._check_greedy()
        self._check_task_fit()
        if self.queue.capacity is not None and self.queue.capacity < self.generation.prompts_per_step:
            raise ValueError(
                f"queue.capacity ({self.queue.capacity}) must hold one step's "
                f"generation.prompts_per_step ({self.generation.prompts_per_step}) groups"
            )
        return self

    def _default_zero_stage(self) -> None:
        """learner.zero_stage unset: 0 for one rank on float32 weights (nothing to partition; ZeRO would only
        add copies), else its default 2."""
        if "zero_stage" not in self.learner.model_fields_set:
            single_fp32 = self.learner.num_ranks == 1 and self.model.torch_dtype == "float32"
            self.learner.zero_stage = 0 if single_fp32 else 2

    def _check_distributed(self) -> None:
        ranks, step = self.learner.num_ranks, self.generation.prompts_per_step
        if step % ranks:
            raise ValueError(f"generation.prompts_per_step ({step}) must be a multiple of learner.num_ranks "
                             f"({ranks}): every rank trains on the same number of prompt groups")

    def _check_hang_timeout(self) -> None:
        hang, stall = self.generation.hang_timeout_s, self.learner.stall_timeout_s
        if hang is not None and hang >= stall:
            raise ValueError(f"generation.hang_timeout_s ({hang:g}) must be below learner.stall_timeout_s ({stall:g}): "
                             f"the stall would end the run before a hung generator is restarted; lower it, or leave "
                             f"it unset (half of learner.stall_timeout_s)")

    def _check_fixed_delay(self) -> None:
        # An NCCL broadcast pushes each new version into the generators: no older version is left to sample with.
        transport = self.weight_sync.transport
        if self.queue.staleness_mode == "fixed" and transport in PUSHED_TRANSPORTS:
            raise ValueError(f"queue.staleness_mode=fixed samples with older versions, which weight_sync.transport="
                             f"{transport} does not keep (it pushes only the newest); use weight_sync.transport=shm")

    def _check_generator_dtype(self) -> None:
        # nccl and ipc write the learner's tensors straight into the engine's: no conversion on the way.
        transport, dtype = self.weight_sync.transport, self.generation.dtype
        if transport in PUSHED_TRANSPORTS and dtype != "auto" and dtype != self.model.torch_dtype:
            raise ValueError(f"generation.dtype={dtype} differs from the learner's model.dtype "
                             f"({self.model.torch_dtype}), which weight_sync.transport={transport} pushes as is; "
                             f"set generation.dtype=auto")

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
        """Ratios to a truncated or penalised behaviour policy (top_p, top_k, min_p, repetition_penalty): the
        learner sees the full softmax, so every ratio would be off by the kept mass or the penalty."""
        ratios = self.loss.traits.needs_behaviour_logprobs or self.loss.importance_sampling != "none"
        knobs = self.generation.reshaping(self.generation.temperature)
        if ratios and knobs:
            shown = ", ".join(f"generation.{key}={value:g}" for key, value in knobs.items())
            reset = ", ".join(f"generation.{key}={SAMPLING_DEFAULTS[key]:g}" for key in knobs)
            raise ValueError(f"{shown} reshape{'s' if len(knobs) == 1 else ''} the sampling distribution, which "
                             f"loss '{self.loss.name}' cannot take ratios to (the learner takes log-probs of the "
                             f"whole softmax); set {reset}")

    def _check_greedy(self) -> None:
        """Temperature 0 draws the same completion every time (vLLM refuses more than one per request): caught
        here, before the run starts, not in the first generate call."""
        gen, k_mc = self.generation, self.mc_values.k_mc if self.loss.traits.needs_mc_values else 1
        if gen.temperature > 0 or max(gen.samples_per_prompt, k_mc) == 1:
            return
        what = (f"the {gen.samples_per_prompt} samples of each prompt" if gen.samples_per_prompt > 1
                else f"the {k_mc} Monte Carlo continuations of each state (mc_values.k_mc)")
        raise ValueError(f"generation.temperature=0 is greedy sampling: {what} would all be the same; set "
                         f"generation.temperature > 0 (e.g. 1.0)")

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
        self._check_scorers()
        if self.task.name == "dataset" and self.model.source != "local":
            raise ValueError("task.name=dataset needs model.source=local and model.path (the embedded model knows "
                             "only its own tasks; `async-rlhf export-model DIR` writes it as a checkpoint)")
        self._check_lengths()
        self._check_local_context()
        self._check_embedded_context()

    def _check_scorers(self) -> None:
        for name in [] if self.reward.train_replaced else self.reward.train_names:
            self._check_scorer("train", name)
        self._check_scorer("gold", self.reward.gold)

    def _check_scorer(self, role: str, scorer: str) -> None:
        task, dataset = self.task.name, self.task.dataset
        if scorer not in SCORER_TASK:  # a user's own function: whichever task it was written for
            return
        if SCORER_TASK[scorer] != task:
            valid = ", ".join(sorted(s for s, t in SCORER_TASK.items() if t == task))
            raise ValueError(f"reward.{role}: scorer '{scorer}' does not score task '{task}'; "
                             f"valid for {task}: {valid}")
        if scorer in NEEDS_REFERENCE and dataset is not None and dataset.reference_column is None:
            raise ValueError(f"reward.{role}: scorer '{scorer}' compares with a reference answer; "
                             f"set task.dataset.reference_column")

    def _check_lengths(self) -> None:
        """The longest prompt and the longest correct answer fit the generation budget."""
        gen, prompt_len, answer_len = self.generation, self.task.max_prompt_tokens, self.task.max_answer_tokens
        if prompt_len + gen.max_new_tokens > gen.max_model_len:
            raise ValueError(f"generation.max_model_len ({gen.max_model_len}) is shorter than the longest "
                             f"prompt ({prompt_len}) + generation.max_new_tokens ({gen.max_new_tokens})")
        if gen.max_new_tokens < answer_len:
            raise ValueError(f"generation.max_new_tokens ({gen.max_new_tokens}) is shorter than the longest correct "
                             f"answer of task '{self.task.name}' ({answer_len} tokens with EOS)")

    def _check_embedded_context(self) -> None:
        context, max_len = self.task.shape.context_len, self.generation.max_model_len
        if self.model.source == "embedded" and max_len > context:
            raise ValueError(f"generation.max_model_len ({max_len}) exceeds the embedded model's context for "
                             f"task '{self.task.name}' ({context})")

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
    def generator_dtype(self) -> str:
        """The generators' vLLM dtype: generation.dtype, or the learner's (model.dtype) when auto. `auto` is passed
        on as is, and resolved by each generator where it runs (actors/generator.py resolve_dtype), as the learner
        resolves it in its own process: the driver may have no GPU where the workers have."""
        return self.model.dtype if self.generation.dtype == "auto" else self.generation.dtype

    def unused_settings(self) -> list[str]:
        """Keys this config sets that its loss never reads (a PPO config trained with loss.name=grpo keeps its GAE
        settings): said at the start, since a value without effect looks like one with it."""
        traits, loss_set = self.loss.traits, self.loss.model_fields_set
        unused = [f"loss.{key}" for key in VALUE_MODEL_KEYS if key in loss_set and not traits.needs_value_model]
        if not traits.needs_mc_values:
            unused += [f"mc_values.{key}" for key in sorted(self.mc_values.model_fields_set)]
        return unused

    @property
    def hang_timeout_s(self) -> float:
        """generation.hang_timeout_s, or half of learner.stall_timeout_s: a hung generator or reward actor is
        restarted well before the stall it causes would end the run."""
        return self.generation.hang_timeout_s or self.learner.stall_timeout_s / 2

    @property
    def chunk_prompts(self) -> int:
        """Prompts per training generate call (and per reward call): a generator's share of a step."""
        return self.generation.prompts_per_step // self.generation.num_generators

    @property
    def chunk_samples(self) -> int:
        """Samples per training generate call: its prompts, each sampled samples_per_prompt times."""
        return self.chunk_prompts * self.generation.samples_per_prompt

    def size_factor(self, samples: int) -> float:
        """How many training calls' worth of samples a call of `samples` is, at least 1: a hang timeout (and a
        stall timeout, for an evaluation awaited) is for a call of a training batch's size, a bigger evaluation's
        call gets that many times it (a 16384-prompt one was killed as hung under a 4 s stall timeout). In samples,
        not prompts: an evaluation samples each prompt once (counted in prompts, the quickstart's 128 were 8
        training calls, and a hung generator 0 was given 8x the timeout in a checkpoint's wait for them)."""
        return max(1.0, samples / self.chunk_samples)

    def step_factor(self, samples: int) -> float:
        """How many learner steps' worth of samples a learner call over `samples` is, at least 1: the stall timeout
        is for one step, an evaluation's KL pass over more samples gets that many times it (forward only, so this
        allows it more than it needs)."""
        return max(1.0, samples / (self.generation.prompts_per_step * self.generation.samples_per_prompt))

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
    return f"{loc}: {msg}{_shown(loc, err.get('input'))}"


def _shown(loc: str, got: Any) -> str:
    """The bad value, for the error line; never one that may hold a credential (a token, a URL, user:pass@)."""
    if got is None or isinstance(got, dict) or may_be_secret(loc, got):
        return ""
    return f" (got {got!r})"


def validate_config(data: dict[str, Any], environment: bool = True) -> RunConfig:
    """`environment=False` checks the config alone (see base.environment_checks)."""
    try:
        return RunConfig.model_validate(data, context={"environment": environment})
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(dict(errors[0]))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"config error: {first}{more}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, environment: bool = True) -> RunConfig:
    """Read a YAML file (or start from defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            what = "is a directory" if file.is_dir() else "not found"
            raise ConfigError(f"config error: config file '{file}' {what}; pass a YAML file such as "
                              "configs/quickstart.yaml")
        try:
            data = load_yaml(file.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"config error: cannot read '{file}': {reason}; pass a UTF-8 YAML file such as "
                              "configs/quickstart.yaml") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", exc)
            raise ConfigError(f"config error: '{file}' is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: '{file}' must hold a mapping of sections (task:, model:, ...), not "
                              f"{type(data).__name__}")
        data = readable_saved_config(without_empty_sections(data), RunConfig)  # a run's config.yaml: secrets as ***
    return validate_config(merge_dicts(data, parse_overrides(overrides or [])), environment)


def without_empty_sections(data: dict) -> dict:
    """A section written with nothing under it (`learner:` with its keys commented out, which YAML reads as null)
    is its defaults, as a section left out is."""
    sections = {name for name, field in RunConfig.model_fields.items() if isinstance(field.default, BaseModel)}
    return {key: value for key, value in data.items() if not (value is None and key in sections)}


def dump_config(cfg: RunConfig, path: Path) -> None:
    """The resolved config, secrets written as *** (async_rlhf/config/redaction.py)."""
    path.write_text(config_yaml(cfg))


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(redacted(cfg), sort_keys=False)
