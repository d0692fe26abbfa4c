"""R learner ranks behind one handle: what the controller calls is the same for 1 rank or many.

`start_learner` returns a plain Ray actor handle for learner.num_ranks=1 (unchanged behaviour), else a
`LearnerGroup`: R `Learner` actors in a placement group (one GPU each on a GPU cluster), forming one
torch.distributed world. `group.train_step.remote(groups)` hands rank r the groups r, r+R, ...;
every other method runs on all ranks with the same arguments (they are collectives under ZeRO or
write rank 0's files). Each call returns one ObjectRef that resolves when every rank is done and
fails if any rank failed.
"""
from __future__ import annotations

import math
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from async_rlhf.cluster.placement import in_bundle, learner_options, reserve, use_gpus
from async_rlhf.cluster.resources import CoreLoan
from async_rlhf.config.run import RunConfig
from learners.distributed import RankInfo, free_port
from learners.learner import Learner

SUMMED = ("train_tokens", "forward_tokens", "pairs", "samples", "groups")  # counts over each rank's share
SUMMED_PREFIXES = ("n_", "skipped_")
# Agreed: the same on every rank.
PER_RANK = ("version", "epochs", "nonfinite", "optimizer_step", "micro_batches", "nonfinite_micro_batches")


def merge_metrics(per_rank: list[dict]) -> dict:
    """One step's metrics from the ranks' shares: counts summed, per-rank keys from rank 0, measures
    (loss, kl, step time, ...) averaged over the ranks that have a finite value."""
    merged = dict(per_rank[0])
    for key, value in per_rank[0].items():
        if key in PER_RANK or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values = [m[key] for m in per_rank if key in m]
        if key in SUMMED or key.startswith(SUMMED_PREFIXES):
            merged[key] = sum(values)
        else:
            finite = [float(v) for v in values if math.isfinite(v)]
            merged[key] = sum(finite) / len(finite) if finite else math.nan
    if "step_s" in merged:  # the step took as long as its slowest rank
        merged["step_s"] = max(m["step_s"] for m in per_rank)
    return merged


class RankAnswers:
    """Joins the ranks' answers to one call into one ObjectRef, which resolves when every rank has answered
    (a failed rank fails it with its error). An actor, not a task per call: a task is run by a worker process
    leased for it, and Ray stops an idle one after a second when it holds more workers than CPUs, so the next
    call waited for a new one (11 of 99 publishes of a 2-rank CPU run took 1.2 s instead of 6 ms)."""

    def join(self, method: str, refs: list[Any]) -> Any:
        """Every rank's answer (`refs` come in a list so that Ray leaves them unresolved). Where ranks failed, a
        rank's death is raised before the others' errors: they fail on its collective, with gloo's "Connection reset
        by peer", which named the wrong rank and no death."""
        results, failures = [], []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                failures.append(exc)
        if failures:
            raise next((e for e in failures if isinstance(e, ray.exceptions.RayActorError)), failures[0])
        return merge_metrics(results) if method == "train_step" else results[0]


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Rank 0's node address and a free port there (run in rank 0's bundle, so on its node)."""
    host = ray.util.get_node_ip_address()
    return host, free_port(host)


class _FanOut:
    def __init__(self, group: "LearnerGroup", method: str) -> None:
        self.group, self.method = group, method

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        handles = self.group.handles
        if self.method == "train_step":
            groups = args[0]
            refs = [h.train_step.remote(groups[r::len(handles)]) for r, h in enumerate(handles)]
        else:
            refs = [getattr(h, self.method).remote(*args, **kwargs) for h in handles]
        return self.group.answers.join.remote(self.method, refs)


class LearnerGroup:
    """Quacks like a Learner actor handle: `group.<method>.remote(...)` -> one ObjectRef."""

    def __init__(self, handles: list[Any], pg: Any, answers: Any) -> None:
        self.handles, self.pg, self.answers = handles, pg, answers  # answers: a RankAnswers actor

    def __getattr__(self, method: str) -> _FanOut:
        if method.startswith("__") and method != "__ray_ready__":
            raise AttributeError(method)
        return _FanOut(self, method)

    def shutdown(self) -> None:
        for handle in [*self.handles, self.answers]:
            ray.kill(handle)
        remove_placement_group(self.pg)


def kill_learner(learner: Any) -> None:
    """Every process of a learner, not to be restarted: one actor, or each rank of a `LearnerGroup` (ray.kill takes
    actors only). Its calls in flight fail, which is how failover learns to replace it; the group's placement
    group stays until `shutdown`."""
    for handle in learner.handles if isinstance(learner, LearnerGroup) else [learner]:
        ray.kill(handle, no_restart=True)


def start_learner(cfg: RunConfig, model_dir: str, cores: list[int] | None, threads: int,
                  loan: CoreLoan | None = None) -> Any:
    """The learner the controller trains with: one actor (that may borrow the generators' cores), or a
    `LearnerGroup` of learner.num_ranks."""
    ranks, gpu = cfg.learner.num_ranks, use_gpus()
    if ranks == 1:
        return ray.remote(Learner).options(**learner_options(cfg)).remote(cfg, model_dir, cores, threads, None, loan)
    bundle: dict[str, float] = {"CPU": 1, **({"GPU": 1} if gpu else {})}
    pg = reserve([bundle] * ranks, cfg.ray.placement_strategy, cfg.learner.stall_timeout_s,
                 f"learner.num_ranks={ranks}")
    host, port = ray.get(_rendezvous_address.options(scheduling_strategy=in_bundle(pg, 0)).remote())
    per_rank = max(1, threads // ranks)  # ranks on one CPU machine share its learner cores
    handles = [
        ray.remote(Learner).options(num_cpus=1, num_gpus=int(gpu), max_concurrency=1,
                                    scheduling_strategy=in_bundle(pg, r)).remote(
            cfg, model_dir, cores, per_rank, RankInfo(r, ranks, host, port))
        for r in range(ranks)
    ]
    # Stateless, so restarted and its calls retried if its process dies; out of order (threaded), so a call
    # whose ranks answered first is not held behind one still training. Each call waiting on its ranks holds a
    # thread: room for every call the driver has out at once (a step's train and save, an evaluation's KL pass, a
    # probe of the learner's life), with some to spare.
    answers = ray.remote(RankAnswers).options(num_cpus=0, max_concurrency=16, max_restarts=-1, max_task_retries=-1,
                                              scheduling_strategy=in_bundle(pg, 0)).remote()
    return LearnerGroup(handles, pg, answers)
