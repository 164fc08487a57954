"""kvquant.attention for PyTorch: eager (dequantize a chunk of tokens, multiply) and
compiled (element-wise products and reductions that Inductor fuses with the
dequantization, so the codes are read once and nothing full-size is written).

Same function names as jax_attention.py: attend, token_slice, scores, weighted_values.
"""
from __future__ import annotations

import types
from typing import Any, List, Optional

import torch

from kvquant._formats import FORMATS
from kvquant._types import QuantizedKV
from kvquant.api import dequantize

TOKEN_AXIS = -2


def token_slice(q: QuantizedKV, start: int, stop: int) -> QuantizedKV:
    """Tokens start:stop of a quantized history (per channel: whole blocks)."""
    info = FORMATS[q.format]
    per = q.group_size if info.per_channel else 1
    codes = q.codes[..., start:stop, :]
    if info.params == "tensor":
        scales, zeros = q.scales, q.zeros
    elif info.params == "token":
        scales, zeros = q.scales[..., start:stop], None
    else:
        scales, zeros = q.scales[..., start // per:stop // per, :], q.zeros[..., start // per:stop // per, :]
    shape = tuple(q.shape[:-2]) + (stop - start, q.shape[-1])
    return QuantizedKV(codes, scales, zeros, q.format, q.group_size, shape, q.source_dtype, q.backend)


def _chunks(q: QuantizedKV, chunk_tokens: int):
    total = q.shape[TOKEN_AXIS]
    info = FORMATS[q.format]
    if info.per_channel:
        chunk_tokens = max(q.group_size, chunk_tokens // q.group_size * q.group_size)
    for start in range(0, total, chunk_tokens):
        yield start, min(total, start + chunk_tokens)


def dense(q: QuantizedKV) -> torch.Tensor:
    """The history as float32, by the spec's formulas without its edge-case care (flushes
    of subnormal products, canonical NaN bits): attention's bits are not promised, and
    inside a compiled reduction each step is one more operation per element read. A NaN
    scale or zero still gives NaN where the spec's dequantization does."""
    info = FORMATS[q.format]
    codes = q.codes
    if info.code_dtype != "uint8":  # FP8 (e4m3 to float32 is exact) and INT8
        scales = q.scales if info.params == "tensor" else q.scales[..., None]
        return codes.to(torch.float32) * scales.to(torch.float32)
    bits = 8 // info.codes_per_byte
    lead = tuple(codes.shape[:-1])
    width = codes.shape[-1] * info.codes_per_byte
    unpacked = torch.stack([(codes >> (bits * i)) & ((1 << bits) - 1) for i in range(info.codes_per_byte)], dim=-1)
    values = unpacked.reshape(lead + (width,)).to(torch.float32)
    if info.per_channel:
        g = q.group_size
        blocks = values.reshape(lead[:-1] + (lead[-1] // g, g, width))
        v = (blocks - q.zeros[..., None, :]) * q.scales[..., None, :]
        return v.reshape(lead + (width,))
    g = q.group_size
    if width % g == 0:
        groups = values.reshape(lead + (width // g, g))
        return ((groups - q.zeros[..., None]) * q.scales[..., None]).reshape(lead + (width,))
    index = torch.arange(width, device=codes.device) // g
    return (values - q.zeros[..., index]) * q.scales[..., index]


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, n, D] as [B, Hkv, g * n, D]: the g query heads sharing a KV head."""
    b, hq, n, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * n, d)


def scores(qg: torch.Tensor, keys, compiled: bool, chunk_tokens: int) -> torch.Tensor:
    """q . k for every token of the history, [B, Hkv, g * n, T], float32."""
    parts: List[torch.Tensor] = []
    if keys.quantized is not None:
        q = keys.quantized
        if compiled:
            k = dense(q)
            parts.append((qg[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1))
        else:
            for start, stop in _chunks(q, chunk_tokens):
                k = dequantize(token_slice(q, start, stop), "float32")
                parts.append(torch.matmul(qg, k.transpose(-1, -2)))
    if keys.window is not None and keys.window.shape[TOKEN_AXIS]:
        w = keys.window.to(torch.float32)
        if compiled:
            parts.append((qg[:, :, :, None, :] * w[:, :, None, :, :]).sum(-1))
        else:
            parts.append(torch.matmul(qg, w.transpose(-1, -2)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _weighted(p: torch.Tensor, v: torch.Tensor, compiled: bool) -> torch.Tensor:
    """sum over tokens of p * v, where a zero weight never meets a NaN value (0 * NaN
    would poison outputs through masked positions)."""
    if compiled:
        terms = p[..., :, None] * v[:, :, None, :, :]
        return torch.where(p[..., :, None] != 0, terms, torch.zeros((), device=p.device)).sum(-2)
    bad = torch.isnan(v)
    if not bool(bad.any()):
        return torch.matmul(p, v)
    out = torch.matmul(p, torch.where(bad, torch.zeros((), device=v.device), v))
    reached = torch.matmul((p > 0).to(torch.float32), bad.to(torch.float32)) > 0
    return torch.where(reached, torch.full((), float("nan"), device=v.device), out)


def weighted_values(p: torch.Tensor, values, compiled: bool, chunk_tokens: int) -> torch.Tensor:
    """p [B, Hkv, g * n, T] times the history's values: [B, Hkv, g * n, D], float32."""
    out: Optional[torch.Tensor] = None
    offset = 0
    if values.quantized is not None:
        q = values.quantized
        if compiled:
            out = _weighted(p[..., :q.shape[TOKEN_AXIS]], dense(q), True)
        else:
            for start, stop in _chunks(q, chunk_tokens):
                part = _weighted(p[..., start:stop], dequantize(token_slice(q, start, stop), "float32"), False)
                out = part if out is None else out + part
        offset = q.shape[TOKEN_AXIS]
    if values.window is not None and values.window.shape[TOKEN_AXIS]:
        part = _weighted(p[..., offset:], values.window.to(torch.float32), compiled)
        out = part if out is None else out + part
    return out


def _attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
    b, hq, n, d = query.shape
    kv_heads = (keys.quantized if keys.quantized is not None else keys.window).shape[1]
    qg = _grouped(query.to(torch.float32), kv_heads)
    s = scores(qg, keys, compiled, chunk_tokens) * scale  # [B, Hkv, g * n, T]
    total = s.shape[-1]
    if mask is not None:
        m = torch.broadcast_to(mask.to(torch.float32), (b, hq, n, total))
        s = s + m.reshape(b, kv_heads, (hq // kv_heads) * n, total)
    if causal and n > 1:
        row = torch.arange(n, device=s.device).repeat(hq // kv_heads)
        visible = torch.arange(total, device=s.device)[None, :] <= (total - n + row)[:, None]
        s = torch.where(visible, s, torch.full((), float("-inf"), device=s.device))
    p = torch.softmax(s, dim=-1)
    out = weighted_values(p, values, compiled, chunk_tokens)
    return out.reshape(b, hq, n, d).to(query.dtype)


_COMPILED = {}


def _flat(side):
    """A History as tensors and static facts, so that a compiled graph is keyed on the
    format, not on the history's length (a QuantizedKV's shape is a Python tuple, which
    torch.compile would specialise on, recompiling at every decode step)."""
    q = side.quantized
    parts = None if q is None else (q.codes, q.scales, q.zeros)
    meta = None if q is None else (q.format, q.group_size, q.source_dtype, q.backend)
    return parts, side.window, meta


def _unflat(parts, window, meta, head_dim: int):
    from kvquant.attention import History

    if parts is None:
        return History(None, window)
    codes, scales, zeros = parts
    fmt, group, source, backend = meta
    shape = tuple(codes.shape[:-1]) + (head_dim,)
    return History(QuantizedKV(codes, scales, zeros, fmt, group, shape, source, backend), window)


def _compiled_attend(k_meta, v_meta, scale: float, causal: bool):
    """One compiled function per formats, scale and causality, which it holds as
    constants. As arguments, or as closure cells of one shared code object, torch.compile's
    automatic dynamic shapes made a group size that changed between compilations
    symbolic (g64 then g32), and the argument checks need it concrete: each key gets a
    code object of its own, which dynamo caches on its own."""
    key = (k_meta, v_meta, scale, causal)
    fn = _COMPILED.get(key)
    if fn is None:
        def core(query, k_parts, k_window, v_parts, v_window, mask):
            d = query.shape[-1]
            keys, values = _unflat(k_parts, k_window, k_meta, d), _unflat(v_parts, v_window, v_meta, d)
            return _attend(query, keys, values, scale, causal, mask, True, 0)

        code = core.__code__.replace(co_name=f"kvquant_attention_{len(_COMPILED)}")
        core = types.FunctionType(code, core.__globals__, code.co_name, None, core.__closure__)
        fn = _COMPILED[key] = torch.compile(core, fullgraph=True)
    return fn


def _mark_token_axes(*tensors):
    """The history's length changes every decode step: dynamic from the first compile."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2)


def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
    if compiled and not torch.compiler.is_compiling():
        k_parts, k_window, k_meta = _flat(keys)
        v_parts, v_window, v_meta = _flat(values)
        token_major = [t for t in (k_window, v_window) if t is not None]
        for parts in (k_parts, v_parts):
            if parts is not None:
                token_major += [parts[0]] + [p for p in parts[1:] if p is not None and p.dim() >= 2]
        _mark_token_axes(*token_major)
        return _compiled_attend(k_meta, v_meta, scale, causal)(query, k_parts, k_window, v_parts, v_window, mask)
    return _attend(query, keys, values, scale, causal, mask, compiled or torch.compiler.is_compiling(), chunk_tokens)
