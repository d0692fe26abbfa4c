"""A learned reward model: an HF sequence-classification checkpoint with one scalar output
(`AutoModelForSequenceClassification`, num_labels=1), e.g. one written by `async-rlhf train-rm`.

The text scored is what TRL's RewardTrainer trained on: prompt + response + EOS, tokenized without
extra special tokens added by us (the prompt already carries the chat template). The score is the
head's output at the last non-padding token (transformers' rule for these models).
"""
from __future__ import annotations

from pathlib import Path

from async_rlhf.config.weights_files import check_weights
from async_rlhf.policies.quiet_transformers import quiet_transformers
from async_rlhf.rollout import Prompt


def check_reward_model_dir(key: str, path: Path) -> None:
    """Fail early (config time) on a directory that cannot be a scalar-head reward model."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{key}: no config.json in '{path}'; "
                         "point it at a reward model written by `async-rlhf train-rm`")
    data = json.loads(config.read_text())
    archs = data.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{key}: '{path}' holds {archs or 'an unknown architecture'}, not a sequence-classification "
                         f"reward model; train one with `async-rlhf train-rm`")
    if data.get("num_labels", len(data.get("id2label", {}) or {0: 0})) != 1:
        raise ValueError(f"{key}: '{path}' has {data.get('num_labels')} labels; "
                         "a reward model needs exactly 1 (a scalar)")
    check_weights(key, path, "copy it again or train it again with `async-rlhf train-rm`")


class LearnedRewardModel:
    """Scores (prompt, response) pairs in batches with a scalar-head HF model on CPU (or CUDA if there)."""

    def __init__(self, path: str | Path, batch_size: int = 16, max_length: int = 512,
                 threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.path, self.batch_size, self.max_length = Path(path), batch_size, max_length
        check_reward_model_dir("reward model", self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.truncation_side = "left"  # a long prompt loses its start; the response end is what is scored
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        with quiet_transformers():  # serve-reward's terminal
            model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
        self.model = model.to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, prompt: str, response: str) -> str:
        eos = self.tokenizer.eos_token or ""
        text = prompt + response
        return text if text.endswith(eos) else text + eos

    def score_texts(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """The server's BatchScorer signature."""
        return self.score_texts([p.text for p in prompts], responses)
