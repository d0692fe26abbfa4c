"""The status document of a run, declared once: /status, /healthz, Prometheus, `async-rlhf status` and each
checkpoint's trainer_state.json all come from these models, built from a `RunView`."""
from __future__ import annotations

from pydantic import BaseModel

from async_rlhf.pipeline.state import RunPhase
from async_rlhf.pipeline.view import RunView

HEARTBEAT_STALE_S = 30.0  # the loop wakes at least every 0.2 s; 30 s of silence means it is stuck
LAST_KEYS = ("reward_mean", "kl", "loss", "staleness_mean", "gen_tokens_per_s")


class Component(BaseModel):
    ok: bool
    phase: str | None = None
    heartbeat_age_s: float | None = None
    version: int | None = None


class Health(BaseModel):
    ok: bool
    components: dict[str, Component]


class GeneratorInfo(BaseModel):
    generator_id: int
    version: int
    busy: bool
    in_flight: int  # chunks queued on it (generation.chunks_in_flight at most)
    busy_fraction: float
    tokens_per_s: float
    tokens: int
    restarts: int


class LearnerInfo(BaseModel):
    version: int
    busy: bool
    last_step_s: float | None
    mean_step_s: float | None
    busy_fraction: float
    restarts: int


class RewardInfo(BaseModel):
    ok: int
    failed: int
    timed_out: int
    restarts: int
    healthy: bool


class Status(BaseModel):
    run_id: str
    run_dir: str
    phase: str
    step: int
    total_steps: int
    elapsed_s: float
    eta_s: float | None
    max_staleness: int
    queue_depth: int
    generators: list[GeneratorInfo]
    learner: LearnerInfo
    reward_service: RewardInfo
    last: dict[str, float | None]


def generator_info(view: RunView) -> list[GeneratorInfo]:
    elapsed = view.elapsed_s
    return [GeneratorInfo(generator_id=g.generator_id, version=g.version, busy=g.busy, in_flight=g.in_flight,
                          busy_fraction=round(g.busy_s / elapsed, 4) if elapsed > 0 else 0.0,
                          tokens_per_s=round(g.tokens / g.busy_s, 1) if g.busy_s > 0 else 0.0,
                          tokens=g.tokens, restarts=g.restarts)
            for g in view.generators]


def learner_info(view: RunView) -> LearnerInfo:
    steps = view.steps_taken - view.learner_busy
    busy, elapsed = view.seconds("learn_busy_s"), view.elapsed_s
    return LearnerInfo(version=view.published_version, busy=view.learner_busy,
                       last_step_s=view.last_step.get("step_s"),
                       mean_step_s=round(busy / steps, 4) if steps > 0 else None,
                       busy_fraction=round(busy / elapsed, 4) if elapsed > 0 else 0.0,
                       restarts=view.learner_restarts)


def reward_info(view: RunView) -> RewardInfo:
    counts = view.reward_counts
    total, failed = sum(counts.values()), counts["failed"] + counts["timed_out"]
    return RewardInfo(**counts, restarts=view.reward_restarts, healthy=total == 0 or failed / total < 0.5)


def status_of(view: RunView) -> Status:
    done, elapsed = view.published_version, view.elapsed_s
    remaining = max(view.total_steps - done, 0)
    last = view.last_step
    return Status(run_id=view.run_dir.name, run_dir=str(view.run_dir), phase=view.phase.value, step=done,
                  total_steps=view.total_steps, elapsed_s=round(elapsed, 3),
                  eta_s=round(elapsed / done * remaining, 1) if done else None,
                  max_staleness=view.max_staleness, queue_depth=view.queue_depth, generators=generator_info(view),
                  learner=learner_info(view), reward_service=reward_info(view),
                  last={k: last.get(k) for k in LAST_KEYS})


def health_of(view: RunView) -> Health:
    age, phase = view.heartbeat_age_s, view.phase
    loop_ok = phase is not RunPhase.FAILED and (phase is not RunPhase.RUNNING or age < HEARTBEAT_STALE_S)
    alive = phase is not RunPhase.FAILED
    components = {
        "controller": Component(ok=loop_ok, phase=phase.value, heartbeat_age_s=round(age, 3)),
        "learner": Component(ok=alive, version=view.published_version),
        "reward_service": Component(ok=reward_info(view).healthy),
    }
    for g in view.generators:
        components[f"generator-{g.generator_id}"] = Component(ok=alive, version=g.version)
    return Health(ok=all(c.ok for c in components.values()), components=components)
