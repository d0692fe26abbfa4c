"""Config: the run's YAML schema, validated before any worker starts.

Owns the pydantic models of a run (`run.RunConfig` and its sections), the shared base model and its one-line
errors (`base`), the task section (`task`), secret redaction (`redaction`), the torch-free traits of the
built-in losses (`loss_traits`) and the GPU micro-batch sizing check (`gpu_sizing`). It may import
`async_rlhf.failures`, `async_rlhf.rollout` and the registries of `learners.losses` and `reward_models`; nothing
else in `async_rlhf` (every other package reads the config, so it sits at the bottom).
"""
