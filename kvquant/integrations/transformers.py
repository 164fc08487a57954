"""kvquant caches inside HF transformers (the layer-based Cache API of transformers 5.x).

    from kvquant.integrations.transformers import KvquantCache
    cache = KvquantCache(model.config, keys="int8", values="int4", residual=128)
    out = model.generate(ids, cache=cache, max_new_tokens=64)   # past_key_values=cache before the rename

By default the cache is on kvquant's fast path: made from a model's config, it switches
that model (its decoder's config, not the process) to kvquant's attention, which reads
the layers' codes directly (on the CPU kvquant's C++ kernel, elsewhere torch.compile's
fused kernels) and, for any other cache, defers to the attention the model had (SDPA, or
eager). Tokens leave the full-precision window 32 at a time (``quantize_every=32``).
``attention="dequantized"`` keeps the model's own attention over a dequantized history
instead, as HF's QuantizedCache does.

transformers renamed the cache argument from ``past_key_values`` to ``cache`` (the old
name warns, and goes in 5.40); ``cache_argument(model)`` says which name a model takes,
for code that runs on either side of the rename.

Each attention layer gets a ``kvquant.cache.LayerCache``; ``get_seq_length`` counts
every token (positions and masks follow it). Formats can differ per layer and per
layer type: ``per_layer={"sliding_attention": {"keys": None, "values": None}, 0:
{"keys": "int8"}}`` overrides the defaults for every sliding layer, then for layer 0
(``residual`` too).

Layer types, from the model's config: full attention; sliding-window and chunked
layers (Gemma 2/3, Mistral, Qwen2/3 with a window, gpt-oss, Llama 4), whose caches
forget what lies beyond the window (``LayerCache(sliding_window=W)``: memory bounded
by W, the mask hides the at most max(16, quantize_every) + G - 1 older tokens a
layer still holds); layers that are not attention (linear attention, convolution,
state-space, MoE/MLP placeholders, shared-KV consumers) keep transformers' own layer
for their type, untouched. Layers that mix a recurrent state with attention in one
cache ("hybrid"), indexed and compressed attention are refused, naming the type, and
so are MLA caches (DeepSeek V2/V3).
Models that share KV between layers (Gemma 3n) read dequantized histories (the
sharing layers take the owner's whole history). An attention with logit soft-capping
or sinks (Gemma 2, gpt-oss) gets the dequantized history and the model's own
attention, which applies them.

``crop`` works inside the residual window only (quantized tokens cannot be put back),
and on a sliding layer only before its window is full, as in transformers;
``reorder_cache``, ``batch_repeat_interleave`` and ``batch_select_indices`` (beam
search, contrastive search) reorder every stored array.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import DEFAULT_CHUNK_TOKENS, attend
from ..backends.torch import attention as torch_attention
from ..cache import LayerCache

__all__ = ["KvquantCache", "KvquantLayer", "cache_argument"]


def cache_argument(model) -> str:
    """The keyword a model's forward (and generate) takes its cache under: "cache" in
    transformers versions after the rename, "past_key_values" before it."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KvquantLayer(DynamicLayer):
    """One attention layer's cache: a kvquant LayerCache behind transformers' layer API.
    ``reads_codes``: hand kvquant's attention the codes rather than a dequantized
    history; ``compiled``: that attention's compiled path (C++ kernel on the CPU)."""

    is_croppable = True
    is_compileable = False

    def __init__(self, keys: Any = "int8", values: Any = "int8", residual: int = 128, layer_idx: int = 0,
                 reads_codes: bool = False, quantize_every: int = 1, compiled: bool = True,
                 sliding_window: Optional[int] = None):
        super().__init__()
        self._options = dict(keys=keys, values=values, residual=residual, layer=layer_idx,
                             quantize_every=quantize_every, sliding_window=sliding_window)
        self.kv = LayerCache(**self._options)  # checks the formats now, not at the first token
        self.reads_codes = reads_codes
        self.compiled = compiled
        self._unconsumed = False
        self.kernel_call = torch_attention.KernelCall()  # the C++ kernel's Problem, kept between steps
        self.is_sliding = sliding_window is not None
        self.sliding_window = sliding_window
        self.cumulative_length = 0  # tokens seen; a sliding layer holds fewer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if not self.reads_codes:
            return _visible(self.kv, self.kv.append(key_states, value_states))
        # kvquant attention reads this layer's codes: no dequantized copy of the history.
        # The new tokens go back as they came, tagged so the attention finds the layer.
        if self._unconsumed:
            raise RuntimeError(
                f"kvquant cache layer {self.kv.layer}: the model's attention did not read the cache's codes on the "
                "last step. KvquantCache switches the model whose config it is given to kvquant's attention; this "
                "model did not use it (another config, or a model that does not take transformers' attention "
                "interface). Pass that model's config, or attention='dequantized'")
        self.kv.append(key_states, value_states, history=False)
        _PENDING[id(key_states)] = weakref.ref(self)
        self._unconsumed = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        # As transformers' DynamicSlidingWindowLayer: W - 1 kept tokens and the new ones.
        seen, window = self.cumulative_length, self.sliding_window
        offset = max(seen - window + 1, 0)
        return (window - 1 + query_length if seen >= window else seen + query_length), offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.kv = LayerCache(**self._options)
        self.kernel_call = torch_attention.KernelCall()  # lets the old buffers go
        self.is_initialized = False
        self._unconsumed = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as transformers' layers do")
        if self.is_sliding and self.cumulative_length >= self.sliding_window:
            raise RuntimeError(f"kvquant cache layer {self.kv.layer}: a sliding-window layer past its window "
                               f"({self.sliding_window} tokens) has forgotten what a crop would need, as "
                               "transformers' DynamicSlidingWindowLayer has")
        if tokens_to_remove:
            self.kv.crop(self.kv.seq_length + tokens_to_remove)
            self.cumulative_length = self.kv.seq_length

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


