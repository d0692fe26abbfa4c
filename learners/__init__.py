"""The learner side of async-rlhf: losses (registry) and the DeepSpeed `Learner`.

Nothing is imported here on purpose: `async_rlhf.config.run` imports `learners.losses` to validate
loss names, and that must not pull in DeepSpeed.
"""
