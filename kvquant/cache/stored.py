"""How one side of a layer's cache is stored: its format (StoredFormat), its quantized
tokens in buffers that grow by doubling (GrowingStore) and its full-precision window
(Window). Buffers are made and filled with the operations of the arrays' runtime."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .._formats import FORMATS, FormatInfo
from .._ops import parse_static_scale
from .._registry import backend_for
from .._types import Format, QuantizedKV

TOKEN_AXIS = 2  # [batch, kv_heads, tokens, head_dim]


class CacheInputError(ValueError):
    """An append the cache refuses; the cache is left exactly as it was."""


@dataclass(frozen=True)
class StoredFormat:
    """How one side (keys or values) is stored: a kvquant format with its options, or
    ``format=None`` for full precision."""

    format: Optional[Format] = Format.INT8
    group_size: Optional[int] = None
    scale: Optional[float] = None  # FP8 per tensor: the static scale

    @classmethod
    def parse(cls, spec: Any) -> "StoredFormat":
        """None (full precision), a format name or Format, a dict of StoredFormat's
        fields, or a StoredFormat."""
        if isinstance(spec, StoredFormat):
            return spec.validated()
        if spec is None or spec == "none":
            return cls(None)
        if isinstance(spec, dict):
            return cls(Format.parse(spec.get("format", "int8")), spec.get("group_size"), spec.get("scale")).validated()
        return cls(Format.parse(spec)).validated()

    def validated(self) -> "StoredFormat":
        if self.format is None:
            return self
        info = FORMATS[self.format]
        group = info.resolve_group_size(self.group_size)
        scale = self.scale
        if info.static_scale:
            if scale is None:
                raise ValueError(
                    "fp8_per_tensor with a dynamic scale is not streamable: each append would get "
                    "a scale of its own. Give the cache a static scale (scale=...), e.g. one from "
                    "kvquant.cache.calibrate_fp8_scale(sample_keys), or use per-token 'fp8'")
            scale = parse_static_scale(scale)
        elif scale is not None:
            raise ValueError(f"a static scale applies only to fp8_per_tensor, not {self.format.value}")
        return StoredFormat(self.format, group, scale)

    @property
    def info(self) -> Optional[FormatInfo]:
        return None if self.format is None else FORMATS[self.format]

    def label(self) -> str:
        if self.format is None:
            return "none"
        if self.group_size:
            return f"{self.format.value}-g{self.group_size}"
        return self.format.value

    def bits_per_element(self, head_dim: int, source_bits: int) -> float:
        """Bits held per element of a quantized token (codes and parameters), or the
        source dtype's width for full precision."""
        if self.format is None:
            return float(source_bits)
        return self.info.bits_per_element(head_dim, self.group_size)


def calibrate_fp8_scale(*samples: Any) -> float:
    """A static FP8 per-tensor scale from sample keys or values (calibrate, then
    freeze): the spec's dynamic per-tensor scale, max |x| * R(448), of all samples
    together, as a Python float holding the float32 value."""
    import numpy as np

    scales = []
    for sample in samples:
        q = quantize_dense(sample, StoredFormat(Format.FP8_PER_TENSOR, None, None), dynamic_per_tensor=True)
        scales.append(float(np.asarray(backend_for(q.scales).runtime.to_numpy(q.scales))))
    if not scales:
        raise ValueError("calibrate_fp8_scale needs at least one sample")
    if any(math.isnan(s) for s in scales):
        raise ValueError("a calibration sample holds NaN or inf")
    return max(scales)


# A CPU tensor of fewer elements is quantized by the NumPy reference on its memory and
# the result handed back as tensors: the same bits (what the conformance suite checks of
# every backend), at a third of eager torch's cost at the sizes a cache quantizes while
# decoding, where torch's per-operation dispatch is the time (32 tokens of 3 heads of 64:
# INT8 50 against 184 us, INT4 86 against 287; even at about 1,900 tokens of that
# shape on 2 threads; docs/performance.md).
NUMPY_BELOW = 1 << 17


