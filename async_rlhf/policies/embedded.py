"""The embedded default policy: a tiny Llama, built and warm-started locally (no downloads).

`ensure_policy` returns an HF checkpoint directory (safetensors + config + tokenizer) that both
transformers and vLLM load. The warm start is a short supervised run on the run's task in which
only `sft_correct_fraction` of the targets are correct and the rest carry plausible, systematic
mistakes (sort: adjacent swap, dropped or duplicated digit; arith: one step off by 1 or 2, the
error carried through the later steps), so the policy knows the format and is partly right but
leaves room for RL to improve the gold accuracy.

Each task has its own character vocabulary (`Task.chars`) and context length (`Task.context_len`);
the sort task's ids are those of the first release, so its cached checkpoints stay valid.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from async_rlhf.cluster.resources import usable_cores
from async_rlhf.config.base import ConfigError
from async_rlhf.config.model import EmbeddedModelConfig
from async_rlhf.config.pretrained_names import cache_root
from async_rlhf.config.run import RunConfig
from async_rlhf.config.task import TaskConfig
from async_rlhf.config.weights_files import damaged_weights
from async_rlhf.policies.quiet_transformers import quiet_transformers
from async_rlhf.tasks.builtin import SortTask, Task, corrupt, make_task, task_class  # noqa: F401 (corrupt: re-export)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# Bump whenever the recipe (data, corruption, optimiser, architecture choices) changes, so that
# old cached checkpoints are not reused for a different recipe.
RECIPE_VERSION = 1
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
VOCAB = [PAD, BOS, EOS, *SortTask.chars]  # the sort task's vocabulary: ids fixed since the first release
MAX_POSITIONS = SortTask.context_len  # the sort task's context
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # PAD, BOS, EOS lead every task's vocabulary (see vocabulary())
WARMUP_STEPS = 20

Log = Callable[[str], None]


def vocabulary(task_name: str = "sort") -> list[str]:
    """PAD, BOS, EOS, then one token per character of the task."""
    return [PAD, BOS, EOS, *task_class(task_name).chars]


def build_tokenizer(task_name: str = "sort") -> PreTrainedTokenizerFast:
    """Character-level tokenizer for a task: one token per character; encoding prepends BOS."""
    vocab = {tok: i for i, tok in enumerate(vocabulary(task_name))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    # BOS is added by the tokenizer itself so that `tokenizer(text)` equals the ids vLLM gets.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD,
        padding_side="left", model_max_length=task_class(task_name).context_len,
    )


def build_model(emb_cfg: EmbeddedModelConfig, vocab_size: int, max_positions: int = MAX_POSITIONS) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (uses torch's global RNG: seed before calling)."""
    # Here, not at the top: the modeling code costs the driver ~1.5 s of start-up, and a run whose policy is
    # already exported (every run after the first) never builds one.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=emb_cfg.hidden_size,
        intermediate_size=emb_cfg.intermediate_size,
        num_hidden_layers=emb_cfg.num_layers,
        num_attention_heads=emb_cfg.num_heads,
        num_key_value_heads=emb_cfg.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,  # vLLM's weight reload expects a separate lm_head
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        dtype="float32",  # vLLM on CPU then matches transformers' logprobs to ~1e-6
    )
    return LlamaForCausalLM(config)


def sft_example(task: Task, index: int, correct_fraction: float) -> tuple[list[int], int]:
    """Token ids of prompt + target + EOS, and the prompt length (loss starts after it)."""
    # The task's own sft stream (train split, never eval) so RL prompts are not a replay of the SFT data.
    prompt, target = task.sft_target(index, correct_fraction)
    target_ids = task.tokenizer.convert_tokens_to_ids(list(target)) + [EOS_ID]
    return prompt.token_ids + target_ids, len(prompt.token_ids)


