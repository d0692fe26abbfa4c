"""`async-rlhf train-rm`: a scalar-head reward model from preference pairs, with TRL's RewardTrainer.

Pairs: a `save_to_disk` directory, a .jsonl or a .parquet file with text columns `prompt`, `chosen`,
`rejected` (prompt may be left out when chosen/rejected hold the whole text). The model scores
prompt + response + EOS, which is what reward_models/learned.py serves.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from async_rlhf.config.base import ConfigError

PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class RewardTrainingArgs:
    pairs: str
    base: Path  # a causal-LM or sequence-classification checkpoint (with tokenizer)
    out: Path
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 256
    eval_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None


def load_pairs(source: str) -> Any:
    """The pairs as a `datasets.Dataset`, checked: the columns are there, text, and there is data."""
    from async_rlhf.config.task import source_format
    from async_rlhf.tasks.sources import load_table

    fmt = source_format(source, "auto")
    if fmt not in ("jsonl", "parquet", "disk", "folder"):
        raise ConfigError(f"config error: train-rm: '{source}' is not a .jsonl file, a .parquet file, a "
                          f"save_to_disk directory or a folder of such files; convert the pairs to one of those")
    directory = fmt in ("disk", "folder")
    if not directory and not Path(source).is_file() or directory and not Path(source).is_dir():
        raise ConfigError(f"config error: train-rm: pairs '{source}' not found")
    table = load_table(source, fmt, "train", split_key="train-rm", name="train-rm", other="give train-rm other pairs")
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"config error: train-rm: '{source}' has no column(s) {', '.join(missing)} "
                          f"(columns: {', '.join(table.column_names)}); pairs need prompt, chosen, rejected")
    keep = [c for c in ("prompt", *PAIR_COLUMNS) if c in table.column_names]
    table = table.select_columns(keep).filter(lambda row: all(isinstance(row[c], str) and row[c] for c in PAIR_COLUMNS))
    if len(table) == 0:
        raise ConfigError(f"config error: train-rm: '{source}' holds no usable pair (chosen and rejected must be "
                          f"non-empty text)")
    return table


def _model_and_tokenizer(base: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A causal LM's body with a new scalar head (transformers initialises it; the LM head is dropped).
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def quiet_libraries(hf_logging: Any, accelerator: str) -> None:
    """The command's terminal holds its own lines and the trainer's: not transformers' progress bars (loading,
    "Writing model shards"), its load report of a causal LM read as a classifier (the LM head dropped, the score
    head new: expected), nor DeepSpeed's guess of the accelerator."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("DS_ACCELERATOR", accelerator)


def train_reward_model(args: RewardTrainingArgs, log: Callable[[str], None] = print) -> dict:
    """Train, save model + tokenizer to args.out, return the metrics (pair accuracy on held-out pairs)."""
    import torch
    from transformers.utils import logging as hf_logging

    quiet_libraries(hf_logging, "cuda" if torch.cuda.is_available() else "cpu")
    from trl import RewardConfig, RewardTrainer  # imports DeepSpeed, which reads DS_ACCELERATOR once

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = load_pairs(args.pairs)
    held_out = args.eval_fraction and len(pairs) >= 10
    split = pairs.train_test_split(test_size=args.eval_fraction, seed=args.seed) if held_out else None
    model, tokenizer = _model_and_tokenizer(args.base)
    config = RewardConfig(
        output_dir=str(args.out / "trainer"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, report_to=[], save_strategy="no", logging_steps=10,
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, dataloader_num_workers=0,
        eval_strategy="no", disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer,
                            train_dataset=split["train"] if split else pairs,
                            eval_dataset=split["test"] if split else None)
    start = time.perf_counter()
    trainer.train()
    metrics = {"pairs": len(pairs), "train_s": round(time.perf_counter() - start, 1)}
    if split:
        metrics.update({k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()})
        metrics["eval_pairs"] = len(split["test"])
    trained: Any = trainer.model  # the sequence-classification PreTrainedModel passed in above
    trained.config.architectures = [type(trained).__name__]
    trained.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    log(f"reward model saved to {args.out}: {metrics}")
    return metrics
