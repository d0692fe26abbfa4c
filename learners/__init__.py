"""The learner side of async-rlhf: losses (registry), advantage estimators and the DeepSpeed `Learner`.

Nothing is imported here on purpose: the config imports `learners.loss_traits` (the losses' declarations,
read without torch) and the generator imports `learners.advantages.monte_carlo`; neither may pull in torch
or DeepSpeed through this package. It may import `async_rlhf.config`, `async_rlhf.rollout` and
`async_rlhf.weights`; never `async_rlhf.pipeline` (two imports still do: `pin_process` in learner.py and
the placement helpers in group.py, which live in async_rlhf/pipeline/ today).
"""