def collate(examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad into (input_ids, attention_mask, labels); labels are -100 except on targets."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (seq, prompt_len) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
        mask[row, : len(seq)] = 1
    return ids, mask, labels


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup then cosine decay to 10% of the peak (short runs need both to be stable)."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(model: LlamaForCausalLM, task: Task, emb: EmbeddedModelConfig, log: Log) -> float:
    """Plain AdamW loop on completion tokens only; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=emb.sft_lr, weight_decay=0.0)
    model.train()
    tail: list[float] = []
    for step in range(emb.sft_steps):
        start = step * emb.sft_batch_size
        batch = [sft_example(task, start + i, emb.sft_correct_fraction) for i in range(emb.sft_batch_size)]
        ids, mask, labels = collate(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, emb.sft_steps, emb.sft_lr)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= emb.sft_steps * 0.9:
            tail.append(loss.item())
        if step % 100 == 0 or step == emb.sft_steps - 1:
            log(f"embedded SFT step {step}/{emb.sft_steps} loss {loss.item():.4f}")
    model.eval()
    return sum(tail) / len(tail) if tail else float("nan")


def recipe(emb: EmbeddedModelConfig, task_cfg: TaskConfig) -> dict:
    """Everything that determines the weights (eval_prompts does not, so it is left out)."""
    return {
        "recipe_version": RECIPE_VERSION,  # the task's own data version is in its recipe (tasks/builtin.py)
        "embedded": emb.model_dump(mode="json"),
        "task": task_class(task_cfg.name).recipe(task_cfg),
    }


def checkpoint_name(emb: EmbeddedModelConfig, task_cfg: TaskConfig) -> str:
    blob = json.dumps(recipe(emb, task_cfg), sort_keys=True).encode()
    return f"embedded-{hashlib.sha256(blob).hexdigest()[:16]}"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_checkpoint(out: Path, emb: EmbeddedModelConfig, task_cfg: TaskConfig, log: Log) -> None:
    """Build, warm-start and save the policy into `out` (an existing, empty directory)."""
    # SFT runs before any worker starts, so it may use every core; fork_rng seeds the init
    # without disturbing the caller's global torch RNG state.
    with torch_threads(len(usable_cores())), torch.random.fork_rng(devices=[]):
        torch.manual_seed(emb.seed)
        tokenizer = build_tokenizer(task_cfg.name)
        model = build_model(emb, len(tokenizer), task_class(task_cfg.name).context_len)
        task = make_task(task_cfg, tokenizer, seed=emb.seed)
        start = time.perf_counter()
        final_loss = train_sft(model, task, emb, log)
        seconds = time.perf_counter() - start
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {**recipe(emb, task_cfg), "sft_final_loss": final_loss, "sft_seconds": round(seconds, 2)}
    (out / "recipe.json").write_text(json.dumps(info, indent=2))
    log(f"embedded SFT done in {seconds:.1f}s, final loss {final_loss:.4f}")


def make_readable(directory: Path) -> None:
    """mkdtemp makes a 0700 dir: open it up so other users/containers sharing the cache can read."""
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)


def writable_temp_dir(models_dir: Path, prefix: str) -> Path:
    """A new directory in the model cache, or a ConfigError naming the cache and the setting that moves it."""
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=models_dir))
    except OSError as exc:
        raise ConfigError(f"config error: model.cache_dir: cannot write the embedded policy's cache in "
                          f"'{models_dir}' ({exc.strerror}); set model.cache_dir (or $XDG_CACHE_HOME) to a writable "
                          "directory") from None


def ensure_embedded_policy(
    emb: EmbeddedModelConfig, task_cfg: TaskConfig, cache_dir: Path | None = None, log: Log = print
) -> Path:
    """Return the cached checkpoint for this recipe, building it first if it is missing."""
    models_dir = Path(cache_dir or cache_root()) / "models"  # the prepared models' cache: one place for all
    final = models_dir / checkpoint_name(emb, task_cfg)
    if (final / "config.json").is_file():
        damaged = damaged_weights(final)
        if damaged is None:
            return final
        log(f"the cached embedded policy is damaged ({damaged}); building it again")
        shutil.rmtree(final, ignore_errors=True)
    log(f"building embedded policy {final.name} (one-off, cached in {models_dir})")
    # Build in a private temp dir and rename: readers never see a half-written checkpoint.
    tmp = writable_temp_dir(models_dir, f".tmp-{final.name}-")
    try:
        build_checkpoint(tmp, emb, task_cfg, log)
        make_readable(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # a concurrent builder did not win the race
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_policy(cfg: RunConfig, log: Log = print) -> Path:
    """The policy checkpoint directory for a run: model.path when local, else the embedded one."""
    if cfg.model.source == "local":
        if cfg.model.path is None:  # ModelConfig validation already rejects this
            raise ValueError("model.path is required when model.source=local")
        return cfg.model.path
    return ensure_embedded_policy(cfg.model.embedded, cfg.task, cfg.model.cache_dir, log)


def export_embedded(cfg: RunConfig, out: Path, log: Log = print) -> Path:
    """Copy the embedded policy of `cfg` (built first when not cached) to `out`, a new directory: an
    HF checkpoint with its tokenizer, for `model.source: local` (e.g. to train it on your own prompts)."""
    if cfg.model.source != "embedded":
        raise ConfigError("config error: export-model writes the embedded model; drop the model.source override")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config error: export-model: '{out}' is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"config error: export-model: '{out}' already exists and is not empty; "
                          "choose a new directory")
    source = ensure_embedded_policy(cfg.model.embedded, cfg.task, cfg.model.cache_dir, log)
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out
