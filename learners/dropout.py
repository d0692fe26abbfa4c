"""Dropout off in the models the learner trains, as TRL does by default (`disable_dropout`).

The generator samples without dropout, so a policy forward with it (the learner trains in train mode) gives
log-probs that differ from the sampling ones at random: importance and PPO ratios, KL estimates and DPO
margins all carry that noise, at staleness 0 too. GPT-2 and OPT checkpoints ship 0.1 (mean |learner -
behaviour| log-prob 0.047 and 0.034 at staleness 0, against 1e-7 without it). Gradient checkpointing and the
rest of train mode stay on: only the rates go to 0.
"""
from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout rate the model's modules hold to 0: nn.Dropout modules, and the float rates attention
    and layer-drop code keeps as attributes (`attention_dropout`, `dropout`, `layerdrop`, `attn_pdrop`, ...).
    The model's config keeps its values, so a saved checkpoint is the user's. Returns the rates changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed
