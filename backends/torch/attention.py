"""kvquant.attention for PyTorch: eager (dequantize a chunk of tokens, multiply) and
compiled: on the CPU kvquant's C++ kernel (backends/cpu_kernel/), elsewhere, or where it
cannot be built, element-wise products and reductions that Inductor fuses with the
dequantization, so the codes are read once and nothing full-size is written.

Same function names as backends/jax/attention.py: attend, scores, weighted_values.
"""
from __future__ import annotations

import ctypes
import types
import weakref
from typing import List, Optional

import torch

from kvquant._formats import FORMATS
from kvquant._formulas import code_planes
from kvquant._history import token_slice
from kvquant._types import QuantizedKV
from kvquant.api import dequantize

from .graphs import AheadOfTimeGraph
from .kernels import e4m3_values, keeps_subnormals, unpack_codes

TOKEN_AXIS = -2


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
    lead = tuple(codes.shape[:-1])
    width = codes.shape[-1] * info.codes_per_byte
    values = unpack_codes(codes, info.codes_per_byte).to(torch.float32)
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


def _planes(codes: torch.Tensor, codes_per_byte: int):
    """Packed codes [..., T, D / k] as k float32 planes: plane i holds elements k*j + i.
    Widened to int32 first: Inductor's loops on uint8 lanes did not vectorise
    (docs/attention.md)."""
    return [p.to(torch.float32) for p in code_planes(codes.to(torch.int32), codes_per_byte)]


