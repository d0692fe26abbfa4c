"""Checkpoint: durable run state and how a run continues from it.

Owns the checkpoint directory (`store`: atomic writes, validity, retention) and resume (`resume`: what a
checkpoint holds and how the loop's state, logs and weights go back to it, for `--resume` and for learner
failover). It may import `config`, `outputs`, `weights` and the pipeline's state types, roles and read-only view (a run is
saved and restored through the `resume.Resumable` protocol); never the controller.
"""
