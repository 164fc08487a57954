"""Quantized KV caches for one attention layer, in any framework kvquant supports.

    cache = kvquant.cache.LayerCache(keys="int8", values="int4", residual=128)
    k_all, v_all = cache.append(k_new, v_new)     # [batch, kv_heads, new_tokens, head_dim]

``append`` returns what attention needs: the whole history, dequantized, followed by
the full-precision residual window, in the dtype asked for (the input's by default).
Exactly the most recent ``residual`` tokens stay in full precision; each token is
quantized when it leaves the window, with one ``kvquant.quantize`` call per append
for the tokens leaving it, so the stored codes, scales and zeros are bit-identical to
one ``kvquant.quantize`` of all the quantized tokens at once (every stored format
quantizes each token on its own; FP8 per tensor needs a static scale for that).

``LayerCache`` holds NumPy arrays or torch tensors (on their own device; nothing is
moved to the host) and grows its storage by doubling along the token axis, so an
append costs the quantization of the tokens leaving the window, a copy of the new
tokens into the window's buffer, on the appends that quantize a copy of the at most
``residual + quantize_every`` tokens that stay in the window, and, once in a while, a
copy of the stored codes into a buffer twice as large (amortised O(1) per token). The
returned history is dequantized anew on every append: O(tokens), like HF's
QuantizedCache.

``JaxLayerCache`` is the functional counterpart for JAX: a pytree of fixed capacity,
updated with ``dynamic_update_slice`` inside ``jax.jit`` without recompiling per step.

The package: stored.py (how a side is stored, and the growing buffers of codes and of
the window), layer.py (LayerCache), jax_cache.py (JaxLayerCache). The array operations
a buffer needs come from each backend's runtime (protocols.Runtime, "cache buffers").

Non-finite input: caches default to ``on_nonfinite="propagate"``. A NaN or inf token
is stored with a NaN scale and dequantizes to NaN, which is what an unquantized cache
would have handed attention; and "raise" would read the scales on the host at every
append, a device synchronisation per decode step on an accelerator.
"""
from __future__ import annotations

from .jax_cache import JaxLayerCache
from .layer import LayerCache
from .stored import TOKEN_AXIS, CacheInputError, StoredFormat, calibrate_fp8_scale

__all__ = ["CacheInputError", "JaxLayerCache", "LayerCache", "StoredFormat", "TOKEN_AXIS", "calibrate_fp8_scale"]