def quantize_dense(x: Any, stored: StoredFormat, on_nonfinite: str = "propagate", dynamic_per_tensor: bool = False):
    from ..api import quantize

    scale = None if dynamic_per_tensor else stored.scale
    rt = _small_cpu_tensor(x)
    if rt is not None:
        q = quantize(rt.to_numpy(x), stored.format, group_size=stored.group_size, scale=scale,
                     on_nonfinite=on_nonfinite)
        zeros = None if q.zeros is None else rt.from_numpy(q.zeros)
        return QuantizedKV(rt.from_numpy(q.codes), rt.from_numpy(q.scales), zeros, q.format, q.group_size, q.shape,
                           q.source_dtype, rt.name)
    return quantize(x, stored.format, group_size=stored.group_size, scale=scale, on_nonfinite=on_nonfinite)


def _small_cpu_tensor(x: Any):
    """The torch runtime, where ``x`` is a CPU tensor with fewer than NUMPY_BELOW
    elements and no autograd history to keep; otherwise None."""
    torch = sys.modules.get("torch")
    if (torch is None or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.layout != torch.strided
            or x.numel() >= NUMPY_BELOW or (x.requires_grad and torch.is_grad_enabled())):
        return None
    return backend_for(x).runtime


def token_major(ndim: int) -> Tuple[int, ...]:
    """The memory order of a store's buffers, outermost first: the token axis, then the
    others. The first L tokens are then a view whose strides do not depend on the
    capacity: torch.compile guards on strides, and a [batch, heads, capacity, ...]
    buffer recompiled the attention every time the capacity doubled."""
    return (TOKEN_AXIS,) + tuple(a for a in range(ndim) if a != TOKEN_AXIS)


def empty_token_major(ops, like, shape):
    return ops.empty_permuted(like, shape, token_major(len(shape)))


def buffer_ops(runtime):
    """The runtime, where it provides what a LayerCache's buffers need (protocols.Runtime,
    "cache buffers"); otherwise a TypeError."""
    if not hasattr(runtime, "empty_permuted"):
        raise TypeError(f"LayerCache holds NumPy arrays or torch tensors, not {runtime.name} arrays "
                        "(JAX: kvquant.cache.JaxLayerCache)")
    return runtime


def token_major_copy(ops, arr, capacity: Optional[int] = None):
    """A token-major buffer of ``capacity`` tokens (default: arr's) holding ``arr`` in
    its first ones."""
    tokens = arr.shape[TOKEN_AXIS] if capacity is None else capacity
    shape = tuple(arr.shape[:TOKEN_AXIS]) + (tokens,) + tuple(arr.shape[TOKEN_AXIS + 1:])
    buf = empty_token_major(ops, arr, shape)
    buf[:, :, :arr.shape[TOKEN_AXIS]] = arr
    return buf


# ----------------------------------------------------------------- stores
def per_tensor(part) -> bool:
    return len(part.shape) <= TOKEN_AXIS


def parse_residual(residual: Any) -> int:
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual must be a non-negative int, got {residual!r}")
    return residual


