"""TRL's `OnlineDPOTrainer` on a run config's task, policy, train reward and hyperparameters: the other arm
of `async-rlhf bench vs_trl` (bench/vs_trl.py), which runs it as its own process:

    python -m bench.trl_online_dpo CONFIG --policy DIR --out DIR [key=value ...]

Same as `async-rlhf train CONFIG key=value ...`: the policy weights (DIR), the train prompts in the order
our generators take them (`task.prompt(0)`, `task.prompt(1)`, ...; a sequential sampler, P per step), the
train scorer as TRL reward function, lr, beta, steps, prompts per step, 2 samples, max new tokens,
temperature and top-p, AdamW without weight decay at a constant lr, the same gradient clipping. TRL
tokenizes prompts without special tokens, so each prompt is given as the decoded text of our token ids,
special tokens (BOS, chat template) included; the script checks that TRL's tokenization gives back the
same ids. TRL samples with HF `generate` (no vLLM: that is TRL's CPU path).

A callback writes the clock: the time training began (version 0), the end of every step, and at each of
the run's evaluation points (every `eval.every` steps and the last) a snapshot of the weights, which
bench/vs_trl.py scores afterwards with the same evaluator as our run. Times are seconds since this
process started (async_rlhf.pipeline.timing.process_started_at), like `wall_s` in our eval.jsonl; the snapshot
writes are timed so that they can be taken out, as our run's evaluations are. Writes OUT/clock.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from async_rlhf.cli.arguments import positive_int
from async_rlhf.config.run import RunConfig, load_config
from async_rlhf.pipeline.timing import process_started_at
from async_rlhf.policies.quiet_transformers import quiet_transformers
from async_rlhf.rollout import Prompt
from async_rlhf.tasks.builtin import Task, load_task
from reward_models.user_scorer import as_batch, resolve_scorer

TRL_SAMPLES = 2  # OnlineDPOTrainer always samples two completions per prompt


def eval_points(steps: int, every: int) -> set[int]:
    """The steps our controller evaluates after: every `every` (0 = none) and the last."""
    return {s for s in range(1, steps + 1) if every and s % every == 0} | {steps}


class ClockCallback(TrainerCallback):
    """Seconds since the process started at train begin, at each step's end, and at the evaluation points,
    where it saves the weights for the evaluator (timed: bench/vs_trl.py takes the saves out)."""

    def __init__(self, out: Path, points: set[int], episodes_per_step: int) -> None:
        self.out, self.points, self.per_step = out, points, episodes_per_step
        self.start = process_started_at()
        self.clock: dict[str, Any] = {"step_end_s": [], "points": [], "save_s": 0.0}

    def now(self) -> float:
        return round(time.time() - self.start, 3)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock["train_begin_s"] = self.now()
        self.clock["points"].append({"version": 0, "wall_s": self.now(), "episodes": 0, "save_s_before": 0.0})

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        self.clock["step_end_s"].append(self.now())
        if step in self.points:
            self._snapshot(step, model)

    def _snapshot(self, step: int, model: Any) -> None:
        wall, saved_before = self.now(), self.clock["save_s"]
        path = self.out / f"step-{step}"
        started = time.perf_counter()
        with quiet_transformers():
            model.save_pretrained(path)
        self.clock["save_s"] = round(saved_before + time.perf_counter() - started, 3)
        self.clock["points"].append({"version": step, "wall_s": wall, "episodes": step * self.per_step,
                                     "save_s_before": saved_before, "snapshot": str(path)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock["train_end_s"] = self.now()


def prompt_rows(task: Task, tokenizer: Any, count: int) -> tuple[list[str], list[Prompt]]:
    """The first `count` train prompts, as text whose tokenization without special tokens is our token ids."""
    prompts = [task.train_prompt(i) for i in range(count)]
    texts = [tokenizer.decode(p.token_ids) for p in prompts]
    retokenized = tokenizer(texts, add_special_tokens=False)["input_ids"]
    differ = [p.prompt_id for p, ids in zip(prompts, retokenized) if list(ids) != list(p.token_ids)]
    if differ:  # otherwise TRL would train on other prompts than ours
        raise ValueError(f"{len(differ)} prompts do not survive decode + re-tokenization, e.g. ids {differ[:5]}")
    return texts, prompts


def reward_function(cfg: RunConfig, prompts: list[Prompt]) -> Callable[..., list[float | None]]:
    """The run's train scorer as a TRL reward function; `prompt_index` (a dataset column) finds our Prompt."""
    scorer = as_batch(resolve_scorer(cfg.reward.train_scorer, "reward.train"))

    # TRL's reward-function type: list[float | None] (None would mean "no reward"; ours always has one).
    def train_reward(completions: list[str], prompt_index: list[int], **_: Any) -> list[float | None]:
        return [float(v) for v in scorer([prompts[i] for i in prompt_index], completions)]

    train_reward.__name__ = "+".join(cfg.reward.train_names)  # TRL logs rewards under the function's name
    return train_reward


def trl_args(cfg: RunConfig, out: Path) -> OnlineDPOConfig:
    gen, learner = cfg.generation, cfg.learner
    return OnlineDPOConfig(
        output_dir=str(out), max_steps=learner.steps, per_device_train_batch_size=gen.prompts_per_step,
        gradient_accumulation_steps=1, learning_rate=learner.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=learner.weight_decay, max_grad_norm=learner.grad_clip, beta=[cfg.loss.beta],
        loss_type="sigmoid", max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        top_k=0, use_cpu=True, bf16=learner.autocast == "bfloat16",  # our learner.autocast is TRL's CPU bf16 autocast
        fp16=False, gradient_checkpointing=learner.gradient_checkpointing,
        train_sampling_strategy="sequential", seed=cfg.seed, logging_steps=max(1, learner.steps // 10),
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )


def train(cfg: RunConfig, policy: Path, out: Path) -> dict:
    from datasets import Dataset  # after transformers: the import order TRL itself uses

    tokenizer = AutoTokenizer.from_pretrained(policy)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, cfg.model.torch_dtype))
    count = cfg.learner.steps * cfg.generation.prompts_per_step
    texts, prompts = prompt_rows(load_task(cfg, policy), tokenizer, count)
    data = Dataset.from_dict({"prompt": texts, "prompt_index": list(range(count))})
    clock = ClockCallback(out, eval_points(cfg.learner.steps, cfg.eval.every),
                          cfg.generation.prompts_per_step * TRL_SAMPLES)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward_function(cfg, prompts), args=trl_args(cfg, out),
                               train_dataset=data, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return {**clock.clock, "log": trainer.state.log_history, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value, as for async-rlhf train")
    parser.add_argument("--policy", type=Path, required=True, help="the policy checkpoint both arms start from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    result = train(cfg, args.policy, args.out)
    (args.out / "clock.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
