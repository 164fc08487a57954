"""kvquant.attention for JAX, under jax.jit: element-wise products and reductions over
the dequantized history, which XLA fuses into loops over the codes (nothing full-size
is written). Same function names as backends/torch/attention.py: attend, scores, weighted_values.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvquant.api import dequantize

TOKEN_AXIS = -2
F32 = jnp.float32


def scores(qg, keys):
    """q . k for every token of the history, [B, Hkv, g * n, T], float32."""
    parts = []
    for k in _dense_parts(keys):
        parts.append(jnp.sum(qg[:, :, :, None, :] * k[:, :, None, :, :], axis=-1))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def weighted_values(p, values):
    """p [B, Hkv, g * n, T] times the values; a zero weight never meets a NaN value."""
    out, offset = None, 0
    for v in _dense_parts(values):
        n = v.shape[TOKEN_AXIS]
        w = p[..., offset:offset + n, None]
        part = jnp.sum(jnp.where(w != 0, w * v[:, :, None, :, :], 0.0), axis=-2)
        out = part if out is None else out + part
        offset += n
    return out


def _dense_parts(side):
    parts = []
    if side.quantized is not None:
        parts.append(dequantize(side.quantized, "float32"))
    if side.window is not None and side.window.shape[TOKEN_AXIS]:
        parts.append(side.window.astype(F32))
    return parts


@functools.partial(jax.jit, static_argnums=(3, 4))
def _attend(query, keys, values, scale: float, causal: bool, mask):
    b, hq, n, d = query.shape
    kv_heads = (keys.quantized if keys.quantized is not None else keys.window).shape[1]
    qg = query.astype(F32).reshape(b, kv_heads, (hq // kv_heads) * n, d)
    s = scores(qg, keys) * scale
    total = s.shape[-1]
    if mask is not None:
        m = jnp.broadcast_to(mask.astype(F32), (b, hq, n, total))
        m = m.reshape(b, kv_heads, (hq // kv_heads) * n, total)
        s = jnp.where(m == -jnp.inf, -jnp.inf, s + m)  # a hidden token's NaN key stays hidden
    if causal and n > 1:
        row = jnp.tile(jnp.arange(n), hq // kv_heads)
        visible = jnp.arange(total)[None, :] <= (total - n + row)[:, None]
        s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return weighted_values(p, values).reshape(b, hq, n, d).astype(query.dtype)


def attend(query, keys, values, scale: float, causal: bool, mask):
    return _attend(query, keys, values, scale, causal, mask)
