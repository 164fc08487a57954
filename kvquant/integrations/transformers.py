"""kvquant caches inside HF transformers (the layer-based Cache API of transformers 5.x).

    from kvquant.integrations.transformers import KvquantCache
    cache = KvquantCache(model.config, keys="int8", values="int4", residual=128)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

Each attention layer gets a ``kvquant.cache.LayerCache``: ``update`` appends the new
keys and values and returns the whole history (dequantized, then the full-precision
residual window), which is the contract transformers' attention expects;
``get_seq_length`` counts every token (positions and masks follow it). Formats can
differ per layer: ``per_layer={0: {"keys": None, "values": "int8"}}`` overrides the
defaults for layer 0 (``residual`` too).

``crop`` works inside the residual window only (quantized tokens cannot be put back);
``reorder_cache``, ``batch_repeat_interleave`` and ``batch_select_indices`` (beam
search, contrastive search) reorder every stored array. Models with sliding-window,
chunked or shared-KV layers (Gemma 3, Gemma 4, Mistral's sliding window) are refused
with a message naming the layer types: their layers need a cache that forgets tokens,
which a quantized history does not do yet.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..cache import LayerCache

__all__ = ["KvquantCache", "KvquantLayer"]


class KvquantLayer(DynamicLayer):
    """One attention layer's cache: a kvquant LayerCache behind transformers' layer API."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, keys: Any = "int8", values: Any = "int8", residual: int = 128, layer_idx: int = 0):
        super().__init__()
        self._options = dict(keys=keys, values=values, residual=residual, layer=layer_idx)
        self.kv = LayerCache(**self._options)  # checks the formats now, not at the first token

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.kv.append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.kv.seq_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = LayerCache(**self._options)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as transformers' layers do")
        if tokens_to_remove:
            self.kv.crop(self.kv.seq_length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv.seq_length:
            self.kv.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv.seq_length:
            self.kv.reorder(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv.seq_length:
            self.kv.reorder(indices)

    def offload(self):
        raise NotImplementedError("kvquant caches are not offloaded: they stay on the tensors' device")

    prefetch = offload


class KvquantCache(Cache):
    """A transformers Cache whose layers are kvquant caches.

    ``config``: the model's config (layers are made up front and the model's layer
    types checked); without one, layers are added as the model reaches them.
    ``keys``, ``values``, ``residual``: the defaults for every layer (see
    kvquant.cache.LayerCache); ``per_layer``: {layer index: overrides}.
    """

    def __init__(self, config: Optional[Any] = None, *, keys: Any = "int8", values: Any = "int8",
                 residual: int = 128, per_layer: Optional[Dict[int, Dict[str, Any]]] = None):
        defaults = dict(keys=keys, values=values, residual=residual)
        per_layer = dict(per_layer or {})

        def layer(i: int) -> KvquantLayer:
            return KvquantLayer(**{**defaults, **per_layer.get(i, {})}, layer_idx=i)

        if config is None:
            self._next_index = 0

            def next_layer() -> KvquantLayer:
                made = layer(self._next_index)
                self._next_index += 1
                return made

            super().__init__(layer_class_to_replicate=next_layer)
            return
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = _layer_types(config)
        unsupported = sorted({t for t in types if t != "full_attention"})
        if unsupported:
            raise ValueError(
                f"KvquantCache handles models whose layers all use full attention; this one has layer types "
                f"{unsupported} (layers {[i for i, t in enumerate(types) if t != 'full_attention'][:8]}...): "
                "sliding-window and chunked layers forget old tokens and shared-KV layers reuse another "
                "layer's cache, which a kvquant cache does not model yet")
        super().__init__(layers=[layer(i) for i in range(len(types))])

    def layer_caches(self):
        """The kvquant LayerCache of every layer (stored bits, nbytes)."""
        return [layer.kv for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layer_caches())


def _layer_types(config) -> list:
    from transformers.cache_utils import get_layer_types_and_kwargs

    try:
        types, _ = get_layer_types_and_kwargs(config)
        return list(types)
    except Exception:  # older configs without per-layer information
        types = getattr(config, "layer_types", None)
        if types is not None:
            return list(types)
        sliding = getattr(config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


