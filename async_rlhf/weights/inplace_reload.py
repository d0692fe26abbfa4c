"""InPlaceReload: load a version into a CPU vLLM model's own parameters, then re-pack its GEMM kernels.

vLLM's layer-wise reload (what `reload_weights` and its NCCL engine use) puts every layer back on the
meta device, allocates it anew, loads it and processes it: on a small model most of a load is that
Python bookkeeping and the page faults of fresh memory (docs/benchmarks.md "Weight sync"). On CPU the
only processing an unquantized model needs is the GEMM dispatch (`process_weights_after_loading`:
oneDNN packs each linear weight and drops the plain one). So this keeps one plain weight tensor per
linear layer (allocated and touched once, with the loader attributes vLLM recorded at model load),
puts it back before `model.load_weights` (which maps checkpoint names onto stacked qkv / gate-up
parameters and copies: one copy), and re-runs each layer's processing (the re-pack) afterwards.

`supported` says when this is exact: CPU, no quantization, every processed layer unquantized; otherwise
the engine uses the layer-wise reload.
"""
from __future__ import annotations

from typing import Any, cast

import torch

from async_rlhf.weights.shadow_weights import ShadowWeights, WeightMap

FAST_METHODS = frozenset({"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"})


def processed_layers(model: torch.nn.Module) -> list[Any]:
    """Layers whose weights a quant method processes after loading (linear layers, embeddings, lm head)."""
    return [m for m in model.modules() if type(getattr(m, "quant_method", None)).__name__ in FAST_METHODS]


class InPlaceReload:
    # Any: a vLLM model and its layers (load_weights, quant_method, weight are theirs, not torch.nn.Module's).
    def __init__(self, model: Any, quantization: str | None) -> None:
        self.model = model
        self.layers = processed_layers(model)
        self.plain: dict[torch.nn.Module, torch.nn.Parameter] = {}  # layer -> its persistent plain weight
        others = [m for m in model.modules() if getattr(m, "quant_method", None) is not None
                  and m not in self.layers and not _is_attention(m)]
        self.supported = not torch.cuda.is_available() and quantization is None and not others

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor], weight_map: WeightMap | None = None) -> None:
        """`weights` into the model: placed by `weight_map` where there is one (one copy call instead of vLLM's
        name mapping, tensor by tensor: 5.5 ms instead of 6.7 ms on the toy), else through the model's own
        `load_weights`."""
        self.loaded_params()
        if weight_map is None:
            self.model.load_weights(weights.items())
        else:
            weight_map.place(weights, lambda param: param)
        for layer in self.layers:
            layer.quant_method.process_weights_after_loading(layer)

    def loaded_params(self) -> list[torch.nn.Parameter]:
        """Every parameter the model's loader may write: each packed layer's plain weight put back in its place."""
        for layer in self.layers:
            self._expose_weight(layer)
        return list(self.model.parameters())

    def shadow(self, tensors: dict[str, torch.Tensor]) -> ShadowWeights | None:
        """Ready to prepare versions beside sampling (`ShadowWeights`), the map taken from this model's loader with
        `tensors` (a version's names and shapes); None where the loader does more than place tensors. Runs between
        generate calls: it loads probes into the live parameters (put back before it returns)."""
        from vllm.platforms import current_platform

        if current_platform.is_zen_cpu():  # zentorch's unpacked GEMM reads the plain weight that a prepare overwrites
            return None
        weight_map = WeightMap.record(self.loaded_params(), self.model.load_weights, tensors)
        return None if weight_map is None else ShadowWeights(weight_map, self.layers, self.plain)

    def _expose_weight(self, layer: Any) -> None:
        """Give a layer whose packing dropped its plain weight that weight back (in model format)."""
        if layer.weight.numel() > 0:  # kept after packing (embeddings, lm head): loaded in place
            return
        if layer not in self.plain:
            self.plain[layer] = _plain_weight(layer)
        del layer.weight
        layer.register_parameter("weight", self.plain[layer])


def _plain_weight(layer: torch.nn.Module) -> torch.nn.Parameter:
    """The model-format weight vLLM recorded for reloading (shape, class, loader), made real and touched."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    meta = get_layerwise_info(layer).restore_metadata[0]["weight"]
    weight = restore_layer_refs(materialize_meta_tensor(meta), layer)  # its own __dict__: the record stays intact
    weight.zero_()  # touch every page once
    return cast(torch.nn.Parameter, weight)  # restore_layer_refs gives back the recorded Parameter class


def _is_attention(module: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.attention import is_deferred_attention_layer

    return is_deferred_attention_layer(module)
