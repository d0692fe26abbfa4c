"""Config: the run's YAML schema, validated before any worker starts.

Owns the pydantic models of a run: the root `RunConfig` and how a config is read, validated and written
(`run`), and its sections by role: `task` (prompt source, per-task defaults), `model`, `generation` (also
`queue:` and `mc_values:`), `reward`, `loss`, `learner` (also `weight_sync:`) and `runtime` (`ray:`,
`resources:`, `api:`, `eval:`, `logging:`, `checkpoint:`). Besides: the shared base model and its one-line
errors (`base`), the static side of each task, i.e. the task-name registry and the size bounds the config
checks (`task_shapes`), the registered pretrained model names (`pretrained_names`), secret redaction
(`redaction`) and the GPU micro-batch sizing check (`gpu_sizing`). It may import `async_rlhf.failures`,
`async_rlhf.rollout`, `async_rlhf.user_code` (a user's "pkg.module:function") and the torch-free registries of
`learners` (`learners.loss_traits`) and `reward_models` (`rules`, `user_scorer`);
nothing else in `async_rlhf` (every other package reads the config, so it sits at the bottom).
"""
