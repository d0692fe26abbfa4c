"""async-rlhf core, one sub-package per role (docs/architecture.md has the tree and the import rules).

`config` (the YAML schema) sits at the bottom; `cluster` (placement, cores), `tasks` and `policies` (prompts
and starting checkpoints), `weights` (the weight path), `outputs` (logs, sinks, plots) and `checkpoint` (the
store) build on it; the workers in `actors/`, `learners/` and `reward_models/` use those; `pipeline` (the loop)
drives the workers; `api` (HTTP) and `cli` sit on top. Two modules stay here because every role uses them:
`rollout` (the data that flows from the generators to the learner) and `failures` (the one-line errors a run
ends with).
"""
