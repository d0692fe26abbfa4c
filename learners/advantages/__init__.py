"""Advantage estimators, pure maths: `gae` (GAE over per-token values, with KL-shaped token rewards,
whitening and PPO's clipped value loss; torch) and `monte_carlo` (VinePPO's Monte Carlo state values and
step advantages, and what a generator call samples for them; no torch). Nothing is imported here, so the
generator can use `monte_carlo` without torch's import cost. They may import `async_rlhf.rollout`; never
the pipeline (the controller's bookkeeping around them lives in async_rlhf/pipeline/vineppo.py).
"""
