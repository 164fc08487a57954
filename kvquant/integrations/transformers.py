"""kvquant caches inside HF transformers (the layer-based Cache API of transformers 5.x).

    from kvquant.integrations.transformers import KvquantCache
    cache = KvquantCache(model.config, keys="int8", values="int4", residual=128)
    out = model.generate(ids, cache=cache, max_new_tokens=64)   # past_key_values=cache before the rename

transformers renamed the cache argument from ``past_key_values`` to ``cache`` (the old
name warns, and goes in 5.40); ``cache_argument(model)`` says which name a model takes,
for code that runs on either side of the rename.

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

from ..attention import DEFAULT_CHUNK_TOKENS, attend
from ..backends import torch_attention
from ..cache import LayerCache

__all__ = ["KvquantCache", "KvquantLayer", "cache_argument"]


def cache_argument(model) -> str:
    """The keyword a model's forward (and generate) takes its cache under: "cache" in
    transformers versions after the rename, "past_key_values" before it."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KvquantLayer(DynamicLayer):
    """One attention layer's cache: a kvquant LayerCache behind transformers' layer API."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, keys: Any = "int8", values: Any = "int8", residual: int = 128, layer_idx: int = 0,
                 reads_codes: bool = False, quantize_every: int = 1):
        super().__init__()
        self._options = dict(keys=keys, values=values, residual=residual, layer=layer_idx,
                             quantize_every=quantize_every)
        self.kv = LayerCache(**self._options)  # checks the formats now, not at the first token
        self.reads_codes = reads_codes
        self._unconsumed = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.reads_codes:
            return self.kv.append(key_states, value_states)
        # kvquant attention reads this layer's codes: no dequantized copy of the history.
        # The new tokens go back as they came, tagged so the attention finds the layer.
        if self._unconsumed:
            raise RuntimeError(
                f"kvquant cache layer {self.kv.layer}: the model's attention did not read the cache's codes on the "
                "last step; a cache made with attention='kvquant' needs the model to use kvquant's attention "
                "(kvquant.integrations.transformers.use_kvquant_attention(model))")
        self.kv.append(key_states, value_states, history=False)
        _PENDING[id(key_states)] = self
        self._unconsumed = True
        return key_states, value_states

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
    ``keys``, ``values``, ``residual``, ``quantize_every``: the defaults for every layer
    (see kvquant.cache.LayerCache); ``per_layer``: {layer index: overrides};
    ``attention="kvquant"``: the layers hand their codes to kvquant.attention (after
    use_kvquant_attention(model)) instead of a dequantized history.
    """

    def __init__(self, config: Optional[Any] = None, *, keys: Any = "int8", values: Any = "int8",
                 residual: int = 128, per_layer: Optional[Dict[int, Dict[str, Any]]] = None,
                 attention: Optional[str] = None, quantize_every: int = 1):
        if attention not in (None, ATTENTION):
            raise ValueError(f"attention must be None (the model's own, over the dequantized history) or "
                             f"{ATTENTION!r} (kvquant.attention, reading the codes), got {attention!r}")
        if attention and config is not None and getattr(config, "_attn_implementation", None) != ATTENTION:
            raise ValueError(f"attention={ATTENTION!r} needs the model to use it: call "
                             "kvquant.integrations.transformers.use_kvquant_attention(model) first "
                             f"(the config says {getattr(config, '_attn_implementation', None)!r})")
        defaults = dict(keys=keys, values=values, residual=residual, reads_codes=attention == ATTENTION,
                        quantize_every=quantize_every)
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




# ------------------------------------------------------------------ attention
ATTENTION = "kvquant"
_PENDING: "weakref.WeakValueDictionary" = None  # id(new key states) -> the layer that stored them


def _kvquant_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention interface over a kvquant layer's codes (kvquant.attention).
    Layers of other caches (or none) get torch's scaled_dot_product_attention."""
    layer = _PENDING.pop(id(key), None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    layer._unconsumed = False
    keys, values = layer.kv.attention_inputs()
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            mask = mask.masked_fill(~attention_mask, float("-inf"))
        else:
            mask = attention_mask.to(torch.float32)
        mask = mask[..., -keys.length:]
    compiled = torch.compiler.is_compiling() or _COMPILED_ATTENTION
    if scaling is not None and _matches_layer(query, layer.kv, keys.length):
        # The layer's cache built both histories, which agree with each other; the query
        # matches the layer: attend's general checks (about 15 us per layer and step in
        # a model's decode) have nothing left to find.
        out = torch_attention.attend(query, keys, values, float(scaling), mask is None, mask, compiled,
                                     DEFAULT_CHUNK_TOKENS)
    else:  # the general path, which says what is wrong
        out = attend(query, keys, values, scale=scaling, causal=mask is None, mask=mask, compiled=compiled)
    return out.transpose(1, 2).contiguous(), None


def _matches_layer(query, kv, tokens: int) -> bool:
    """Whether ``query`` fits the layer cache ``kv``: its batch and head_dim, query heads
    a multiple of its KV heads, no more new tokens than it holds."""
    _, _, _, batch, kv_heads, head_dim = kv.signature
    shape = query.shape
    return (isinstance(query, torch.Tensor) and len(shape) == 4 and shape[0] == batch and shape[3] == head_dim
            and shape[1] % kv_heads == 0 and 0 < shape[2] <= tokens)


_COMPILED_ATTENTION = False


def use_kvquant_attention(model, compiled: bool = False) -> None:
    """Make ``model`` (a transformers model) attend with kvquant.attention, which reads a
    KvquantCache(..., attention="kvquant")'s codes directly; other caches fall back to
    scaled_dot_product_attention. ``compiled``: instead of eager chunks, compiled code:
    on the CPU kvquant's C++ kernel (built on first use, about 4 s, then cached on
    disk), on other devices torch.compile's fused kernels."""
    global _PENDING, _COMPILED_ATTENTION
    import weakref

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if _PENDING is None:
        _PENDING = weakref.WeakValueDictionary()
    _COMPILED_ATTENTION = compiled
    AttentionInterface.register(ATTENTION, _kvquant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