def compiled_scores(qg: torch.Tensor, q: QuantizedKV, subnormal_floats: bool = False) -> torch.Tensor:
    """q . dequant(k) for every token, [B, Hkv, G, T] (G = g * n query rows), as
    reductions over the codes with the scales and zeros taken out of the inner sums:
    per token  s[t] * sum_d q[d] c[t, d];
    per group  sum_g s[t, g] (sum_{d in g} q[d] c[t, d] - z[t, g] sum_{d in g} q[d]);
    per channel  sum_d (q[d] s[b, d]) c[t, d] - sum_d q[d] s[b, d] z[b, d], b = t // G."""
    info = FORMATS[q.format]
    if info.code_dtype != "uint8":
        c = e4m3_values(q.codes, subnormal_floats) if info.code_dtype == "float8_e4m3fn" else q.codes.to(torch.float32)
        raw = (qg[:, :, :, None, :] * c[:, :, None, :, :]).sum(-1)
        s = q.scales.to(torch.float32)
        return raw * (s if info.params == "tensor" else s[:, :, None, :])
    k = info.codes_per_byte
    planes = _planes(q.codes, k)
    b, h, rows, d = qg.shape
    lanes = [qg[..., i::k] for i in range(k)]  # [B, H, G, D / k] each
    if info.per_channel:
        g = q.group_size
        t = q.codes.shape[-2]
        s, z = q.scales.to(torch.float32), q.zeros.to(torch.float32)  # [B, H, T / g, D]
        qs = qg[:, :, :, None, :] * s[:, :, None, :, :]  # [B, H, G, blocks, D]: small
        offset = (qs * z[:, :, None, :, :]).sum(-1)  # [B, H, G, blocks]
        total = None
        for i in range(k):
            lane = qs[..., i::k]  # [B, H, G, blocks, D / k]
            plane = planes[i].reshape(b, h, t // g, g, d // k)
            part = (lane[:, :, :, :, None, :] * plane[:, :, None, :, :, :]).sum(-1)  # [B, H, G, blocks, g]
            total = part if total is None else total + part
        return (total - offset[..., None]).reshape(b, h, rows, t)
    g = q.group_size
    t = q.codes.shape[-2]
    s, z = q.scales.to(torch.float32), q.zeros.to(torch.float32)  # [B, H, T, groups]
    if d % g:
        return (qg[:, :, :, None, :] * dense(q)[:, :, None, :, :]).sum(-1)
    groups, per = d // g, g // k
    # One flat reduction per plane over all of its D / k codes, the scale inside the
    # product (as INT8's loop), the zeros apart. (The token axis outermost with the query
    # rows inside it, to widen each code once, was many times slower.)
    total = None
    for i in range(k):
        lane = lanes[i].reshape(b, h, rows, 1, groups, per)
        plane = planes[i].reshape(b, h, 1, t, groups, per)
        part = (lane * plane * s[:, :, None, :, :, None]).sum((-2, -1))  # [B, H, G, T]
        total = part if total is None else total + part
    qsum = qg.reshape(b, h, rows, 1, groups, g).sum(-1)  # [B, H, G, 1, groups]
    return total - (s[:, :, None] * z[:, :, None] * qsum).sum(-1)


def compiled_values(p: torch.Tensor, q: QuantizedKV, subnormal_floats: bool = False) -> torch.Tensor:
    """sum_t p[t] dequant(v)[t, d] with the scales and zeros folded into the weights
    (pe = p * s, zero where p is: a masked NaN never counts), [B, H, G, D]."""
    info = FORMATS[q.format]
    zero = torch.zeros((), device=p.device)
    live = p != 0
    if info.code_dtype != "uint8":
        c = e4m3_values(q.codes, subnormal_floats) if info.code_dtype == "float8_e4m3fn" else q.codes.to(torch.float32)
        s = q.scales.to(torch.float32)
        pe = torch.where(live, p * (s if info.params == "tensor" else s[:, :, None, :]), zero)  # [B, H, G, T]
        return (pe[..., :, None] * c[:, :, None, :, :]).sum(-2)
    if info.per_channel or q.codes.shape[-1] * info.codes_per_byte % q.group_size:
        v = dense(q)
        return torch.where(live[..., :, None], p[..., :, None] * v[:, :, None, :, :], zero).sum(-2)
    k = info.codes_per_byte
    planes = _planes(q.codes, k)
    b, h, rows, t = p.shape
    d = q.codes.shape[-1] * k
    g = q.group_size
    groups, per = d // g, g // k
    s, z = q.scales.to(torch.float32), q.zeros.to(torch.float32)  # [B, H, T, groups]
    pe = torch.where(live[..., None], p[..., None] * s[:, :, None], zero)  # [B, H, G, T, groups]
    offset = (pe * z[:, :, None]).sum(-2)  # [B, H, G, groups]
    outs = []
    for i in range(k):
        plane = planes[i].reshape(b, h, 1, t, groups, per)
        outs.append((pe[..., None] * plane).sum(-3) - offset[..., None])  # [B, H, G, groups, per]
    return torch.stack(outs, dim=-1).reshape(b, h, rows, d)


def _grouped_mask(mask: torch.Tensor, query_shape, kv_heads: int, total: int) -> torch.Tensor:
    """An additive mask, broadcastable to [B, Hq, n, T], as float32 [B, Hkv, g * n, T]:
    the rows of the grouped query (_grouped)."""
    b, hq, n, _ = query_shape
    m = torch.broadcast_to(mask.to(torch.float32), (b, hq, n, total))
    return m.reshape(b, kv_heads, (hq // kv_heads) * n, total)


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, n, D] as [B, Hkv, g * n, D]: the g query heads sharing a KV head."""
    b, hq, n, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * n, d)


def scores(qg: torch.Tensor, keys, compiled: bool, chunk_tokens: int, subnormal_floats: bool = False) -> torch.Tensor:
    """q . k for every token of the history, [B, Hkv, g * n, T], float32."""
    parts: List[torch.Tensor] = []
    if keys.quantized is not None:
        q = keys.quantized
        if compiled:
            parts.append(compiled_scores(qg, q, subnormal_floats))
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


def weighted_values(p: torch.Tensor, values, compiled: bool, chunk_tokens: int,
                    subnormal_floats: bool = False) -> torch.Tensor:
    """p [B, Hkv, g * n, T] times the history's values: [B, Hkv, g * n, D], float32."""
    out: Optional[torch.Tensor] = None
    offset = 0
    if values.quantized is not None:
        q = values.quantized
        if compiled:
            out = compiled_values(p[..., :q.shape[TOKEN_AXIS]], q, subnormal_floats)
        else:
            for start, stop in _chunks(q, chunk_tokens):
                part = _weighted(p[..., start:stop], dequantize(token_slice(q, start, stop), "float32"), False)
                out = part if out is None else out + part
        offset = q.shape[TOKEN_AXIS]
    if values.window is not None and values.window.shape[TOKEN_AXIS]:
        part = _weighted(p[..., offset:], values.window.to(torch.float32), compiled)
        out = part if out is None else out + part
    return out


def _causally_visible(rows: torch.Tensor, n: int, total: int) -> torch.Tensor:
    """[rows, total] bool: query row r (the r-th of the n newest tokens of a history of
    `total`) sees the tokens up to its own position."""
    return torch.arange(total, device=rows.device)[None, :] <= (total - n + rows)[:, None]


def _attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int,
            subnormal_floats: bool = False):
    b, hq, n, d = query.shape
    kv_heads = (keys.quantized if keys.quantized is not None else keys.window).shape[1]
    qg = _grouped(query.to(torch.float32), kv_heads)
    s = scores(qg, keys, compiled, chunk_tokens, subnormal_floats) * scale  # [B, Hkv, g * n, T]
    total = s.shape[-1]
    if mask is not None:
        m = _grouped_mask(mask, query.shape, kv_heads, total)
        s = torch.where(m == float("-inf"), m, s + m)  # a hidden token's NaN key stays hidden
    if causal and n > 1:
        visible = _causally_visible(torch.arange(n, device=s.device).repeat(hq // kv_heads), n, total)
        s = torch.where(visible, s, torch.full((), float("-inf"), device=s.device))
    p = torch.softmax(s, dim=-1)
    out = weighted_values(p, values, compiled, chunk_tokens, subnormal_floats)
    return out.reshape(b, hq, n, d).to(query.dtype)


_COMPILED = {}


def reset_compiled() -> None:
    """Forget the compiled attention functions and torch.compile's caches (after
    torch._dynamo.reset() alone, the first call of a function already made would not
    mark the token axes dynamic: attend marks them only when it makes the function)."""
    _COMPILED.clear()
    torch._dynamo.reset()


def _flat(side):
    """A History as tensors and static facts, so that a compiled graph is keyed on the
    format, not on the history's length (a QuantizedKV's shape is a Python tuple, which
    torch.compile would specialise on, recompiling at every decode step). Tensors go
    detached: the same storage, strides and offset without the view relation, as
    torch.compile traces a view through its base and guards on the base's size, so a
    cache's views into a growing buffer recompiled the attention whenever the capacity
    changed."""
    q, window = side.quantized, side.window
    if window is not None:
        window = window.detach()
    if q is None:
        return None, window, None
    return _detached(q), window, (q.format, q.group_size, q.source_dtype, q.backend)


def _memo(table: dict, q: QuantizedKV, make):
    """make(q), once per QuantizedKV for as long as it lives: a cache hands the same one
    to every decode step until its next quantize call."""
    entry = table.get(id(q))
    if entry is not None and entry[0]() is q:
        return entry[1]
    value = make(q)
    key = id(q)
    table[key] = (weakref.ref(q, lambda _, key=key: table.pop(key, None)), value)
    return value


_DETACHED: dict = {}  # id(QuantizedKV) -> (a weak reference to it, its arrays detached)


def _detached(q: QuantizedKV):
    """q's arrays detached, kept for as long as q lives: paid once, not per layer call."""
    return _memo(_DETACHED, q, lambda q: (q.codes.detach(), q.scales.detach(),
                                          None if q.zeros is None else q.zeros.detach()))


def _unflat(parts, window, meta, head_dim: int):
    from kvquant._history import History

    if parts is None:
        return History(None, window)
    codes, scales, zeros = parts
    fmt, group, source, backend = meta
    shape = tuple(codes.shape[:-1]) + (head_dim,)
    return History(QuantizedKV(codes, scales, zeros, fmt, group, shape, source, backend), window)


def _guards_on_arguments(constants):
    """torch.compile's guard filter for a compiled attention function: every guard on
    its arguments (tensor shapes, strides and dtypes, the mask's presence) and on global
    state (grad mode, default device) is kept. Dropped: the guards on module globals
    (kvquant's own functions and tables, torch's), whose code nothing is meant to patch
    while it runs, and those on ``constants``, the function's closure (formats, scale,
    causality), which no call can change: each function is made for one set of them.
    A cost paid per layer call in a model's decode step (docs/attention.md)."""
    def keep(entries):
        return [(not e.is_global or e.guard_type in ("GLOBAL_STATE", "SHAPE_ENV"))
                and e.name.split("[")[0].split(".")[0] not in constants for e in entries]

    return keep


def _compiled_attend(k_meta, v_meta, scale: float, causal: bool, subnormal_floats: bool = False):
    """One compiled function per formats, scale, causality and FP8 reading
    (e4m3_values), which it holds as constants. As arguments, or as closure cells of one shared code object, torch.compile's
    automatic dynamic shapes made a group size that changed between compilations
    symbolic (g64 then g32), and the argument checks need it concrete: each key gets a
    code object of its own, which dynamo caches on its own."""
    key = (k_meta, v_meta, scale, causal, subnormal_floats)
    fn = _COMPILED.get(key)
    if fn is None:
        def core(query, k_parts, k_window, v_parts, v_window, mask):
            d = query.shape[-1]
            keys, values = _unflat(k_parts, k_window, k_meta, d), _unflat(v_parts, v_window, v_meta, d)
            return _attend(query, keys, values, scale, causal, mask, True, 0, subnormal_floats)

        code = core.__code__.replace(co_name=f"kvquant_attention_{len(_COMPILED)}")
        core = types.FunctionType(code, core.__globals__, code.co_name, None, core.__closure__)
        fn = _COMPILED[key] = _AheadOfTime(torch.compile(
            core, fullgraph=True, options={"guard_filter_fn": _guards_on_arguments(set(code.co_freevars))}))
    return fn


AHEAD_OF_TIME = True  # False: every call through Dynamo (tests compare the two)


class _AheadOfTime:
    """A compiled attention function called without Dynamo's per-call work where torch
    allows it. On the first call whose history axes are all at least 2 tokens long
    (Dynamo specialises lengths 0 and 1), the function is compiled ahead of time
    (torch.compile's aot_compile) for calls like that one, instead of by Dynamo: the
    same graph and the same guards, but a later call is the graph's own function after
    one check of those guards in C++, cheaper than Dynamo's frame evaluation in a
    model's decode step (docs/attention.md).

    A call that fails every check (a mask, another dtype, a history past 4,096 tokens,
    where Inductor changes how it sums) goes to Dynamo, which compiles what it needs as
    before; after MISSES_BEFORE_ANOTHER such calls the next one is compiled ahead of
    time as well (at most MAX_GRAPHS per function), so a decode loop that crosses into
    another regime leaves Dynamo again. Where this torch has no aot_compile, or it
    fails, Dynamo serves every call."""

    MAX_GRAPHS = 4
    MISSES_BEFORE_ANOTHER = 8

    def __init__(self, dynamo):
        self.dynamo = dynamo
        self.graphs: List[AheadOfTimeGraph] = []  # newest first
        self.misses = 0
        self.closed = not AHEAD_OF_TIME

    def __call__(self, *args):
        for graph in self.graphs:
            if graph.accepts(args):
                return graph.fn(*args)
        if (not self.closed and (not self.graphs or self.misses >= self.MISSES_BEFORE_ANOTHER)
                and _long_enough(args)):
            made = _ahead_of_time(self.dynamo, args)
            self.misses = 0
            if made is not None:
                self.graphs.insert(0, made)
                self.closed = len(self.graphs) >= self.MAX_GRAPHS
                return made.fn(*args)
            self.closed = True
        self.misses += 1
        return self.dynamo(*args)


def _history_tensors(args):
    """The windows and quantized parts among a compiled function's arguments (query,
    k_parts, k_window, v_parts, v_window, mask)."""
    _, k_parts, k_window, v_parts, v_window, _ = args
    return [t for t in (k_window, v_window, *(k_parts or ()), *(v_parts or ())) if t is not None]


def _long_enough(args) -> bool:
    return all(t.shape[2] >= 2 for t in _history_tensors(args) if t.dim() >= 3)


def _ahead_of_time(dynamo, args):
    _mark_token_axes(*_history_tensors(args))
    return AheadOfTimeGraph.compile(dynamo, args)


def _mark_token_axes(*tensors):
    """The history's length changes every decode step: dynamic from the first compile
    (later compiles of the same function keep it dynamic, marked or not).
    Axis 2 of [B, H, T, D] codes and windows and of [B, H, T(, groups)] scales and zeros
    (a per-tensor scale has none). Counting from the end marked the heads of INT8's
    [B, H, T] scales instead, and the codes' length was then fixed to the scales'."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() >= 3:
            torch._dynamo.maybe_mark_dynamic(t, 2)


def _dense_history(side) -> torch.Tensor:
    parts = []
    if side.quantized is not None:
        parts.append(dense(side.quantized))
    if side.window is not None and side.window.shape[TOKEN_AXIS]:
        parts.append(side.window.to(torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=TOKEN_AXIS)


def prefill(query, keys, values, scale: float, causal: bool, mask) -> Optional[torch.Tensor]:
    """Several query tokens at once (a prompt, a chunk): the history dequantized once,
    for this call only, and torch's scaled_dot_product_attention. The reductions over
    the codes are built for decode's single query row, many times slower for a prompt
    (docs/attention.md). None where the history holds a NaN: SDPA lets a NaN
    reach rows that never see it (a masked score, a zero weight times NaN), and the
    chunked paths keep the spec's rule (see _weighted)."""
    k, v = _dense_history(keys), _dense_history(values)
    if bool(torch.isnan(k).any()) or bool(torch.isnan(v).any()):
        return None
    b, hq, n, d = query.shape
    total = k.shape[TOKEN_AXIS]
    if causal and mask is None and n == total:
        # A prompt with no history before it: SDPA's own causal path, which skips the
        # hidden half; a bias matrix cannot (docs/performance.md).
        return torch.nn.functional.scaled_dot_product_attention(
            query.to(torch.float32), k, v, is_causal=True, scale=scale, enable_gqa=hq != k.shape[1]).to(query.dtype)
    bias = None
    if mask is not None:
        bias = torch.broadcast_to(mask.to(torch.float32), (b, hq, n, total))
    if causal:
        visible = _causally_visible(torch.arange(n, device=k.device), n, total)
        hidden = torch.where(visible, torch.zeros((), device=k.device), torch.full((), float("-inf"), device=k.device))
        bias = hidden if bias is None else bias + hidden
    out = torch.nn.functional.scaled_dot_product_attention(
        query.to(torch.float32), k, v, attn_mask=bias, scale=scale, enable_gqa=hq != k.shape[1])
    if mask is not None:
        # A row whose every score is masked has no softmax (0/0): NaN, as on every other
        # path and in the reference. SDPA on the CPU returns zeros there.
        dead = torch.isneginf(bias).all(-1, keepdim=True)
        out = torch.where(dead, torch.full((), float("nan"), device=out.device), out)
    return out.to(query.dtype)


def _kernel_codes(q: QuantizedKV):
    """The CPU kernel's Side for a quantized history's codes (its window fields left to
    each call), or None where the kernel does not read this layout or device."""
    from .. import cpu_kernel

    side_format = cpu_kernel.side_format(q)
    codes, scales, zeros = q.codes, q.scales, q.zeros
    arrays = (codes, scales) if zeros is None else (codes, scales, zeros)
    if (side_format is None or not all(_on_cpu(t) for t in arrays) or codes.dim() != 4 or codes.stride(-1) != 1
            or scales.dtype != torch.float32 or (zeros is not None and zeros.dtype != torch.float32)):
        return None
    s = cpu_kernel.Side()
    s.kind, s.bits, s.group = side_format
    if s.kind == cpu_kernel.INT8_TOKEN or s.kind == cpu_kernel.FP8_TOKEN:
        s.scales_b, s.scales_h, s.scales_t = scales.stride()
    elif s.kind != cpu_kernel.FP8_TENSOR:
        if scales.stride(-1) != 1 or zeros.stride(-1) != 1:
            return None
        s.scales_b, s.scales_h, s.scales_t, _ = scales.stride()
        s.zeros_b, s.zeros_h, s.zeros_t, _ = zeros.stride()
        s.zeros = zeros.data_ptr()
    s.tokens = codes.shape[2]
    s.codes = codes.data_ptr()
    s.codes_b, s.codes_h, s.codes_t, _ = codes.stride()
    s.scales = scales.data_ptr()
    return s


_KERNEL_CODES: dict = {}  # id(QuantizedKV) -> (a weak reference to it, its _kernel_codes)


def _kernel_side(side, into) -> Optional[tuple]:
    """A History into the kernel's Side ``into``: (the tensors it points into that the
    caller must keep alive for the call, whether they are the history's own), or None
    where the kernel does not read it. Not its own: a window converted here."""
    keep, own = [], True
    if side.quantized is not None:
        codes = _memo(_KERNEL_CODES, side.quantized, _kernel_codes)
        if codes is None:
            return None
        ctypes.memmove(ctypes.addressof(into), ctypes.addressof(codes), ctypes.sizeof(codes))
    window = side.window
    if window is not None:  # an empty one too: a kept Problem's window fills later
        if not _on_cpu(window):
            return None
        if window.dtype not in (torch.float32, torch.bfloat16):
            window, own = window.to(torch.float32), False
        if window.stride(-1) != 1:
            window, own = window.contiguous(), False
        keep.append(window)
        into.window, into.window_bf16, into.win = window.shape[2], window.dtype == torch.bfloat16, window.data_ptr()
        into.win_b, into.win_h, into.win_t, _ = window.stride()
    return keep, own


def _on_cpu(t: torch.Tensor) -> bool:
    """Memory the kernel can read through a pointer: the CPU's, strided."""
    return t.device.type == "cpu" and t.layout == torch.strided


CPU_KERNEL = True  # False: the compiled path never uses the CPU kernel (tests compare the two)


def _buffer(window):
    """What a window is a view of (itself where it is none): a cache's window views
    share one buffer from step to step. The root of the views (torch's _base): a
    window's buffer may itself be a view (a token-major layout)."""
    return None if window is None else (window._base if window._base is not None else window)


class KernelCall:
    """Attention by the CPU kernel (backends/cpu_kernel/) for one layer, its Problem
    kept from one decode step to the next. A cache hands attention the same quantized
    views until its next quantize call, and window views at the start of the same
    buffers until they grow, so a step that finds them sets only what moves: the
    windows' lengths, the query, the output. In a model's decode step the layer's
    weights have just passed through the CPU's caches and every Python operation runs
    cold: building the Problem afresh cost about 125 us per layer call in generate
    (docs/performance.md). One instance per layer, for windows that are views at the
    start of their buffers (a LayerCache's); ``cpu_kernel_attend`` makes one per call."""

    __slots__ = ("problem", "sides", "sources", "keep", "fn", "decode_form", "decode_buffers")

    def __init__(self):
        self.problem = self.sides = self.sources = self.keep = self.fn = None
        # (query shape, dtype, scale, output shape) of the last call, when it was one
        # decode step (one query token, no mask) on a kept Problem: what decode() may
        # repeat; and the buffers decode() last found to be the Problem's.
        self.decode_form = self.decode_buffers = None

    def __reduce__(self):  # a copied or pickled cache's layers build their own (ctypes pointers do not copy)
        return KernelCall, ()

    def _build(self, keys, values, sources) -> bool:
        from .. import cpu_kernel

        self.problem = self.sides = self.sources = self.keep = self.decode_form = self.decode_buffers = None
        self.fn = cpu_kernel.load()
        if self.fn is None:
            return False
        problem = cpu_kernel.Problem()  # chunk 0: the kernel's own work split
        k, v = _kernel_side(keys, problem.keys), _kernel_side(values, problem.values)
        if k is None or v is None:
            return False
        self.problem, self.keep = problem, (k[0], v[0])
        self.sides = (problem.keys, problem.values)  # views into problem: made once, not per step
        # a converted window is this step's copy: the next step converts again
        self.sources = sources if k[1] and v[1] else None
        return True

    def __call__(self, query, keys, values, scale: float, causal: bool, mask) -> Optional[torch.Tensor]:
        """The output [B, Hq, n, D], or None where the kernel does not apply: not the
        CPU, autograd recording, a layout it does not read, or no kernel built here."""
        if (not CPU_KERNEL or not _on_cpu(query) or (query.requires_grad and torch.is_grad_enabled())
                or (mask is not None and not _on_cpu(mask))):
            return None
        kw, vw = keys.window, values.window
        sources, held = (keys.quantized, values.quantized, _buffer(kw), _buffer(vw)), self.sources
        if (held is not None and sources[0] is held[0] and sources[1] is held[1] and sources[2] is held[2]
                and sources[3] is held[3]):
            problem = self.problem
            problem.keys.window = 0 if kw is None else kw.shape[2]
            problem.values.window = 0 if vw is None else vw.shape[2]
        elif self._build(keys, values, sources):
            problem = self.problem
        else:
            return None
        b, hq, n, d = query.shape
        kv_heads = problem.heads = (keys.quantized if keys.quantized is not None else kw).shape[1]
        # [B, Hq, n, D] contiguous is the grouped query [B, Hkv, g * n, D] the kernel reads
        qg = query if query.dtype == torch.float32 else query.to(torch.float32)
        if not qg.is_contiguous():
            qg = qg.contiguous()
        problem.query, problem.batch, problem.rows, problem.dim = qg.data_ptr(), b, (hq // kv_heads) * n, d
        problem.scale = scale
        if mask is not None:
            total = problem.keys.tokens + problem.keys.window
            mask = _grouped_mask(mask, query.shape, kv_heads, total).contiguous()
            problem.mask = mask.data_ptr()
        else:
            problem.mask = None
        problem.new_tokens, problem.causal = n, causal and n > 1
        out = torch.empty((b, hq, n, d), dtype=torch.float32)  # the memory of [B, Hkv, g * n, D]
        problem.out = out.data_ptr()
        failed = self.fn(problem)
        problem.query = problem.out = problem.mask = None  # nothing dangles between calls
        if failed:
            self.decode_form = None
            return None
        # a Problem kept for the next step (no window converted here): decode may repeat it
        kept = n == 1 and mask is None and self.sources is not None
        self.decode_form = (query.shape, query.dtype, scale, (b, 1, hq, d)) if kept else None
        return out if query.dtype == torch.float32 else out.to(query.dtype)

    def decode(self, query, scale: float, buffers) -> Optional[torch.Tensor]:
        """The next decode step of a layer whose last step __call__ served on a kept
        Problem: ``buffers`` as LayerCache.attention_buffers gives them. The output as
        [B, 1, Hq, D] (the memory of [B, Hq, 1, D]: transformers' attention layout, no
        transpose to make), or None where the step is not like the last (other
        buffers: a quantize call or growth since; another query shape, dtype or scale),
        which __call__ then serves. Only what moves is set, without the Histories'
        views or __call__'s checks: in generate each Python operation here runs cold,
        per layer and step."""
        form = self.decode_form
        if (form is None or not CPU_KERNEL or query.shape != form[0] or query.dtype is not form[1]
                or scale != form[2] or not query.is_cpu or query.layout is not torch.strided
                or (query.requires_grad and torch.is_grad_enabled())):
            return None
        seen = self.decode_buffers
        if (seen is None or buffers[0] is not seen[0] or buffers[1] is not seen[1] or buffers[2] is not seen[2]
                or buffers[3] is not seen[3]):
            held = self.sources
            if (buffers[0] is not held[0] or buffers[1] is not held[1] or _buffer(buffers[2]) is not held[2]
                    or _buffer(buffers[3]) is not held[3]):
                return None
            self.decode_buffers = buffers[:4]
        qg = query if form[1] is torch.float32 else query.to(torch.float32)
        if not qg.is_contiguous():
            qg = qg.contiguous()
        problem, (keys, values) = self.problem, self.sides
        keys.window, values.window = buffers[4], buffers[5]
        problem.query = qg.data_ptr()
        out = torch.empty(form[3], dtype=torch.float32)
        problem.out = out.data_ptr()
        failed = self.fn(problem)
        problem.query = problem.out = None
        if failed:
            self.decode_form = None
            return None
        return out if form[1] is torch.float32 else out.to(form[1])


def cpu_kernel_attend(query, keys, values, scale: float, causal: bool, mask) -> Optional[torch.Tensor]:
    """Attention by the CPU kernel (backends/cpu_kernel/), or None where it does not apply
    (KernelCall.__call__)."""
    return KernelCall()(query, keys, values, scale, causal, mask)


def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int,
           kernel_call: Optional[KernelCall] = None):
    """``kernel_call``: one layer's KernelCall, kept by the caller between decode steps."""
    if query.shape[TOKEN_AXIS] > 1 and not torch.compiler.is_compiling():
        out = prefill(query, keys, values, scale, causal, mask)
        if out is not None:
            return out
    if compiled and not torch.compiler.is_compiling():
        out = (kernel_call or KernelCall())(query, keys, values, scale, causal, mask)
        if out is not None:
            return out
        k_parts, k_window, k_meta = _flat(keys)
        v_parts, v_window, v_meta = _flat(values)
        fp8 = any(meta is not None and FORMATS[meta[0]].code_dtype == "float8_e4m3fn" for meta in (k_meta, v_meta))
        key = (k_meta, v_meta, scale, causal, fp8 and keeps_subnormals(query.device))
        args = (query, k_parts, k_window, v_parts, v_window, mask)
        if key not in _COMPILED:  # marking costs per tensor, per layer and step
            _mark_token_axes(*_history_tensors(args))
        if query.shape[TOKEN_AXIS] > 1:  # chunks of any length share a graph; one token has its own
            _mark_token_axes(query)
        return _compiled_attend(*key)(*args)
    return _attend(query, keys, values, scale, causal, mask, compiled or torch.compiler.is_compiling(), chunk_tokens)
