"""The value model of losses that declare `needs_value_model` (ppo): network, optimizer, checkpoint files.

Built by the learner only for such losses. The network is the policy's initial transformer (no LM
head) with a fresh scalar head, so it starts from the policy's features and predicts V = 0
everywhere (zero-initialised head: the first advantages are plain discounted rewards, not noise).

Why a separate network with its own AdamW instead of a second head on the policy or a param group
in the policy's DeepSpeed optimizer:
  * the published policy weights stay exactly the HF model that vLLM loads (no extra tensors);
  * the value loss cannot pull the policy's features (a shared trunk trades one off against the
    other and needs a tuned vf_coef), and the policy's gradient clipping is not eaten by the
    value loss's large early gradients: each network is clipped on its own;
  * AdamW normalises each parameter's step, so with disjoint parameters a vf_coef would cancel
    out: the value model's step size is `loss.value_lr` instead.
The optimizer is plain torch; with R learner ranks, `step` averages the gradients over the ranks
first (as DDP would), so every rank applies the same update and the copies stay identical.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from learners.distributed import average_gradients
from learners.logprobs import PackedBatch, completion_positions

if TYPE_CHECKING:  # transformers is slow to import: only its types are needed here
    from transformers import PreTrainedModel

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class ValueModel(torch.nn.Module):
    """Transformer trunk + linear head: V(s) for every position of a right-padded batch."""

    def __init__(self, trunk: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: PreTrainedModel) -> ValueModel:
        """Take the trunk of an HF causal LM (its `base_model`: the LM without its head)."""
        return cls(lm.base_model, int(lm.config.hidden_size))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.float()).squeeze(-1)  # [B, T]


class ValueTrainer:
    """Owns the value model and its optimizer: per-token values, one step, save / load."""

    def __init__(self, model: ValueModel, lr: float, weight_decay: float, grad_clip: float, fused: bool) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
        self.grad_clip = grad_clip
        self.steps = 0

    def values(self, batch: PackedBatch) -> torch.Tensor:
        """[B, C] V(prompt, y_<j) for each completion token j, 0 at padding; grad flows if enabled."""
        self.model.train()
        out = self.model(batch.input_ids, batch.attention_mask)
        picked = out.gather(1, completion_positions(batch, out.device)).float()  # bfloat16 under learner.autocast
        return picked * batch.completion_mask.to(out.device)

    def step(self) -> float:
        """Clip (learner.grad_clip; 0 = off) and apply the gradients the loss's backward left; the grad norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        average_gradients(params)  # R learner ranks: the same update on every rank, as DeepSpeed does
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.zero_grad()
        self.steps += 1
        return float(norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str | Path) -> None:
        """`path/model.safetensors` (trunk + head) and `path/optimizer.pt` (AdamW state): what resume needs."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / (WEIGHTS_FILE + ".partial")), metadata={"format": "pt", "steps": str(self.steps)})
        os.replace(out / (WEIGHTS_FILE + ".partial"), out / WEIGHTS_FILE)
        torch.save(self.optimizer.state_dict(), out / OPTIMIZER_FILE)

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote (same architecture); strict: a missing or extra tensor is an error."""
        src = Path(path)
        device = next(self.model.parameters()).device
        self.model.load_state_dict(load_file(str(src / WEIGHTS_FILE), device=str(device)), strict=True)
        self.optimizer.load_state_dict(torch.load(src / OPTIMIZER_FILE, map_location=device, weights_only=True))
        with safe_open(str(src / WEIGHTS_FILE), framework="pt") as handle:
            self.steps = int((handle.metadata() or {}).get("steps", 0))
