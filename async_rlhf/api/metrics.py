"""Prometheus exposition of a run, read through its RunView (the same figures as /status and /queue)."""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from async_rlhf.pipeline.status import generator_info, learner_info
from async_rlhf.pipeline.summary import LOGGED_PREFIX, PART_PREFIX
from async_rlhf.pipeline.view import RunView

PREFIX = "async_rlhf_"


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=float("nan") if value is None else value)


class RunCollector:
    """Reads the run's view at scrape time; registered on a registry private to one app."""

    def __init__(self, view: RunView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        v, q = self.view, self.view.queue_snapshot()
        learner, last = learner_info(v), v.last_step
        yield _gauge("learner_version", "Policy version published by the learner.", learner.version)
        yield _gauge("learner_last_step_seconds", "Duration of the last learner step.", learner.last_step_s)
        yield _gauge("learner_busy_fraction", "Share of loop time the learner spent training.", learner.busy_fraction)
        yield _gauge("paused", "1 while the run is paused.", float(v.paused))
        yield _gauge("queue_depth", "Rollout groups waiting for the learner.", q["depth"])
        yield _gauge("queue_capacity", "Rollout queue capacity in groups.", q["capacity"])
        yield _gauge("max_staleness", "Current staleness bound N.", q["max_staleness"])
        yield _gauge("oldest_sample_age_seconds", "Age of the oldest queued group.", q["oldest_age_s"])
        yield _gauge("reward_mean", "Mean proxy reward of the last training batch.", last.get("reward_mean"))
        yield _gauge("logprob_gap", "Mean |learner - behaviour| log-prob of the last step's tokens, before its update.",
                     last.get("logprob_gap"))
        yield _gauge("logprob_gap_fresh", "logprob_gap over the last step's staleness-0 samples (NaN: none).",
                     last.get("logprob_gap_fresh"))
        yield CounterMetricFamily(PREFIX + "groups_produced", "Rollout groups put in the queue.", value=q["produced"])
        yield CounterMetricFamily(PREFIX + "groups_consumed", "Rollout groups trained on.", value=q["consumed"])
        yield CounterMetricFamily(PREFIX + "groups_dropped_stale", "Groups dropped beyond max_staleness.",
                                  value=q["dropped_stale"])
        yield CounterMetricFamily(PREFIX + "completions_failed_reward", "Completions whose reward failed or timed out.",
                                  value=q["failed_reward"])
        yield CounterMetricFamily(PREFIX + "reward_restarts", "Restarts of the reward actor (its batches rescored).",
                                  value=v.reward_restarts)
        yield CounterMetricFamily(PREFIX + "learner_restarts", "Dead learners replaced from a checkpoint (steps since "
                                  "it trained again).", value=v.learner_restarts)
        yield CounterMetricFamily(PREFIX + "checkpoint_failures", "Checkpoints that could not be written (the run "
                                  "went on).", value=v.checkpoint_failures)
        yield from self._per_label(q)
        yield from self._reward_parts(last)
        if v.has_mc_values:
            yield from self._mc_cost()

    def _mc_cost(self) -> Iterator[Metric]:
        """VinePPO's Monte Carlo value estimation, apart from the responses (docs/losses.md)."""
        mc = self.view.mc_cost
        yield CounterMetricFamily(PREFIX + "mc_states", "Unique states whose value was estimated.", value=mc.states)
        yield CounterMetricFamily(PREFIX + "mc_rollouts", "MC continuations sampled.", value=mc.rollouts)
        yield CounterMetricFamily(PREFIX + "mc_tokens", "Tokens of MC continuations.", value=mc.tokens)
        yield CounterMetricFamily(PREFIX + "mc_generation_seconds", "Generator time sampling MC continuations.",
                                  value=mc.gen_s)
        yield CounterMetricFamily(PREFIX + "mc_failed_reward", "MC continuations whose reward failed or timed out.",
                                  value=mc.failed_reward)

    @staticmethod
    def _reward_parts(last: dict) -> Iterator[Metric]:
        """Each reward of a sum (reward.train as a list), as the last step's `reward_mean/NAME` gives it, and each
        value its functions logged (TRL's log_metric), as `reward_log/NAME` does."""
        for prefix, name, what, label in (
                (PART_PREFIX, "reward_part_mean", "Mean of one reward of the sum, before its weight", "reward"),
                (LOGGED_PREFIX, "reward_logged", "Mean of a value the train reward's functions logged", "name")):
            family = GaugeMetricFamily(PREFIX + name, f"{what}, over the last training batch.", labels=[label])
            for key, value in last.items():
                if key.startswith(prefix) and value is not None:
                    family.add_metric([key.removeprefix(prefix)], value)
            yield family

    def _per_label(self, q: dict) -> Iterator[Metric]:
        hist = CounterMetricFamily(PREFIX + "trained_groups_by_staleness", "Groups trained, by staleness.",
                                   labels=["staleness"])
        for staleness, count in q["staleness_histogram"].items():
            hist.add_metric([staleness], count)
        yield hist
        busy = GaugeMetricFamily(PREFIX + "generator_busy_fraction", "Share of loop time generating.",
                                 labels=["generator"])
        speed = GaugeMetricFamily(PREFIX + "generator_tokens_per_second", "Generated tokens per busy second.",
                                  labels=["generator"])
        version = GaugeMetricFamily(PREFIX + "generator_version", "Weights version of the last batch.",
                                    labels=["generator"])
        for g in generator_info(self.view):
            label = [str(g.generator_id)]
            busy.add_metric(label, g.busy_fraction)
            speed.add_metric(label, g.tokens_per_s)
            version.add_metric(label, g.version)
        yield from (busy, speed, version)


def prometheus_text(view: RunView) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(view))
    return generate_latest(registry).decode()
