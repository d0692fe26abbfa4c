"""ACTOR_LOST: the errors of a call whose actor's process is gone, which the run recovers from alike.

Ray raises RayActorError (ActorDiedError, ActorUnavailableError) for an actor whose process died: SIGKILL, a crash,
its node lost. Its memory monitor, which kills the newest workers while the node's memory is above
RAY_memory_usage_threshold (0.95 by default), raises OutOfMemoryError instead, a RayError of another branch: so an
actor killed for want of memory ended the run with Ray's paragraph ("3 worker(s) were killed due to the node
running low on memory ..."), where one SIGKILLed was restarted and the run went on. Found by hand: another process
took 5 GiB for a few seconds beside a quickstart with the threshold at 25 %.
"""
from __future__ import annotations

import ray

ACTOR_LOST: tuple[type[Exception], ...] = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)

