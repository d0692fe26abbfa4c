"""Pipeline: the asynchronous loop that turns prompts into learner steps.

Owns the controller and its event loop (`controller`), the rollout queue and the generation gate (`queue`),
control commands from the API (`control`), generator placement and core plans (`placement`, `resources`),
start-up phases (`startup`), gold evaluation (`evaluation`), learner failover (`failover`), timings (`timing`)
and VinePPO's Monte Carlo bookkeeping (`vineppo`). It drives the workers in `actors/`, `learners/` and
`reward_models/`, and may import every package below it (`config`, `tasks`, `policies`, `weights`, `outputs`,
`checkpoint`); never `api` or `cli`.
"""
