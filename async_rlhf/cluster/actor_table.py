"""Ray's actor table (the GCS's, no dashboard needed): an actor's state, process and worker without asking the
actor, which a stopped or hung one never answers. It is not public API: where it is not found, None, and the
callers do what they did before (ask the actor, or wait without saying why)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import ray

STARTING = frozenset({"DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING"})  # no process done with __init__


@dataclass(frozen=True)
class ActorRecord:
    state: str  # ALIVE, DEAD, or one of STARTING
    pid: int  # the process it runs in (0 before it has one)
    port: int  # its worker's port (0 before the cluster gave it a worker)
    restarts: int = 0  # how many times Ray has restarted it so far


def table() -> Callable[[str], dict] | None:
    """Ray's lookup of one actor's record by its id, or None in a Ray version without it."""
    lookup = getattr(getattr(getattr(ray, "_private", None), "state", None), "actors", None)
    return lookup if callable(lookup) else None


def record(lookup: Callable[[str], dict], handle: Any) -> ActorRecord | None:
    """The actor's record, or None (an actor gone from the table, or another Ray version's fields)."""
    try:
        row = lookup(handle._actor_id.hex())
        return ActorRecord(str(row["State"]), int(row.get("Pid") or 0), int(row["Address"]["Port"]),
                           int(row.get("NumRestarts") or 0))
    except Exception:  # the table's format is Ray's own business
        return None


def alive_pid(handle: Any) -> int:
    """The process Ray's actor table has the actor alive in; 0 where it is not alive (starting, restarting, dead),
    or where there is no table."""
    found = current(handle)
    return found.pid if found is not None and found.state == "ALIVE" else 0


def current(handle: Any) -> ActorRecord | None:
    """The actor's record now; None where there is no table (or no record)."""
    lookup = table()
    return record(lookup, handle) if lookup is not None else None


def stuck_restart(handle: Any, killed_pid: int, max_restarts: int) -> ActorRecord | None:
    """The actor's record where a restart that has not answered within its bound may be killed to start it once
    more: Ray's table has it in a worker process (starting, or alive and silent; until a worker is given, the
    table keeps the dead process's pid and no port) other than `killed_pid` (the last one killed so), not dead,
    with a restart left (`max_restarts`: the run's setting; the table does not hold it)."""
    found = current(handle)
    if found is None or not found.port or found.pid in (0, killed_pid) or found.state == "DEAD":
        return None
    return found if found.restarts < max_restarts else None


def kill_stuck_restart(handle: Any, killed_pid: int, max_restarts: int, silent: str) -> ActorRecord | None:
    """`stuck_restart`'s record, its process killed so that Ray starts the actor again, and said on one line that
    begins with `silent` (who, and how long it has not answered)."""
    found = stuck_restart(handle, killed_pid, max_restarts)
    if found is not None:
        print(f"[async-rlhf] {silent} into its restart (pid {found.pid}, {found.state.lower()}: stopped or hung); "
              "killing it so that Ray starts it again", file=sys.stderr, flush=True)
        ray.kill(handle, no_restart=False)
    return found
