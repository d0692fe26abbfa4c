"""Cluster: where each role runs and on which cores.

Owns the placement of learner ranks and generators on a Ray cluster with GPUs (`placement`: bundles, the
checks of a started cluster against the transport) and the CPU core plan with pinning and load balancing
(`resources`). The controller and the workers (`actors/`, `learners/`) both use it, so it sits below them:
it may import `config` only.
"""
