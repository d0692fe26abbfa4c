"""How responses are sampled and queued: the `generation:`, `queue:` and `mc_values:` sections."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from async_rlhf.config.base import Strict

# vLLM raises a temperature in (0, 0.01) to 0.01 (numerical safety, vllm/sampling_params.py): the learner would
# take log-probs at the configured one and every ratio would compare two different distributions.
MIN_SAMPLING_TEMPERATURE = 0.01
SAMPLING_DEFAULTS = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}  # vLLM's: no change
TRUNCATING = ("top_p", "top_k", "min_p")  # nothing to truncate when sampling is greedy


class GenerationConfig(Strict):
    num_generators: int = Field(1, ge=1)
    prompts_per_step: int = Field(16, ge=1, description="prompts consumed by one learner step")
    samples_per_prompt: int = Field(4, ge=1, description="K completions per prompt")
    max_new_tokens: int = Field(12, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1, description="sample from the smallest set of tokens this likely")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens only; 0 = every token")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens less likely than this times the most likely one")
    repetition_penalty: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="above 1 discourages tokens already in the prompt or completion "
                                                    "(vLLM's); 1 = none")
    eval_temperature: float = Field(1.0, ge=0)
    stop: list[str] = Field(
        default_factory=list, max_length=16,
        description="strings that end a completion where they appear (e.g. '</answer>'), kept at its end as the "
                    "learner and the reward see it; vLLM then detokenizes every step, a little slower",
    )
    max_model_len: int = Field(64, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the generators' vLLM dtype; auto = model.dtype's (the learner's). bfloat16 on float32 weights "
                    "(CPU): vLLM samples in bf16, about 1.6x faster where the CPU has avx512_bf16, and converts each "
                    "published float32 version as it loads it; behaviour log-probs then differ from a float32 "
                    "learner's by ~1e-2 per token (logprob_gap). weight_sync.transport=shm only",
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="CPU KV cache budget; a model needs less when 256 sequences of max_model_len fit in "
                               "fewer bytes, and then gets only that (actors/generator.py cpu_kv_cache_bytes)",
    )
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a generator that died; then the run stops")
    hang_timeout_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="a generator that answers none of its chunks for this long (and 10x longer than any has ever "
                    "taken) is hung: killed, restarted by Ray, its prompts re-issued; so is the reward actor, its "
                    "batches generated again; default: half of learner.stall_timeout_s (300 s), which ends the run; "
                    "it must be below that",
    )
    chunks_in_flight: int = Field(
        2, ge=1, le=4,
        description="generate calls queued on each generator at once: with 2 the next chunk waits on the actor "
                    "while the previous one samples, so the engine does not idle for the controller's round trip; "
                    "1 = issue the next chunk only after the previous one came back (always 1 with the pushed "
                    "weight transports nccl and ipc). The generation gate still decides every chunk, so the "
                    "staleness bound holds either way",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per generator (vLLM tensor parallelism)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each generator GPU that vLLM may use (weights + KV cache)"
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str]) -> list[str]:
        if any(not text for text in stop):
            raise ValueError("generation.stop: an empty string would end every completion at once; give the text "
                             "that ends one, e.g. ['</answer>']")
        return stop

    def reshaping(self, temperature: float) -> dict[str, float]:
        """The settings besides the temperature that make the sampled distribution differ from the model's softmax
        at `temperature`: those set away from their defaults (the truncating ones only where sampling is not
        greedy: the generator drops them then)."""
        return {key: getattr(self, key) for key, default in SAMPLING_DEFAULTS.items()
                if getattr(self, key) != default and (temperature > 0 or key not in TRUNCATING)}

    def sampling_settings(self, temperature: float) -> dict[str, Any]:
        """vLLM's SamplingParams for them at `temperature`."""
        return {key: getattr(self, key) for key in SAMPLING_DEFAULTS if temperature > 0 or key not in TRUNCATING}

    @field_validator("temperature", "eval_temperature")
    @classmethod
    def _not_raised_by_vllm(cls, value: float, info: ValidationInfo) -> float:
        if 0 < value < MIN_SAMPLING_TEMPERATURE:
            floor = MIN_SAMPLING_TEMPERATURE
            raise ValueError(f"generation.{info.field_name} ({value:g}) is below {floor}, which vLLM would sample "
                             f"with instead; set 0 for greedy sampling or at least {floor}")
        return value

    @model_validator(mode="after")
    def _split(self) -> "GenerationConfig":
        if self.prompts_per_step % self.num_generators:
            raise ValueError(
                f"generation.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"generation.num_generators ({self.num_generators})"
            )
        return self


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


class MCValuesConfig(Strict):
    """Monte Carlo value estimation on the generators, used when the loss declares `needs_mc_values`
    (vineppo; ignored otherwise). Formula and cost: docs/losses.md."""

    k_mc: int = Field(
        4, ge=1, le=64,
        description="continuations sampled from every unique state (prompt or step prefix); V = their mean reward",
    )
