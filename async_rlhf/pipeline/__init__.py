"""Pipeline: the asynchronous loop that turns prompts into learner steps.

Owns the controller and its event loop (`controller`) and the loop's roles, a class each: the workers'
start-up (`builder`), the generators (`generators`), reward calls (`rewards`), the learner's steps
(`learner_steps`), evaluations (`eval_schedule` over `evaluation`), the run-stopping checks (`watchdogs`) and
learner failover (`failover`). Also the run's shared state (`state`), its read-only view and the documents
built from it (`view`; `status` for the API, `summary` for summary.json), what a checkpoint holds and how a
run goes back to it (`resume`), the rollout queue and the generation gate (`queue`), control commands from
the API (`control`), start-up phases (`startup`), timings (`timing`), the clock that silences and deadlines
are judged by (`live_clock`) and VinePPO's Monte Carlo bookkeeping (`vineppo`). It drives the workers in
`actors/`, `learners/` and `reward_models/`, and may import every package below it (`config`, `cluster`,
`tasks`, `policies`, `weights`, `outputs`, `checkpoint`); never `api` or `cli`.
"""
