"""What TRL gives a reward function besides the batch's data: `trainer_state`, `log_metric` and `log_extra`.

GRPOTrainer passes every reward function `trainer_state` (transformers' TrainerState: a curriculum reads
`global_step`, `max_steps` or `epoch`), `log_metric(name, value)` (a scalar per batch, averaged per logging step)
and `log_extra(column, values)` (columns of its completions table). Here:
- `trainer_state` is a `RunState` with TrainerState's fields that describe progress: `global_step` is the policy
  version that sampled the batch (the learner steps its weights had taken), `max_steps` is `learner.steps`, and
  `epoch` the train prompts those steps consumed, in passes over a dataset (0 for an embedded task's stream);
- `log_metric` values are averaged over the batch's calls and reach metrics.jsonl, per learner step, as
  `reward_log/<name>` (scoring evaluations: not kept);
- `log_extra` is taken, and its columns are not kept: a run writes no completions table.
A RunState is built without transformers (importing its TrainerState costs a scoring thread ~1.4 s).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TRL_CONTEXT = ("trainer_state", "log_metric", "log_extra")  # TRL's keyword arguments beyond the batch's data


class ScoringRun(NamedTuple):
    """What a scorer is told of the run it scores for (the driver's config and task)."""

    max_steps: int = 0  # learner.steps
    prompts_per_step: int = 0
    epoch_prompts: int = 0  # train prompts in one pass over a dataset; 0: a stream without passes


NO_RUN = ScoringRun()  # a scorer outside a run (the reward server, sample-pairs): step 0 of nothing


@dataclass
class RunState:
    """The fields of transformers' TrainerState that a reward function reads for the run's progress."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_train_epochs: int = 0
    train_batch_size: int | None = None
    log_history: list[dict[str, float]] = field(default_factory=list)
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True


class ScoringCall:
    """One scoring of a batch: the run's state at the weights that sampled it, and what its functions logged."""

    def __init__(self, run: ScoringRun, version: int) -> None:
        epoch = version * run.prompts_per_step / run.epoch_prompts if run.epoch_prompts else 0.0
        self.state = RunState(global_step=version, max_steps=run.max_steps, epoch=epoch,
                              num_train_epochs=math.ceil(run.max_steps * run.prompts_per_step / run.epoch_prompts)
                              if run.epoch_prompts else 0, train_batch_size=run.prompts_per_step or None)
        self.logged: dict[str, list[float]] = {}
        self.lock = threading.Lock()  # a function past the batch's deadline may log while the caller reads

    def log_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric`: a scalar for this batch; one that is not a finite number is not kept."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(number):
            with self.lock:
                self.logged.setdefault(str(name), []).append(number)

    def log_extra(self, column: str, values: list[Any]) -> None:
        """TRL's `log_extra`: taken, not kept (a run writes no completions table)."""

    def arguments(self) -> dict[str, Any]:
        return {"trainer_state": self.state, "log_metric": self.log_metric, "log_extra": self.log_extra}

    def means(self) -> dict[str, float]:
        """Each logged metric's mean over this batch's calls."""
        with self.lock:
            return {name: sum(values) / len(values) for name, values in self.logged.items()}
