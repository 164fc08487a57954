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

Non-finite input: caches default to ``on_nonfinite="propagate"``. A NaN or inf token
is stored with a NaN scale and dequantizes to NaN, which is what an unquantized cache
would have handed attention; and "raise" would read the scales on the host at every
append, a device synchronisation per decode step on an accelerator.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from ._formats import FORMATS, FormatInfo
from ._ops import canonical_dtype_name, parse_group_size, parse_on_nonfinite, parse_static_scale
from ._registry import backend_for, get_backend
from ._types import Format, Int4GroupSize, QuantizedKV
from ._history import History

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
        group = self.group_size
        if info.group_sizes:
            group = parse_group_size(Int4GroupSize.default() if group is None else group)
        elif group is not None:
            raise ValueError(f"group_size applies only to the grouped formats (int4, int2, int4_per_channel, int2_per_channel), not {self.format.value}")
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
        q = _quantize_dense(sample, StoredFormat(Format.FP8_PER_TENSOR, None, None), dynamic_per_tensor=True)
        scales.append(float(np.asarray(backend_for(q.scales).runtime.to_numpy(q.scales))))
    if not scales:
        raise ValueError("calibrate_fp8_scale needs at least one sample")
    if any(math.isnan(s) for s in scales):
        raise ValueError("a calibration sample holds NaN or inf")
    return max(scales)


def _quantize_dense(x: Any, stored: StoredFormat, on_nonfinite: str = "propagate", dynamic_per_tensor: bool = False):
    from .api import quantize

    return quantize(x, stored.format, group_size=stored.group_size,
                    scale=None if dynamic_per_tensor else stored.scale, on_nonfinite=on_nonfinite)


# --------------------------------------------------------------- array ops
def _token_first(shape):
    """A store's buffer shape with the token axis moved to the front. The buffer is
    allocated that way and seen through a permuted view, so the first L tokens are a
    view whose strides do not depend on the capacity: torch.compile guards on strides,
    and a [batch, heads, capacity, ...] buffer recompiled the attention every time the
    capacity doubled."""
    return (shape[TOKEN_AXIS],) + tuple(shape[:TOKEN_AXIS]) + tuple(shape[TOKEN_AXIS + 1:])


def _token_back(ndim: int):
    return tuple(range(1, TOKEN_AXIS + 1)) + (0,) + tuple(range(TOKEN_AXIS + 1, ndim))


class _NumpyOps:
    def __init__(self):
        import numpy as np

        self.np = np

    def empty_token_major(self, like, shape):
        return self.np.empty(_token_first(shape), like.dtype).transpose(_token_back(len(shape)))

    def concat(self, arrays, axis):
        return self.np.concatenate(arrays, axis=axis)

    def copy(self, arr):
        return arr.copy()

    def take(self, arr, index, axis):
        return self.np.take(arr, self.np.asarray(index), axis=axis)

    def nbytes(self, arr) -> int:
        return int(arr.nbytes)

    def astype(self, arr, dtype):
        return arr.astype(dtype)


class _TorchOps:
    def __init__(self):
        import torch

        self.torch = torch

    def empty_token_major(self, like, shape):
        base = self.torch.empty(_token_first(shape), dtype=like.dtype, device=like.device)
        return base.permute(_token_back(len(shape)))

    def concat(self, arrays, axis):
        return self.torch.cat(arrays, dim=axis)

    def copy(self, arr):
        return arr.clone()

    def take(self, arr, index, axis):
        index = self.torch.as_tensor(index, device=arr.device)
        return arr.index_select(axis, index)

    def nbytes(self, arr) -> int:
        return arr.numel() * arr.element_size()

    def astype(self, arr, dtype):
        return arr.to(dtype)


def _array_ops(runtime_name: str):
    if runtime_name == "torch":
        return _TorchOps()
    if runtime_name in ("numpy",):
        return _NumpyOps()
    raise TypeError(f"LayerCache holds NumPy arrays or torch tensors, not {runtime_name} arrays "
                    "(JAX: kvquant.cache.JaxLayerCache)")


