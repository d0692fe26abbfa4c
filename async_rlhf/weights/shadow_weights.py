"""ShadowWeights: the next version made ready beside sampling, put in place between two chunks.

A load on the generator's path (`InPlaceReload.load`: vLLM's name mapping, then a oneDNN re-pack per linear
layer) took 7 ms of every 80 ms chunk on the quickstart, all of it while the engine stood idle. Here the next
version is copied and packed on a thread while the engine samples with the current one, into places the
sampling forward does not read:
- a packed linear layer's plain weight (its forward calls `cpu_linear`, a closure over its own packed copy);
- a shadow tensor for every parameter read in place (norms, embeddings, biases, a kept lm-head weight);
and `swap` then sets each layer's new `cpu_linear` and exchanges the shadows' storage with the live parameters'
(a pointer per tensor), between two generate calls.

Where each checkpoint tensor lands (vLLM stacks q/k/v and gate/up into one parameter) is taken from vLLM's own
loader once (`WeightMap.record`): each tensor is loaded as a constant tag and found again, then a random
version loaded both ways must agree exactly. A model whose loader does more than place tensors (permute,
scale, split along another dimension) gets no map and loads as before.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

TAGS_PER_PASS = 250  # distinct integers a bfloat16 holds exactly (8 bits of mantissa: up to 256)
Loader = Callable[[Iterable[tuple[str, torch.Tensor]]], None]


@dataclass(frozen=True)
class Placement:
    """Checkpoint tensor `name` is elements [start, start + numel) of `param`, flattened, in order."""

    name: str
    param: torch.nn.Parameter
    start: int


class WeightMap:
    def __init__(self, placements: list[Placement]) -> None:
        self.placements = placements
        # Each placement's window into its target, per set of target storages (a shadow alternates between two):
        # made once, so a `place` is one torch call, not four per tensor (each a hand-off of the GIL that the
        # sampling thread waits on).
        self.windows: dict[tuple[int, ...], list[torch.Tensor]] = {}

    @classmethod
    @torch.no_grad()
    def record(cls, params: list[torch.nn.Parameter], load: Loader,
               tensors: dict[str, torch.Tensor]) -> WeightMap | None:
        """Where `load` (vLLM's `load_weights`) puts each of `tensors`, or None where it does anything else.
        `params` are left as they were (one copy of them is held meanwhile; probes are made one at a time)."""
        saved = [p.detach().clone() for p in params]
        try:
            placements = [found for names in _chunks(list(tensors), TAGS_PER_PASS)
                          for found in _tagged_pass(params, load, {n: tensors[n] for n in names})]
            weight_map, probes = cls(placements), Probes(tensors)
            _restore(params, saved)
            load((name, probes.of(name)) for name in tensors)
            return weight_map if weight_map._agrees(params, saved, probes) else None
        finally:
            _restore(params, saved)

    def place(self, tensors: dict[str, torch.Tensor], target: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
        """Copy each tensor where vLLM's loader would put it, into `target(param)` (the param, or its shadow)."""
        torch._foreach_copy_(self._windows([target(p.param) for p in self.placements], tensors),
                             [tensors[p.name] for p in self.placements])

    def _windows(self, targets: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(t.data_ptr() for t in targets)
        if key not in self.windows:
            if len(self.windows) >= 4:  # storages replaced, not swapped (a quant method's own `.data =`): start over
                self.windows.clear()
            self.windows[key] = [t.view(-1)[p.start:p.start + tensors[p.name].numel()].view(tensors[p.name].shape)
                                 for t, p in zip(targets, self.placements)]
        return self.windows[key]

    def _agrees(self, params: list[torch.nn.Parameter], saved: list[torch.Tensor], probes: Probes) -> bool:
        """After a random version through vLLM's loader, each placement holds its tensor and everything between
        them is as it was: the map writes what the loader writes, element for element, and nothing else."""
        return all(self._agrees_on(param.detach().reshape(-1), before.reshape(-1), param, probes)
                   for param, before in zip(params, saved))

    def _agrees_on(self, flat: torch.Tensor, old: torch.Tensor, param: torch.nn.Parameter, probes: Probes) -> bool:
        cursor = 0
        for p in sorted((p for p in self.placements if p.param is param), key=lambda p: p.start):
            want = probes.of(p.name).reshape(-1)
            end = p.start + want.numel()
            if not (torch.equal(flat[cursor:p.start], old[cursor:p.start]) and torch.equal(flat[p.start:end], want)):
                return False
            cursor = end
        return torch.equal(flat[cursor:], old[cursor:])


class Probes:
    """A random stand-in for each tensor: tensor i is the window of one random pool that starts at element i, so
    no two are alike (a loader that swapped two would be found) and none is a copy (no second model in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.start = {name: i for i, name in enumerate(tensors)}
        size = max((t.numel() for t in tensors.values()), default=0) + len(tensors)
        self.pool = torch.randn(size, generator=torch.Generator().manual_seed(0))
        self.pools: dict[torch.dtype, torch.Tensor] = {}

    def of(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]
        if not tensor.is_floating_point():
            return tensor
        if tensor.dtype not in self.pools:
            self.pools[tensor.dtype] = self.pool.to(tensor.dtype)
        pool = self.pools[tensor.dtype]
        return pool[self.start[name]:self.start[name] + tensor.numel()].view(tensor.shape)


def _tagged_pass(params: list[torch.nn.Parameter], load: Loader,
                 tensors: dict[str, torch.Tensor]) -> list[Placement]:
    """Every parameter zeroed, tensor i loaded as the constant i + 1, then found as one run of it."""
    for p in params:
        p.zero_()
    load((name, torch.full_like(t, i + 1)) for i, (name, t) in enumerate(tensors.items()))
    tags = {i + 1: (name, t.numel()) for i, (name, t) in enumerate(tensors.items())}
    return [found for p in params for found in _runs(p, tags)]


def _runs(param: torch.nn.Parameter, tags: dict[int, tuple[str, int]]) -> list[Placement]:
    """The runs of one tag in `param` that are as long as its tensor (a tensor split or cut finds none)."""
    flat = param.detach().reshape(-1)
    edges = ((flat[1:] != flat[:-1]).nonzero().flatten() + 1).tolist()
    placements = []
    for start, end in zip([0, *edges], [*edges, flat.numel()]):
        tag = float(flat[start])
        name, numel = tags.get(int(tag), ("", -1)) if tag == int(tag) else ("", -1)
        if end - start == numel:
            placements.append(Placement(name, param, start))
    return placements


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)


class ShadowWeights:
    """One version prepared ahead (`prepare`, any thread) and put in place (`swap`, between chunks). `lock`
    is held by whatever writes the plain weights: a prepare, a swap, and the engine's own full loads."""

    def __init__(self, weight_map: WeightMap, layers: list[Any], plain: dict[Any, torch.nn.Parameter]) -> None:
        self.map = weight_map
        self.layers = layers
        self.plain = plain  # a packed layer -> its plain weight (InPlaceReload's)
        packed = {id(p) for p in plain.values()}
        live = {id(p.param): p.param for p in weight_map.placements if id(p.param) not in packed}
        self.shadows = {key: param.detach().clone() for key, param in live.items()}  # full copies: padding too
        self.live = live
        self.lock = threading.Lock()
        self.ready: tuple[str, dict[Any, Callable]] | None = None  # (tag, each layer's new cpu_linear)
        self.swaps = 0

    @torch.no_grad()
    def prepare(self, tensors: dict[str, torch.Tensor], tag: str) -> None:
        """Copy `tensors` (version `tag`) into plain weights and shadows, and pack each layer's GEMM from them."""
        with self.lock:
            self.ready = None
            self.map.place(tensors, self._target)
            self.ready = (tag, {layer: self._packed(layer) for layer in self.layers})

    def swap(self, tag: str) -> bool:
        """Put the version prepared as `tag` in place; False (nothing changed) where another one is ready."""
        if self.ready is None or self.ready[0] != tag:
            return False
        for layer, linear in self.ready[1].items():
            layer.cpu_linear = linear
        for key, param in self.live.items():
            param.data, self.shadows[key].data = self.shadows[key].data, param.data
        self.ready = None
        self.swaps += 1
        return True

    def forget(self) -> None:
        """A full load wrote the plain weights: what was prepared is gone."""
        self.ready = None

    def _target(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self.shadows.get(id(param), param)

    def _packed(self, layer: Any) -> Callable:
        """The layer's quant method run on a stand-in holding the prepared tensors: the live layer is untouched."""
        stand_in = SimpleNamespace(weight=self._target(self._weight_of(layer)), bias=self._bias_of(layer),
                                   _cpu_skip_gemm_dispatch=getattr(layer, "_cpu_skip_gemm_dispatch", False))
        layer.quant_method.process_weights_after_loading(stand_in)
        return stand_in.cpu_linear

    def _weight_of(self, layer: Any) -> torch.nn.Parameter:
        return self.plain.get(layer, layer.weight)

    def _bias_of(self, layer: Any) -> torch.Tensor | None:
        bias = getattr(layer, "bias", None)
        return None if bias is None else self._target(bias)