def _visible(kv: LayerCache, history):
    """A layer's (keys, values) history without the tokens a sliding window has left."""
    hidden = kv.hidden_tokens
    return history if not hidden else tuple(h[:, :, hidden:] for h in history)


ATTENTION = "kvquant"  # the name kvquant's attention is registered under in transformers
ATTENTION_CHOICES = ("auto", "kvquant", "dequantized")
QUANTIZE_EVERY = 32  # measured fastest in generate (docs/attention.md, "End to end")


class KvquantCache(Cache):
    """A transformers Cache whose layers are kvquant caches.

    ``config``: the model's config: layers are made up front, the model's layer types
    checked and, with kvquant's attention, the model switched to it (see the module's
    doc); without one, layers are added as the model reaches them.
    ``keys``, ``values``, ``residual``, ``quantize_every``: the defaults for every layer
    (see kvquant.cache.LayerCache); ``per_layer``: {layer type or index: overrides}, an
    index overriding its type (e.g. ``{"sliding_attention": {"keys": None, "values": None}}``).
    ``attention``: "kvquant" (kvquant.attention reads the codes; the default with a
    config; without one, the model must have been switched by ``use_kvquant_attention``)
    or "dequantized" (the model's own attention over the dequantized history; the
    default without a config; None means the same). ``compiled``: kvquant attention's
    compiled path (C++ kernel on the CPU, torch.compile's kernels elsewhere); None takes
    ``use_kvquant_attention``'s choice for this model, else True.

    An encoder-decoder model (Bart, T5, Whisper) takes ``KvquantCache.encoder_decoder(
    model.config, ...)``: transformers' EncoderDecoderCache with a KvquantCache for the
    decoder's self-attention and a DynamicCache for the cross-attention keys and values.
    """

    def __init__(self, config: Optional[Any] = None, *, keys: Any = "int8", values: Any = "int8",
                 residual: int = 128, per_layer: Optional[Dict[int, Dict[str, Any]]] = None,
                 attention: Optional[str] = "auto", quantize_every: int = QUANTIZE_EVERY,
                 compiled: Optional[bool] = None, _self_attention_of_encoder_decoder: bool = False):
        if getattr(config, "is_encoder_decoder", False) and not _self_attention_of_encoder_decoder:
            raise ValueError(
                f"{type(config).__name__} is an encoder-decoder model: its cache holds the decoder's self-attention "
                "and the encoder's keys for cross-attention apart (transformers' EncoderDecoderCache). Use "
                "KvquantCache.encoder_decoder(model.config, ...), which quantizes the self-attention cache and "
                "keeps the cross-attention one as transformers does")
        if attention == "auto":  # a cache can switch only a model whose config it is given
            attention = ATTENTION if config is not None else "dequantized"
        attention = "dequantized" if attention is None else attention
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES} ('kvquant': kvquant.attention reads "
                             f"the codes; 'dequantized': the model's own attention over the dequantized history), "
                             f"got {attention!r}")
        text_config = None
        if config is not None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            if getattr(text_config, "kv_lora_rank", None) is not None:
                raise ValueError(
                    f"KvquantCache does not hold MLA caches ({type(text_config).__name__}: DeepSeek V2/V3 style "
                    "attention caches a compressed latent and its rotary part, of different sizes, not keys and "
                    "values of one head size); use transformers' DynamicCache for this model")
            types = _checked_layer_types(text_config)  # (types, per-layer options)
            if attention == ATTENTION:
                _switch_to_kvquant_attention(_config_the_layers_read(config, text_config))
        elif attention == ATTENTION and not _REGISTERED:
            raise ValueError("KvquantCache() without a config cannot switch the model to kvquant's attention: pass "
                             "model.config, call kvquant.integrations.transformers.use_kvquant_attention(model) "
                             "first, or use attention='dequantized'")
        if compiled is None:
            compiled = getattr(text_config, "_kvquant_compiled", True)
        # Layers that share their KV with later ones hand those the whole history.
        shared_kv = getattr(text_config, "kv_sharing_modes", None) is not None
        defaults = dict(keys=keys, values=values, residual=residual,
                        reads_codes=attention == ATTENTION and not shared_kv,
                        quantize_every=quantize_every, compiled=bool(compiled))
        per_layer = dict(per_layer or {})

        def layer(i: int, kind: str = "full_attention", options: Optional[dict] = None):
            if kind in PASSED_THROUGH:
                from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

                return DYNAMIC_LAYER_TYPE_MAPPING[kind](**(options or {}))
            window = (options or {}).get("sliding_window") if kind in SLIDING else None
            return KvquantLayer(**{**defaults, **per_layer.get(kind, {}), **per_layer.get(i, {})}, layer_idx=i,
                                sliding_window=window)

        if config is None:
            self._next_index = 0

            def next_layer() -> KvquantLayer:
                made = layer(self._next_index)
                self._next_index += 1
                return made

            super().__init__(layer_class_to_replicate=next_layer)
            return
        super().__init__(layers=[layer(i, kind, options) for i, (kind, options) in enumerate(zip(*types))])

    @classmethod
    def encoder_decoder(cls, config: Any, **options: Any):
        """transformers' EncoderDecoderCache for an encoder-decoder model: the decoder's
        self-attention in a KvquantCache (``options`` as for KvquantCache), the
        cross-attention keys and values (the encoder's, computed once) in a DynamicCache."""
        from transformers import DynamicCache, EncoderDecoderCache

        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(config).__name__} is not an encoder-decoder model: use KvquantCache(config, ...)")
        return EncoderDecoderCache(cls(config, _self_attention_of_encoder_decoder=True, **options), DynamicCache())

    def layer_caches(self):
        """The kvquant LayerCache of every layer (stored bits, nbytes), None for a layer
        transformers keeps (linear attention, placeholders)."""
        return [layer.kv if isinstance(layer, KvquantLayer) else None for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes of every kvquant layer's arrays (the layers transformers keeps not counted)."""
        return sum(c.nbytes for c in self.layer_caches() if c is not None)


SLIDING = ("sliding_attention", "chunked_attention")  # transformers caches chunked layers as sliding ones
# Layers with no per-token KV of their own: transformers' layer for the type, untouched.
PASSED_THROUGH = ("linear_attention", "conv", "dummy")


def _config_the_layers_read(config, text_config):
    """The config object whose attention setting the attention layers read: a
    multimodal model's text sub-config, which its language model holds; otherwise the
    model's own (an encoder-decoder config's get_text_config(decoder=True) is a copy)."""
    held = any(value is text_config for value in vars(config).values())
    return text_config if held or text_config is config else config


def _checked_layer_types(config):
    """(layer types, per-layer options) from the config, or a ValueError naming the types
    a kvquant cache cannot hold."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, options = get_layer_types_and_kwargs(config)
    types, options = list(types), list(options)
    held = ("full_attention",) + SLIDING + PASSED_THROUGH
    unsupported = sorted({t for t in types if t not in held})
    if unsupported:
        raise ValueError(
            f"KvquantCache holds full-attention, sliding-window and chunked layers and leaves linear-attention, "
            f"convolution and placeholder layers to transformers; this model has layer types {unsupported} "
            f"(layers {[i for i, t in enumerate(types) if t not in held][:8]}): a layer that keeps a recurrent "
            "state and attention in one cache ('hybrid'), or indexed or compressed attention, is not modelled yet")
    return types, options




# ------------------------------------------------------------------ attention
# id(new key states) -> a weak reference to its layer, from the cache's update to the
# layer's attention (a plain dict: a WeakValueDictionary's Python-level set and pop cost
# per layer and step); an entry left by a step that failed is dropped below once dead.
_PENDING: dict = {}
_REGISTERED = False


def _register() -> None:
    """kvquant's attention and its mask function in transformers' registries (once; a
    name in a registry changes no model until a model's config asks for it)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(ATTENTION, _kvquant_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        _REGISTERED = True


def _switch_to_kvquant_attention(config, compiled: Optional[bool] = None) -> None:
    """Point the model whose (text) config this is at kvquant's attention, remembering
    the attention it had for the layers of other caches. Only this config changes: its
    sub-configs (a vision tower's) and other models keep theirs."""
    _register()
    current = getattr(config, "_attn_implementation", None)
    if current != ATTENTION:
        config._kvquant_fallback = "eager" if current == "eager" else "sdpa"
        config._attn_implementation_internal = ATTENTION
    if compiled is not None:
        config._kvquant_compiled = compiled


def _fallback_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's attention from before the switch, for layers of other caches: SDPA, or
    its modeling file's eager attention (which adds a float mask: sdpa_mask's boolean
    one is turned into one)."""
    if getattr(getattr(module, "config", None), "_kvquant_fallback", "sdpa") == "eager":
        import sys

        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device) \
                    .masked_fill(~attention_mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _kvquant_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention interface over a kvquant layer's codes (kvquant.attention).
    Layers of other caches (or none) get the model's previous attention."""
    ref = _PENDING.pop(id(key), None)
    layer = None if ref is None else ref()
    if len(_PENDING) > 64:  # only failed steps leave entries: drop those of layers gone
        for stale in [k for k, r in _PENDING.items() if r() is None]:
            del _PENDING[stale]
    if layer is None:
        return _fallback_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)
    layer._unconsumed = False
    special = kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None
    if (attention_mask is None and scaling is not None and not special and layer.compiled
            and not layer.kv.hidden_tokens and not torch.compiler.is_compiling()):
        # A decode step like the last one: the layer's kept kernel Problem, nothing else
        # made (the general path below, per layer and step, costs more than the kernel).
        out = layer.kernel_call.decode(query, float(scaling), layer.kv.attention_buffers())
        if out is not None:
            return out, None
    if special:
        # Attention sinks or soft-capped logits: kvquant's attention has neither, the
        # model's own attention over the dequantized history applies them.
        key, value = _visible(layer.kv, layer.kv.history(query.dtype))
        return _fallback_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)
    keys, values = layer.kv.attention_inputs()
    causal, mask = attention_mask is None, None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            mask = mask.masked_fill(~attention_mask, float("-inf"))
        else:
            mask = attention_mask.to(torch.float32)
    hidden = layer.kv.hidden_tokens
    if hidden:  # a sliding layer's oldest held tokens, outside this step's window
        if mask is None:
            mask = torch.zeros((1, 1, query.shape[2], keys.length - hidden), dtype=torch.float32, device=query.device)
        mask = torch.nn.functional.pad(mask, (hidden, 0), value=float("-inf"))
    if mask is not None:
        mask = mask[..., -keys.length:]
    compiled = torch.compiler.is_compiling() or layer.compiled
    if scaling is not None and _matches_layer(query, layer.kv, keys.length):
        # The layer's cache built both histories, which agree with each other; the query
        # matches the layer: attend's general checks, a cost in every layer and step,
        # have nothing left to find.
        out = torch_attention.attend(query, keys, values, float(scaling), causal, mask, compiled,
                                     DEFAULT_CHUNK_TOKENS, layer.kernel_call)
    else:  # the general path, which says what is wrong
        out = attend(query, keys, values, scale=scaling, causal=causal, mask=mask, compiled=compiled)
    return out.transpose(1, 2).contiguous(), None


def _matches_layer(query, kv, tokens: int) -> bool:
    """Whether ``query`` fits the layer cache ``kv``: its batch and head_dim, query heads
    a multiple of its KV heads, no more new tokens than it holds."""
    _, _, _, batch, kv_heads, head_dim = kv.signature
    shape = query.shape
    return (isinstance(query, torch.Tensor) and len(shape) == 4 and shape[0] == batch and shape[3] == head_dim
            and shape[1] % kv_heads == 0 and 0 < shape[2] <= tokens)


def use_kvquant_attention(model, compiled: bool = True) -> None:
    """Switch ``model`` (a transformers model) to kvquant's attention, as a KvquantCache
    made from its config does, and choose for this model's caches whether it is compiled
    (on the CPU kvquant's C++ kernel, built on first use and then kept in
    ~/.cache/kvquant; on other devices torch.compile's fused kernels) or eager chunks.
    Needed only for a KvquantCache made without a config."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    _switch_to_kvquant_attention(config, compiled)
