"""async-rlhf core, one sub-package per role (docs/architecture.md has the tree and the import rules).

`config` (the YAML schema) sits at the bottom; `tasks` and `policies` (prompts and starting checkpoints),
`weights` (the weight path), `outputs` (logs, summary, plots) and `checkpoint` (store and resume) build on it;
`pipeline` (the loop) drives the workers in `actors/`, `learners/` and `reward_models/`; `api` (HTTP) and `cli`
sit on top. Two modules stay here because every role uses them: `rollout` (the data that flows from the
generators to the learner) and `failures` (the one-line errors a run ends with).
"""