def _token_major_copy(ops, arr, capacity: Optional[int] = None):
    """A token-major buffer of ``capacity`` tokens (default: arr's) holding ``arr`` in
    its first ones."""
    tokens = arr.shape[TOKEN_AXIS] if capacity is None else capacity
    shape = tuple(arr.shape[:TOKEN_AXIS]) + (tokens,) + tuple(arr.shape[TOKEN_AXIS + 1:])
    buf = ops.empty_token_major(arr, shape)
    buf[:, :, :arr.shape[TOKEN_AXIS]] = arr
    return buf


# ----------------------------------------------------------------- stores
def _per_tensor(part) -> bool:
    return len(part.shape) <= TOKEN_AXIS


def _parse_residual(residual: Any) -> int:
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual must be a non-negative int, got {residual!r}")
    return residual


class _GrowingStore:
    """The quantized tokens of one side: codes, scales and zeros along the token axis,
    in buffers that double when full (amortised O(1) per token)."""

    def __init__(self, stored: StoredFormat):
        self.stored = stored
        self.arrays = None  # (codes, scales[, zeros]) buffers, or None before the first write
        self.length = 0
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
        if self.arrays is None or need > self.capacity():
            # Per channel, capacities stay whole blocks: 2G at least, then doubled.
            floor = 2 * self.stored.group_size if self.stored.info.per_channel else 16
            grown = max(need, 2 * self.capacity(), floor)
            buffers = []
            for i, part in enumerate(parts):
                if _per_tensor(part):  # one static scale for every token: kept as it is
                    buffers.append(part)
                    continue
                per = self._tokens_per_row(i)
                shape = tuple(part.shape[:TOKEN_AXIS]) + (grown // per,) + tuple(part.shape[TOKEN_AXIS + 1:])
                buf = ops.empty_token_major(part, shape)
                if self.arrays is not None and self.length:
                    buf[:, :, :self.length // per] = self.arrays[i][:, :, :self.length // per]
                buffers.append(buf)
            self.arrays = tuple(buffers)
        for i, (buf, part) in enumerate(zip(self.arrays, parts)):
            if not _per_tensor(part):
                per = self._tokens_per_row(i)
                buf[:, :, self.length // per:need // per] = part
        self.length = need
        self.shape = tuple(q.shape[:TOKEN_AXIS]) + (need,) + tuple(q.shape[TOKEN_AXIS + 1:])

    def view(self, source_dtype: str, backend: str) -> Optional[QuantizedKV]:
        if not self.length:
            return None
        if self._view is not None and self._view.source_dtype == source_dtype and self._view.backend == backend:
            return self._view
        parts = [a if _per_tensor(a) else a[:, :, :self.length // self._tokens_per_row(i)]
                 for i, a in enumerate(self.arrays)]
        zeros = parts[2] if len(parts) == 3 else None
        self._view = QuantizedKV(parts[0], parts[1], zeros, self.stored.format, self.stored.group_size,
                                 self.shape, source_dtype, backend)
        return self._view

    def replace(self, arrays, shape) -> None:
        """New buffers (a reordered batch): the cached view goes with the old ones."""
        self.arrays, self.shape, self._view = arrays, shape, None


class _Window:
    """The full-precision tokens of one side not (yet) quantized: the residual window,
    or every token of a side kept in full precision. A token-major buffer written in
    place: a decode step copies its one new token instead of the whole window (a concat
    per step read and wrote about 100 KB a side per layer for SmolLM2's 3 heads of 64
    and a 128-token window), and the view's strides do not depend on the capacity, so
    compiled attention does not recompile when the buffer grows. A window that shifts
    (tokens leaving it) moves its remaining tokens to the front once per quantize call."""

    def __init__(self, floor: int):
        self.floor = floor  # the least capacity: what the window holds between quantize calls
        self.buffer = None
        self.length = 0
        self._view = None  # view()'s last answer, until the next change

    def view(self):
        if self.buffer is None:
            return None
        if self._view is None:
            self._view = self.buffer[:, :, :self.length]
        return self._view

    def followed_by(self, ops, arr, tokens: int):
        """The first ``tokens`` of the window followed by ``arr`` (read only: what leaves
        the window in this append, quantized before anything changes)."""
        held = min(tokens, self.length)
        if held == tokens and self.buffer is not None:
            return self.buffer[:, :, :tokens]
        if not held:
            return arr[:, :, :tokens]
        return ops.concat([self.buffer[:, :, :held], arr[:, :, :tokens - held]], TOKEN_AXIS)

    def advance(self, ops, arr, leaving: int) -> None:
        """Append ``arr`` and drop the first ``leaving`` tokens of the result."""
        new = arr.shape[TOKEN_AXIS]
        length = self.length + new - leaving
        if not leaving and self.buffer is not None and length <= self.buffer.shape[TOKEN_AXIS]:
            self.buffer[:, :, self.length:length] = arr  # a decode step, between quantize calls
            self.length = length
            self._view = None
            return
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
            buffer = ops.empty_token_major(arr, shape)
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
        self._view = None

    def replace(self, ops, arr) -> None:
        """Hold exactly ``arr`` (a reordered batch)."""
        self.length = arr.shape[TOKEN_AXIS]
        self.buffer = _token_major_copy(ops, arr, max(self.length, self.floor))
        self._view = None

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
        self._view = None


class LayerCache:
    """A quantized KV cache for one attention layer (NumPy arrays or torch tensors).

    ``keys`` / ``values``: how each side is stored: a format name ("fp8", "int8",
    "int4", "fp8_per_tensor"), a dict ``{"format": "int4", "group_size": 32}`` or
    ``{"format": "fp8_per_tensor", "scale": s}``, a StoredFormat, or None to keep that
    side in full precision. ``residual``: how many of the most recent tokens stay in
    full precision (0 allowed). ``layer``: named in error messages.
    """

    def __init__(self, keys: Any = "int8", values: Any = "int8", *, residual: int = 128, layer: Any = 0,
                 on_nonfinite: str = "propagate", quantize_every: int = 1):
        self.formats = (StoredFormat.parse(keys), StoredFormat.parse(values))
        self.residual = _parse_residual(residual)
        if isinstance(quantize_every, bool) or not isinstance(quantize_every, int) or quantize_every < 1:
            raise ValueError(f"quantize_every must be a positive int, got {quantize_every!r}")
        # Tokens leave the window in batches of this many (the window holds residual to
        # residual + quantize_every - 1 tokens): one quantize call per batch instead of
        # one per decode step, the same stored bits (tokens are quantized independently).
        self.quantize_every = quantize_every
        self.layer = layer
        self.on_nonfinite = parse_on_nonfinite(on_nonfinite)
        self._stores = tuple(_GrowingStore(f) for f in self.formats)
        self._windows = tuple(_Window(self._window_floor(f)) for f in self.formats)
        self._signature = None  # (runtime, dtype, device, batch, kv_heads, head_dim) of the first append
        self._seen = None  # what _check last let through (types, dtypes, devices, layouts, shapes)
        self._ops = None
        self._backend = None

    def _window_floor(self, stored: StoredFormat) -> int:
        """What a side's window holds at most between the appends that quantize: its
        buffer's least capacity, so that decoding never grows it."""
        if stored.format is None:
            return 16
        if stored.info.per_channel:
            return self.residual + stored.group_size
        return self.residual + self.quantize_every

    # ------------------------------------------------------------ reading
    @property
    def seq_length(self) -> int:
        return self._stores[0].length + self._windows[0].length

    def __len__(self) -> int:
        return self.seq_length

    @property
    def signature(self) -> Optional[tuple]:
        """(framework, dtype, device, batch, kv_heads, head_dim) of the tokens held, or
        None before the first append."""
        return self._signature

    @property
    def batch_size(self) -> Optional[int]:
        return None if self._signature is None else self._signature[3]

    def quantized(self, side: str = "keys") -> Optional[QuantizedKV]:
        """The quantized tokens of a side as a QuantizedKV of views into the cache
        (None when nothing is quantized, or the side is kept in full precision)."""
        i = self._side_index(side)
        if self.formats[i].format is None or self._signature is None:
            return None
        return self._stores[i].view(self._signature[1], self._backend.name)

    def window(self, side: str = "keys"):
        """The full-precision tokens of a side (the residual window, or every token of a
        side kept in full precision): a view into the cache's buffer, which later appends
        overwrite (copy it to keep it)."""
        return self._windows[self._side_index(side)].view()

    @property
    def nbytes(self) -> int:
        """Bytes of every array the cache holds: codes, scales, zeros and the
        full-precision windows (whole buffers, spare capacity included)."""
        if self._ops is None:
            return 0
        total = 0
        for store, window in zip(self._stores, self._windows):
            total += sum(self._ops.nbytes(a) for a in store.arrays or ())
            total += 0 if window.buffer is None else self._ops.nbytes(window.buffer)
        return total

    def bytes_per_token(self) -> float:
        """Bytes per quantized token of this layer, keys and values, by the formats'
        formula (docs/cache.md): what a long history costs."""
        if self._signature is None:
            raise ValueError("the cache has not seen a token yet")
        _, dtype, _, batch, heads, head_dim = self._signature
        source_bits = 32 if dtype == "float32" else 16
        bits = sum(f.bits_per_element(head_dim, source_bits) for f in self.formats)
        per_tensor = sum(4 for f in self.formats if f.info is not None and f.info.params == "tensor")
        return batch * heads * head_dim * bits / 8 + per_tensor / max(1, self._stores[0].length)

    # ------------------------------------------------------------ writing
    def append(self, keys: Any, values: Any, out_dtype: Any = None, *, history: bool = True) -> Optional[Tuple[Any, Any]]:
        """Add new tokens ``[batch, kv_heads, new_tokens, head_dim]`` and return the whole
        history of keys and values, dequantized, then the residual window, in
        ``out_dtype`` (default: the input's dtype). A refused append changes nothing.
        ``history=False`` returns None instead: for attention that reads the codes
        (kvquant.attention.attend(query, *cache.attention_inputs())), which never needs
        the dequantized copy."""
        signature = self._check(keys, values)
        out = canonical_dtype_name(out_dtype) if out_dtype is not None else signature[1]
        if self._signature is None:
            self._signature = signature
            self._backend = backend_for(keys)
            self._ops = _array_ops(self._backend.runtime.name)
        staged = []
        for stored, window, arr in zip(self.formats, self._windows, (keys, values)):
            leaving = 0 if stored.format is None else max(0, window.length + arr.shape[TOKEN_AXIS] - self.residual)
            if leaving and stored.info.per_channel:
                # Whole blocks of G tokens only: the rest of the block waits, in full
                # precision, until it fills (the window holds R to R + G - 1 tokens).
                leaving -= leaving % stored.group_size
            elif leaving < self.quantize_every:
                leaving = 0
            q = None
            if leaving:  # may raise: nothing has changed yet
                q = _quantize_dense(window.followed_by(self._ops, arr, leaving), stored, self.on_nonfinite)
            staged.append((leaving, q))
        for store, window, arr, (leaving, q) in zip(self._stores, self._windows, (keys, values), staged):
            if q is not None:
                store.write(self._ops, q)
            window.advance(self._ops, arr, leaving)
        if not history:
            return None
        return tuple(self._history(i, out) for i in range(2))

    def attention_inputs(self):
        """(keys, values) as kvquant.attention.History: the quantized tokens and the
        full-precision window of each side, views into the cache's buffers for the
        attention of this step (the next append overwrites the windows' tokens)."""
        if self._signature is None:
            return History(), History()
        source, backend = self._signature[1], self._backend.name
        return tuple(History(None if stored.format is None else store.view(source, backend), window.view())
                     for stored, store, window in zip(self.formats, self._stores, self._windows))

    def _history(self, i: int, out_dtype: str):
        from .api import dequantize

        window = self._windows[i].view()
        rt = self._backend.runtime
        if window is not None and rt.dtype_name(window) != out_dtype:
            window = self._ops.astype(window, rt.dtype(out_dtype))
        stored = self.quantized(("keys", "values")[i])
        if stored is None:
            return window
        history = dequantize(stored, out_dtype)
        if window is None or window.shape[TOKEN_AXIS] == 0:
            return history
        return self._ops.concat([history, window], TOKEN_AXIS)

    def _check(self, keys: Any, values: Any):
        """Everything an append needs, checked before anything changes."""
        # A decode loop appends the same kind of tensors at every step: an append whose
        # types, dtypes, devices, layouts and shapes all equal those of the last append
        # that passed is let through without the checks below, paid per layer and step.
        try:
            seen = (type(keys), type(values), keys.dtype, values.dtype, getattr(keys, "device", None),
                    getattr(values, "device", None), getattr(keys, "layout", None), getattr(values, "layout", None),
                    tuple(keys.shape), tuple(values.shape))
        except AttributeError:
            seen = None
        if seen is not None and seen == self._seen:
            return self._signature
        signature = self._checked(keys, values)
        self._seen = seen
        return signature

    def _checked(self, keys: Any, values: Any):
        where = f"kvquant cache layer {self.layer}"
        signatures = []
        for what, arr in (("keys", keys), ("values", values)):
            try:
                backend = backend_for(arr)
            except TypeError:
                raise CacheInputError(f"{where}: {what} must be a NumPy array or torch tensor, got {type(arr).__name__}") from None
            rt = backend.runtime
            shape = tuple(rt.shape(arr))
            if len(shape) != 4:
                raise CacheInputError(f"{where}: {what} must be [batch, kv_heads, new_tokens, head_dim], got shape {shape}")
            dtype = rt.dtype_name(arr)
            if dtype not in ("float32", "float16", "bfloat16"):
                raise CacheInputError(f"{where}: {what} dtype {dtype} is not float32, float16 or bfloat16")
            signatures.append((rt.name, dtype, rt.device(arr), shape[0], shape[1], shape[3], shape))
        (k_sig, v_sig) = signatures
        if k_sig[:6] != v_sig[:6] or k_sig[6][2] != v_sig[6][2]:
            raise CacheInputError(f"{where}: keys {k_sig[6]} ({k_sig[1]}, {k_sig[2]}) and values {v_sig[6]} "
                                  f"({v_sig[1]}, {v_sig[2]}) disagree")
        signature = k_sig[:6]
        if self._signature is not None and signature != self._signature:
            names = ("framework", "dtype", "device", "batch", "kv_heads", "head_dim")
            diff = ", ".join(f"{n} {a!r} (cache: {b!r})" for n, a, b in zip(names, signature, self._signature) if a != b)
            raise CacheInputError(f"{where}: this append's {diff}; shapes keys {k_sig[6]}, values {v_sig[6]}")
        if self._signature is None:
            _array_ops(signature[0])  # refuses JAX before anything is set
            head_dim = signature[5]
            for f in self.formats:
                if f.group_size and f.group_size > head_dim and not f.info.per_channel:
                    warnings.warn(f"{where}: {f.format.value} groups of {f.group_size} on head_dim {head_dim}: every "
                                  f"token is one group of {head_dim}, the same as group_size={head_dim}", stacklevel=3)
                if f.info is not None and head_dim % f.info.codes_per_byte:
                    raise CacheInputError(f"{where}: {f.label()} packs {f.info.codes_per_byte} codes per byte; "
                                          f"head_dim {head_dim} is not a multiple of {f.info.codes_per_byte}")
        return signature

    def _side_index(self, side: str) -> int:
        if side not in ("keys", "values"):
            raise ValueError(f"side must be 'keys' or 'values', got {side!r}")
        return 0 if side == "keys" else 1

    # ------------------------------------------------------ generation helpers
    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens. Only tokens still in the residual window
        can be dropped (quantized ones cannot be un-quantized into it)."""
        if max_length < 0:
            max_length = self.seq_length + max_length
        if max_length >= self.seq_length:
            return
        quantized = max([store.length for store, f in zip(self._stores, self.formats) if f.format is not None],
                        default=0)
        if max_length < quantized:
            raise ValueError(f"cannot crop to {max_length} tokens: the first {quantized} are quantized; "
                             "crop inside the residual window only")
        for store, window in zip(self._stores, self._windows):
            window.crop(max_length - store.length)

    def reorder(self, beam_index: Any) -> None:
        """Reorder the batch (beam search): every stored array takes ``beam_index``."""
        for store in self._stores:
            if store.arrays is not None:
                taken = (a if _per_tensor(a) else _token_major_copy(self._ops, self._ops.take(a, beam_index, 0))
                         for a in store.arrays)
                store.replace(tuple(taken), (len(beam_index),) + store.shape[1:])
        for window in self._windows:
            if window.buffer is not None:
                window.replace(self._ops, self._ops.take(window.view(), beam_index, 0))
        if self._signature is not None:
            s = self._signature
            self._signature = s[:3] + (len(beam_index),) + s[4:]
            self._seen = None  # the batch changed: the next append is checked in full


# --------------------------------------------------------------------- JAX
def _placed(cache: "JaxLayerCache", sharding: Any, leading: Tuple[int, int]) -> "JaxLayerCache":
    """The cache with its per-token arrays over sharding's (batch, kv_heads) axes and its
    scalars replicated on the same mesh."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    spec = tuple(sharding.spec) + (None,) * 2
    if any(axis is not None for axis in spec[2:]):
        raise ValueError(f"sharding {sharding.spec} splits the token or head_dim axis; a cache is sharded over "
                         "batch and kv_heads only (its appends write token slots in place)")
    for what, size, axis in zip(("batch", "kv_heads"), leading, spec[:2]):
        names = axis if isinstance(axis, tuple) else (() if axis is None else (axis,))
        parts = 1
        for name in names:
            parts *= sharding.mesh.shape[name]
        if size % parts:
            raise ValueError(f"{what} {size} cannot be split over mesh axes {axis} ({parts} devices)")

    def place(a):
        spec_a = PartitionSpec(*spec[:2], *(None,) * (a.ndim - 2)) if a.ndim >= 2 else PartitionSpec()
        return jax.device_put(a, NamedSharding(sharding.mesh, spec_a))

    return jax.tree_util.tree_map(place, cache)


class JaxLayerCache:
    """A functional quantized KV cache for one layer, for JAX: a pytree of fixed
    capacity whose ``append`` returns a new cache, updated with dynamic_update_slice,
    so that a decode loop under jax.jit compiles once per new-token count.

        cache = JaxLayerCache.create(batch=1, kv_heads=8, head_dim=128, capacity=4096,
                                     keys="int8", values="int4", residual=128)
        cache, k_all, v_all, valid = jax.jit(JaxLayerCache.append)(cache, k_new, v_new)

    ``k_all`` / ``v_all`` are ``[batch, kv_heads, capacity + residual, head_dim]``: the
    quantized slots (dequantized) then the residual slots; ``valid`` ([capacity +
    residual] bools) marks the slots holding tokens, for the attention mask. Slot order
    is not token order across the two parts, which attention does not need (positions
    are in the keys already). ``capacity`` is the number of quantized token slots: it
    must hold every token that leaves the window plus one append's new tokens (an
    append writes all its new tokens' codes at once, the not-yet-leaving ones to be
    written again, identically, when they leave). With a concrete length, an append
    past that raises; under jit it cannot be checked.

    On a device mesh, ``sharding`` (a ``NamedSharding`` whose spec names the batch and
    kv_heads axes, e.g. ``P("batch", "heads")``) places every per-token array over those
    two axes and the scalars replicated; ``append`` under jit keeps that placement and
    the unsharded cache's bits, with no collective (docs/cache.md, "More than one device").
    """

    def __init__(self, stores, windows, length, formats, residual, capacity, dtype, layer=0):
        self.stores = stores      # per side: (codes, scales[, zeros]) with `capacity` token slots, or (values,)
        self.windows = windows    # per side: [batch, kv_heads, residual, head_dim] full precision
        self.length = length      # int32 scalar: tokens appended so far
        self.formats = formats
        self.residual = residual
        self.capacity = capacity
        self.dtype = dtype
        self.layer = layer

    def tree_flatten(self):
        return (self.stores, self.windows, self.length), (self.formats, self.residual, self.capacity, self.dtype, self.layer)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @classmethod
    def create(cls, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: Any = "float32", *,
               keys: Any = "int8", values: Any = "int8", residual: int = 128, layer: Any = 0,
               sharding: Any = None) -> "JaxLayerCache":
        import jax.numpy as jnp

        get_backend("jax").runtime.register_pytree(cls, cls.tree_flatten, cls.tree_unflatten)
        dtype = canonical_dtype_name(dtype)
        formats = (StoredFormat.parse(keys), StoredFormat.parse(values))
        residual = _parse_residual(residual)
        for f in formats:
            if f.info is not None and f.info.per_channel:
                raise ValueError(f"JaxLayerCache does not take per-channel formats ({f.format.value}) yet: its "
                                 "fixed slots quantize every token as it leaves the window, and a block of G tokens "
                                 "completes at a traced step; use LayerCache (NumPy, PyTorch) for per-channel keys")
        shape = (batch, kv_heads, capacity, head_dim)
        sample = jnp.zeros((batch, kv_heads, 0, head_dim), dtype)
        stores = []
        for f in formats:
            if f.format is None:
                stores.append((jnp.zeros(shape, dtype),))
                continue
            info = f.info
            codes = jnp.zeros(shape[:3] + (head_dim // info.codes_per_byte,), info.code_dtype)
            param_shape = info.param_shape(shape, f.group_size)
            if info.params == "tensor":
                params = (jnp.asarray(f.scale, jnp.float32),)
            else:
                params = (jnp.zeros(param_shape, jnp.float32),) * (2 if info.has_zeros else 1)
            stores.append((codes,) + params)
            _quantize_dense(sample, f)  # refuses a bad format/shape combination now
        windows = tuple(jnp.zeros((batch, kv_heads, residual, head_dim), dtype) for _ in formats)
        cache = cls(tuple(stores), windows, jnp.zeros((), jnp.int32), formats, residual, capacity, dtype, layer)
        return cache if sharding is None else _placed(cache, sharding, (batch, kv_heads))

    def append(self, keys: Any, values: Any, out_dtype: Any = None):
        """(new cache, keys history, values history, valid slots); see the class."""
        import jax
        import jax.numpy as jnp

        where = f"kvquant cache layer {self.layer}"
        new = keys.shape[TOKEN_AXIS]
        expected = self.windows[0].shape[:2] + (new,) + self.windows[0].shape[3:]
        for what, arr in (("keys", keys), ("values", values)):
            if tuple(arr.shape) != tuple(expected) or jnp.dtype(arr.dtype).name != self.dtype:
                raise CacheInputError(f"{where}: {what} {tuple(arr.shape)} {jnp.dtype(arr.dtype).name}, expected "
                                      f"{tuple(expected)} {self.dtype}")
        if new > self.capacity:
            raise CacheInputError(f"{where}: {new} new tokens exceed the capacity {self.capacity}")
        if not isinstance(self.length, jax.core.Tracer):
            length = int(self.length)
            if max(0, length + new - self.residual) - max(0, length - self.residual) and \
                    max(0, length - self.residual) + new > self.capacity:
                raise CacheInputError(f"{where}: the cache is full ({self.capacity} quantized slots; "
                                      f"{length} tokens held, {new} more asked for)")
        out = canonical_dtype_name(out_dtype) if out_dtype is not None else self.dtype
        R = self.residual
        L = self.length
        Q = jnp.maximum(L - R, 0)
        r = L - Q
        T = L + new
        Q2 = jnp.maximum(T - R, 0)
        k = Q2 - Q
        stores, windows, histories = [], [], []
        for f, store, window, arr in zip(self.formats, self.stores, self.windows, (keys, values)):
            buf = jnp.concatenate([window, jnp.zeros_like(arr)], axis=TOKEN_AXIS)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, arr, r, axis=TOKEN_AXIS)
            leaving = buf[:, :, :new]  # its first k tokens leave the window
            if f.format is None:
                parts = (leaving,)
            else:
                q = _quantize_dense(leaving, f)
                parts = (q.codes, q.scales) + ((q.zeros,) if q.zeros is not None else ())
            store = tuple(p if _per_tensor(p) else jax.lax.dynamic_update_slice_in_dim(s, p, Q, axis=TOKEN_AXIS)
                          for s, p in zip(store, parts))
            window = jax.lax.dynamic_slice_in_dim(buf, k, R, axis=TOKEN_AXIS)
            stores.append(store)
            windows.append(window)
        cache = JaxLayerCache(tuple(stores), tuple(windows), T.astype(jnp.int32), self.formats, R, self.capacity,
                              self.dtype, self.layer)
        for i in range(2):
            histories.append(cache.history(i, out))
        slots = jnp.arange(self.capacity + R)
        valid = jnp.where(slots < self.capacity, slots < Q2, slots - self.capacity < T - Q2)
        return cache, histories[0], histories[1], valid

    def quantized(self, side: str = "keys") -> Optional[QuantizedKV]:
        """Every quantized slot of a side as a QuantizedKV (capacity tokens; the first
        ``max(0, length - residual)`` hold tokens)."""
        i = 0 if side == "keys" else 1
        f = self.formats[i]
        if f.format is None:
            return None
        store = self.stores[i]
        shape = tuple(store[0].shape[:3]) + (self.windows[i].shape[3],)
        return QuantizedKV(store[0], store[1], store[2] if len(store) == 3 else None, f.format, f.group_size,
                           shape, self.dtype, "jax")

    def attention_inputs(self):
        """(keys, values, mask) for kvquant.attention.attend(q, keys, values, mask=mask,
        causal=False): every slot, quantized then window, and an additive mask that hides
        the empty ones (slot order is not token order, so causality is the caller's: a
        decode step of one new token needs none)."""
        import jax.numpy as jnp

        from ._history import History

        sides = tuple(History(self.quantized(side), self.windows[i]) if self.formats[i].format is not None
                      # a full-precision side's slots are plain values: one array, slots in the same order
                      else History(None, jnp.concatenate([self.stores[i][0], self.windows[i]], axis=TOKEN_AXIS))
                      for i, side in enumerate(("keys", "values")))
        R = self.residual
        Q = jnp.maximum(self.length - R, 0)
        slots = jnp.arange(self.capacity + R)
        valid = jnp.where(slots < self.capacity, slots < Q, slots - self.capacity < self.length - Q)
        return sides[0], sides[1], jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)

    def history(self, i: int, out_dtype: str):
        import jax.numpy as jnp

        from .api import dequantize

        q = self.quantized(("keys", "values")[i])
        stored = self.stores[i][0].astype(out_dtype) if q is None else dequantize(q, out_dtype)
        return jnp.concatenate([stored, self.windows[i].astype(out_dtype)], axis=TOKEN_AXIS)

    @property
    def nbytes(self) -> int:
        arrays = [a for store in self.stores for a in store] + list(self.windows)
        return int(sum(a.size * a.dtype.itemsize for a in arrays))
