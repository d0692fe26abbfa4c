"""CoreLending: the learner trains on the generators' cores too while they idle (resources.balance_cores).

A learner step is one or two long passes (SmolLM2: seconds each), so the learner cannot wait for a step's
end to give a core back: it asks the BusyBoard before every layer's forward and as each layer's gradient
arrives in backward, and moves when the answer changes. It widens only after the generators have idled
`idle_s` (a generator issues its next call within milliseconds of the last one while it is the busy side);
it narrows as soon as one samples, so a generator shares its core with at most one layer's work.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from async_rlhf.cluster.busy_board import BusyBoard
from async_rlhf.cluster.resources import pin_process


class CoreLending:
    def __init__(self, own: list[int], every: list[int], board: BusyBoard, idle_s: float = 0.05) -> None:
        self.own, self.every = own, every
        self.board = board
        self.idle_s = idle_s
        self.wide = False
        self.moves = 0
        self.wide_s = 0.0  # time trained on every core
        self._widened_at = 0.0

    def check(self) -> None:
        """Widen or narrow for the work that follows (cheap: one read of the board when nothing changes)."""
        wide = self.board.idle_for() >= self.idle_s
        if wide == self.wide:
            return
        cores = self.every if wide else self.own
        pin_process(cores, len(cores))
        now = time.perf_counter()
        if wide:
            self._widened_at = now
        else:
            self.wide_s += now - self._widened_at
        self.wide, self.moves = wide, self.moves + 1

    def watch(self, model: torch.nn.Module) -> None:
        """Check before each layer of every layer stack in `model` (forward) and when its gradient arrives."""
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for layer in module:
                    layer.register_forward_pre_hook(self._before_layer)
                    layer.register_forward_hook(self._after_layer)

    def _before_layer(self, _module: torch.nn.Module, _args: Any) -> None:
        self.check()

    def _after_layer(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(self._on_gradient)

    def _on_gradient(self, grad: torch.Tensor) -> None:
        self.check()

    def take_wide_s(self) -> float:
        """Seconds trained on every core since the last call (a step's share, for its record)."""
        now = time.perf_counter()
        if self.wide:
            self.wide_s += now - self._widened_at
            self._widened_at = now
        taken, self.wide_s = self.wide_s, 0.0
        return taken