class GrowingStore:
    """The quantized tokens of one side: codes, scales and zeros along the token axis,
    in buffers that double when full (amortised O(1) per token). A sliding-window layer
    forgets its oldest tokens by moving ``start`` (whole blocks per channel); the live
    tokens move back to the front only when a write would pass the buffers' end."""

    def __init__(self, stored: StoredFormat):
        self.stored = stored
        self.arrays = None  # (codes, scales[, zeros]) buffers, or None before the first write
        self.start = 0  # the first live token's slot
        self.length = 0  # live tokens
        self.shape = None  # the quantized tensor's [batch, kv_heads, tokens, head_dim], tokens = length
        # view()'s last answer, until the next write or reorder: attention asks every
        # decode step, and with quantize_every > 1 the quantized part rarely changes.
        self._view = None

    def capacity(self) -> int:
        return 0 if self.arrays is None else self.arrays[0].shape[TOKEN_AXIS]

    def _tokens_per_row(self, i: int) -> int:
        """Tokens behind one row of part i along the token axis: 1, or G for the scales
        and zeros of a per-channel format (one row per block of G tokens)."""
        info = self.stored.info
        return self.stored.group_size if i > 0 and info.per_channel else 1

    def write(self, ops, q: QuantizedKV) -> None:
        self._view = None
        parts = (q.codes, q.scales) + ((q.zeros,) if q.zeros is not None else ())
        new = q.shape[TOKEN_AXIS]
        need = self.length + new
        if self.arrays is not None and self.start and self.start + need > self.capacity() and need <= self.capacity():
            self._to_front(ops)
        if self.arrays is None or self.start + need > self.capacity():
            # Per channel, capacities stay whole blocks: 2G at least, then doubled.
            floor = 2 * self.stored.group_size if self.stored.info.per_channel else 16
            grown = max(need, 2 * self.capacity(), floor)
            buffers = []
            for i, part in enumerate(parts):
                if per_tensor(part):  # one static scale for every token: kept as it is
                    buffers.append(part)
                    continue
                per = self._tokens_per_row(i)
                shape = tuple(part.shape[:TOKEN_AXIS]) + (grown // per,) + tuple(part.shape[TOKEN_AXIS + 1:])
                buf = empty_token_major(ops, part, shape)
                if self.arrays is not None and self.length:
                    buf[:, :, :self.length // per] = self._live(i)
                buffers.append(buf)
            self.arrays, self.start = tuple(buffers), 0
        end = self.start + self.length
        for i, (buf, part) in enumerate(zip(self.arrays, parts)):
            if not per_tensor(part):
                per = self._tokens_per_row(i)
                buf[:, :, end // per:(end + new) // per] = part
        self.length = need
        self.shape = tuple(q.shape[:TOKEN_AXIS]) + (need,) + tuple(q.shape[TOKEN_AXIS + 1:])

    def _live(self, i: int):
        per = self._tokens_per_row(i)
        return self.arrays[i][:, :, self.start // per:(self.start + self.length) // per]

    def _to_front(self, ops) -> None:
        """Move the live tokens to the buffers' first slots (a copy first: the two overlap)."""
        for i, buf in enumerate(self.arrays):
            if not per_tensor(buf):
                buf[:, :, :self.length // self._tokens_per_row(i)] = ops.copy(self._live(i))
        self.start = 0

    def forget(self, tokens: int) -> None:
        """Drop the oldest ``tokens`` (whole blocks per channel)."""
        self._view = None
        self.start, self.length = (self.start + tokens, self.length - tokens) if tokens < self.length else (0, 0)
        self.shape = None if self.shape is None else self.shape[:TOKEN_AXIS] + (self.length,) + self.shape[TOKEN_AXIS + 1:]

    def forgettable(self, tokens: int) -> int:
        """How many of the oldest ``tokens`` asked for this store can drop."""
        tokens = min(tokens, self.length)
        info = self.stored.info
        return tokens - tokens % self.stored.group_size if info is not None and info.per_channel else tokens

    def view(self, source_dtype: str, backend: str) -> Optional[QuantizedKV]:
        if not self.length:
            return None
        if self._view is not None and self._view.source_dtype == source_dtype and self._view.backend == backend:
            return self._view
        parts = [a if per_tensor(a) else self._live(i) for i, a in enumerate(self.arrays)]
        zeros = parts[2] if len(parts) == 3 else None
        self._view = QuantizedKV(parts[0], parts[1], zeros, self.stored.format, self.stored.group_size,
                                 self.shape, source_dtype, backend)
        return self._view

    def replace(self, arrays, shape) -> None:
        """New buffers (a reordered batch): the cached view goes with the old ones."""
        self.arrays, self.shape, self._view = arrays, shape, None


class Window:
    """The full-precision tokens of one side not (yet) quantized: the residual window,
    or every token of a side kept in full precision. A token-major buffer written in
    place: a decode step copies its one new token instead of the whole window (a concat
    per step read and wrote about 100 KB a side per layer for SmolLM2's 3 heads of 64
    and a 128-token window), and the view's strides do not depend on the capacity, so
    compiled attention does not recompile when the buffer grows. A window that shifts
    (tokens leaving it) moves its remaining tokens to the front once per quantize call."""

    def __init__(self, floor: int, holds: Optional[int] = None):
        self.floor = floor  # the least capacity: what the window holds between quantize calls
        self.holds = holds  # the most tokens it holds before some leave it (None: none ever leave)
        self.buffer = None
        self.length = 0
        # The most tokens it may hold after a write in place (none leaving, no growth):
        # LayerCache.append's decode step checks length + new <= bound, one comparison.
        # Every method that changes the buffer or what may leave sets it (_changed).
        self.bound = 0
        self._view = None  # view()'s last answer, until the next change

    def _changed(self) -> None:
        capacity = 0 if self.buffer is None else self.buffer.shape[TOKEN_AXIS]
        self.bound = capacity if self.holds is None else min(capacity, self.holds)
        self._view = None

    def write(self, arr, new: int) -> None:
        """Append ``new`` tokens in place: they fit the buffer and none leave (the caller's
        check: ``length + new <= bound``)."""
        self.buffer[:, :, self.length:self.length + new] = arr
        self.length += new
        self._view = None

    def view(self):
        if self.buffer is None:
            return None
        if self._view is None:
            self._view = self.buffer[:, :, :self.length]
        return self._view

    def followed_by(self, ops, arr, tokens: int, skip: int = 0):
        """``tokens`` of the window followed by ``arr``, from its ``skip``-th token on (read
        only: what leaves the window in this append, quantized before anything changes;
        ``skip``: the oldest ones a sliding window forgets instead)."""
        held = min(tokens, self.length - skip)
        if held == tokens and self.buffer is not None:
            return self.buffer[:, :, skip:skip + tokens]
        if not held:
            return arr[:, :, :tokens]
        return ops.concat([self.buffer[:, :, skip:skip + held], arr[:, :, :tokens - held]], TOKEN_AXIS)

    def advance(self, ops, arr, leaving: int) -> None:
        """Append ``arr`` and drop the first ``leaving`` tokens of the result."""
        new = arr.shape[TOKEN_AXIS]
        length = self.length + new - leaving
        if not leaving and self.buffer is not None and length <= self.buffer.shape[TOKEN_AXIS]:
            return self.write(arr, new)  # a decode step, between quantize calls
        kept, start = None, self.length
        if leaving:
            # The tokens that stay move to the front; a copy first, as source and
            # destination overlap.
            if leaving < self.length:
                kept = ops.copy(self.buffer[:, :, leaving:self.length])
            start = 0
        if self.buffer is None or length > self.buffer.shape[TOKEN_AXIS]:
            grown = max(length, self.floor, 2 * (0 if self.buffer is None else self.buffer.shape[TOKEN_AXIS]))
            shape = tuple(arr.shape[:TOKEN_AXIS]) + (grown,) + tuple(arr.shape[TOKEN_AXIS + 1:])
            buffer = empty_token_major(ops, arr, shape)
            if not leaving and self.length:
                buffer[:, :, :self.length] = self.buffer[:, :, :self.length]
            self.buffer = buffer
        if kept is not None:
            self.buffer[:, :, :kept.shape[TOKEN_AXIS]] = kept
            start = kept.shape[TOKEN_AXIS]
        skip = max(0, leaving - self.length)
        if new > skip:
            self.buffer[:, :, start:length] = arr[:, :, skip:]
        self.length = length
        self._changed()

    def replace(self, ops, arr) -> None:
        """Hold exactly ``arr`` (a reordered batch)."""
        self.length = arr.shape[TOKEN_AXIS]
        self.buffer = token_major_copy(ops, arr, max(self.length, self.floor))
        self._changed()

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
        self._changed()
