"""Attention of new query tokens over a quantized KV history, reading the codes.

    out = kvquant.attention.attend(query, keys, values)

``query`` is ``[batch, q_heads, new_tokens, head_dim]``; ``keys`` and ``values`` are
each a :class:`History` (a quantized part, a ``QuantizedKV`` ``[batch, kv_heads, T, head_dim]``
of any kvquant format, followed by a full-precision window) or a plain array of
full-precision tokens. Keys and values may be stored in different formats, and split
differently between the two parts (per-channel keys keep up to G - 1 more tokens in
their window), as long as they hold the same tokens. q_heads is a multiple of kv_heads
(grouped-query attention). With ``causal=True`` query token i, the i-th of the
``new_tokens`` newest tokens of the history, sees the history up to itself; ``mask``
(additive, broadcastable to ``[batch, q_heads, new_tokens, tokens]``) is added to the
scores, a ``-inf`` entry hiding its token even where its key is NaN.

In decode (one query token) no full-precision copy of the history is made:

* **compiled=True in PyTorch, on the CPU**: kvquant's C++ kernel
  (backends/cpu_kernel/decode_attention.cpp, built with the system's compiler on first use
  and cached on disk): each block of 32 tokens is dequantized into a buffer that stays
  in the CPU's L1 cache, read there by every query row of its KV head, with the work
  split across threads by heads and token ranges (flash-decoding);
* **compiled** elsewhere (``torch.compile`` on other devices, or where no C++
  compiler is found; ``jax.jit``): the scores are ``sum(q * dequantize(k))`` over
  head_dim and the output ``sum(p * dequantize(v))`` over tokens, written as
  element-wise products and reductions, which Inductor and XLA fuse with the
  dequantization into single loops over the codes;
* **eager** PyTorch: ``chunk_tokens`` tokens at a time are dequantized into a small
  buffer and multiplied (the scores of all tokens, a fraction 1/head_dim of the keys'
  size per query head, are kept for an exact softmax).

Several query tokens at once in PyTorch (a prefill, a chunk), outside a
``torch.compile`` trace, dequantize the history once for that call and use torch's
scaled_dot_product_attention, much faster than the reductions above for many rows;
a history holding a NaN keeps the reductions (docs/attention.md, "Prefill").

Attention is a sum, so its bits are not promised across frameworks or paths; what is
promised, and tested (tests/test_attention.py), is in docs/attention.md: the result is
within a small bound of float64 attention over the spec's dequantized history, with
the same masks, and a token whose key or value is NaN makes NaN exactly the outputs of
the queries that give it a non-zero weight (NaN key: every output of that query row;
NaN value element: that channel), while masked positions never poison anything.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ._history import DEFAULT_CHUNK_TOKENS, TOKEN_AXIS, History, as_history, token_slice

__all__ = ["History", "attend", "reference_attention", "token_slice", "TOKEN_AXIS", "DEFAULT_CHUNK_TOKENS"]


def attend(query: Any, keys: Any, values: Any, *, scale: Optional[float] = None, causal: bool = True,
           mask: Any = None, compiled: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Any:
    """Softmax(query keys^T * scale + mask) values over the history; see the module."""
    from ._registry import backend_for

    keys, values = as_history(keys), as_history(values)
    runtime = backend_for(query).runtime
    _check(query, keys, values)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    # Each backend's runtime provides its attention (protocols.Runtime.attend), as its
    # kernels provide quantization; NumPy's is the float64 reference below.
    backend_attend = getattr(runtime, "attend", None)
    if backend_attend is None:
        raise TypeError(f"the {runtime.name} backend provides no attention (its runtime has no attend)")
    return backend_attend(query, keys, values, float(scale), causal, mask, compiled, chunk_tokens)


def _check(query, keys: History, values: History) -> None:
    shape = tuple(query.shape)
    if len(shape) != 4:
        raise ValueError(f"query must be [batch, q_heads, new_tokens, head_dim], got shape {shape}")
    batch, q_heads, new, head_dim = shape
    for what, side in (("keys", keys), ("values", values)):
        parts = [p for p in (side.quantized, side.window) if p is not None]
        if not parts:
            raise ValueError(f"{what}: the history is empty (no quantized tokens and no window)")
        for p in parts:
            pshape = tuple(p.shape)
            if len(pshape) != 4 or pshape[0] != batch or pshape[3] != head_dim:
                raise ValueError(f"{what} part of shape {pshape} does not match the query {shape}: expected "
                                 f"[{batch}, kv_heads, tokens, {head_dim}]")
            if q_heads % pshape[1]:
                raise ValueError(f"q_heads {q_heads} is not a multiple of the {what}' kv_heads {pshape[1]}")
    if keys.length != values.length:
        raise ValueError(f"keys hold {keys.length} tokens and values {values.length}")
    if new > keys.length:
        raise ValueError(f"{new} query tokens but only {keys.length} tokens in the history (the new tokens "
                         "are the history's last ones: append them to the cache first)")


def reference_attention(query, keys: Any, values: Any, *, scale: Optional[float] = None, causal: bool = True,
                        mask: Any = None):
    """The plain reference, in float64 with NumPy over the spec's dequantized history
    (any framework's arrays in, NumPy float64 out): what the accuracy contract is
    measured against."""
    import numpy as np

    from .api import dequantize
    from ._registry import backend_for

    def host(a):
        return np.asarray(backend_for(a).runtime.to_numpy(a)).astype(np.float64)

    def whole(side: History):
        parts = []
        if side.quantized is not None:
            parts.append(host(dequantize(side.quantized, "float32")))
        if side.window is not None:
            parts.append(host(side.window))
        return np.concatenate(parts, axis=TOKEN_AXIS)

    keys, values = as_history(keys), as_history(values)
    q = host(query)
    k, v = whole(keys), whole(values)
    batch, q_heads, new, head_dim = q.shape
    groups = q_heads // k.shape[1]
    k = np.repeat(k, groups, axis=1)
    v = np.repeat(v, groups, axis=1)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    total = k.shape[TOKEN_AXIS]
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bhnd,bhtd->bhnt", q, k) * scale
        if mask is not None:
            m = np.broadcast_to(host(mask), s.shape)
            s = np.where(np.isneginf(m), -np.inf, s + m)  # a hidden token's NaN key stays hidden
        if causal:
            visible = np.arange(total)[None, :] <= (total - new + np.arange(new))[:, None]
            s = np.where(visible, s, -np.inf)
        top = np.max(s, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        e = np.exp(s - top)
        p = e / np.sum(e, axis=-1, keepdims=True)
        out = np.einsum("bhnt,bhtd->bhnd", np.where(p > 0, p, 0.0), np.nan_to_num(v, nan=0.0, posinf=np.inf,
                                                                                    neginf=-np.inf))
        # A NaN value element poisons the outputs that weigh it (p > 0) in its channel.
        poison = np.einsum("bhnt,bhtd->bhnd", (p > 0).astype(np.float64), np.isnan(v).astype(np.float64)) > 0
        out = np.where(poison | np.isnan(p).any(axis=-1, keepdims=True), np.nan, out)
    return out
