"""kvquant.attention for JAX, under jax.jit. On one CPU device, kvquant's C++ decode
kernel (backends/cpu_kernel/) as an XLA custom call on XLA's own buffers; elsewhere
element-wise products and reductions over the dequantized history, which XLA fuses
into loops over the codes (nothing full-size is written). Same function names as
backends/torch/attention.py: attend, scores, weighted_values.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def _kernel_serves(keys, values) -> bool:
    """Whether the C++ kernel reads these histories here: one CPU device (a custom call
    has no sharding rule, so on a mesh XLA would gather the arrays), float32 or bfloat16
    windows, formats it has a kind for, and the kernel built."""
    from ..cpu_kernel import load_jax, side_format

    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    for side in (keys, values):
        if side.quantized is not None and side_format(side.quantized) is None:
            return False
        if side.window is not None and side.window.dtype not in (jnp.float32, jnp.bfloat16):
            return False
    return load_jax()


def _kernel_side(side, batch: int, heads: int, dim: int):
    """(kind, bits, group, [codes, scales, zeros, window]) for the FFI call; empty arrays
    for what a side does not have."""
    empty = jnp.zeros((), F32)
    window = side.window if side.window is not None else jnp.zeros((batch, heads, 0, dim), F32)
    q = side.quantized
    if q is None:
        return 0, 0, 0, [jnp.zeros((batch, heads, 0, 1), jnp.uint8), empty, empty, window]
    from ..cpu_kernel import side_format

    kind, bits, group = side_format(q)
    zeros = q.zeros if q.zeros is not None else empty
    return kind, bits, group, [q.codes, q.scales.astype(F32), zeros.astype(F32), window]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kernel_attend(query, keys, values, scale: float, causal: bool, mask):
    """attend by the C++ decode kernel (an XLA custom call on XLA's buffers); its
    gradient is the element-wise form's (the custom call has none of its own)."""
    return _kernel_with_gradient(scale, causal, query, keys, values, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_with_gradient(scale: float, causal: bool, query, keys, values, mask):
    return _kernel_call(query, keys, values, scale, causal, mask)


def _kernel_forward(scale, causal, query, keys, values, mask):
    return _kernel_call(query, keys, values, scale, causal, mask), (query, keys, values, mask)


def _kernel_backward(scale, causal, saved, cotangent):
    _, vjp = jax.vjp(lambda q, k, v, m: _attend(q, k, v, scale, causal, m), *saved)
    return vjp(cotangent)


_kernel_with_gradient.defvjp(_kernel_forward, _kernel_backward)


def _kernel_call(query, keys, values, scale: float, causal: bool, mask):
    from ..cpu_kernel import JAX_TARGET

    b, hq, n, d = query.shape
    kv_heads = (keys.quantized if keys.quantized is not None else keys.window).shape[1]
    rows = (hq // kv_heads) * n
    qg = query.astype(F32).reshape(b, kv_heads, rows, d)
    k_kind, k_bits, k_group, k_arrays = _kernel_side(keys, b, kv_heads, d)
    v_kind, v_bits, v_group, v_arrays = _kernel_side(values, b, kv_heads, d)
    total = (keys.quantized.shape[TOKEN_AXIS] if keys.quantized is not None else 0) + k_arrays[3].shape[TOKEN_AXIS]
    grouped = jnp.zeros((), F32)
    if mask is not None:
        grouped = jnp.broadcast_to(mask.astype(F32), (b, hq, n, total)).reshape(b, kv_heads, rows, total)
    out = jax.ffi.ffi_call(JAX_TARGET, jax.ShapeDtypeStruct((b, kv_heads, rows, d), F32), vmap_method="sequential")(
        qg, *k_arrays, *v_arrays, grouped, k_kind=np.int32(k_kind), k_bits=np.int32(k_bits),
        k_group=np.int64(k_group), v_kind=np.int32(v_kind), v_bits=np.int32(v_bits), v_group=np.int64(v_group),
        scale=np.float32(scale), causal=np.int32(causal and n > 1), new_tokens=np.int64(n),
        has_mask=np.int32(mask is not None))
    return out.reshape(b, hq, n, d).astype(query.dtype)


def attend(query, keys, values, scale: float, causal: bool, mask):
    """On one CPU device, kvquant's C++ decode kernel through XLA's FFI (it reads the
    codes once per token); elsewhere the element-wise form above, which XLA fuses."""
    if _kernel_serves(keys, values):
        return _kernel_attend(query, keys, values, scale, causal, mask)
    return _attend(query, keys, values, scale, causal, mask)
