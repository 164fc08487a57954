"""LayerCache: one attention layer's quantized KV cache for NumPy arrays and torch
tensors (see the package's docstring)."""
from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

from .._history import History
from .._ops import canonical_dtype_name, parse_on_nonfinite
from .._registry import backend_for, get_backend
from .._types import QuantizedKV
from .stored import (TOKEN_AXIS, CacheInputError, GrowingStore, StoredFormat, Window, buffer_ops, parse_residual,
                     per_tensor, quantize_dense, token_major_copy)


class LayerCache:
    """A quantized KV cache for one attention layer (NumPy arrays or torch tensors).

    ``keys`` / ``values``: how each side is stored: a format name ("fp8", "int8",
    "int4", "fp8_per_tensor"), a dict ``{"format": "int4", "group_size": 32}`` or
    ``{"format": "fp8_per_tensor", "scale": s}``, a StoredFormat, or None to keep that
    side in full precision. ``residual``: how many of the most recent tokens stay in
    full precision (0 allowed). ``layer``: named in error messages.

    ``sliding_window``: a layer that attends to the last W tokens only (a sliding-window
    or chunked layer; transformers' convention: W - 1 tokens kept between steps, plus the
    new ones). Before an append the cache forgets what lies beyond W - 1 tokens, in
    batches (whole blocks of G tokens from a per-channel store), so it holds at most
    W - 1 + max(16, quantize_every) + G - 1 tokens between appends whatever the length;
    ``hidden_tokens`` says how many of the oldest tokens it still holds lie outside
    this step's window: attention must hide them (kvquant's transformers integration
    does).
    """

    def __init__(self, keys: Any = "int8", values: Any = "int8", *, residual: int = 128, layer: Any = 0,
                 on_nonfinite: str = "propagate", quantize_every: int = 1, sliding_window: Optional[int] = None):
        self.formats = (StoredFormat.parse(keys), StoredFormat.parse(values))
        self.residual = parse_residual(residual)
        if isinstance(quantize_every, bool) or not isinstance(quantize_every, int) or quantize_every < 1:
            raise ValueError(f"quantize_every must be a positive int, got {quantize_every!r}")
        # Tokens leave the window in batches of this many (the window holds residual to
        # residual + quantize_every - 1 tokens): one quantize call per batch instead of
        # one per decode step, the same stored bits (tokens are quantized independently).
        self.quantize_every = quantize_every
        self.layer = layer
        self.on_nonfinite = parse_on_nonfinite(on_nonfinite)
        self._stores = tuple(GrowingStore(f) for f in self.formats)
        self._windows = tuple(Window(self._window_floor(f), self._window_holds(f)) for f in self.formats)
        self._signature = None  # (runtime, dtype, device, batch, kv_heads, head_dim) of the first append
        self._seen = None  # what _check last let through (types, dtypes, devices, layouts, shapes)
        self._ops = None
        self._backend = None
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        self.sliding_window = sliding_window
        self.hidden_tokens = 0
        # Tokens beyond the window are forgotten once this many have piled up: a store
        # forgets in O(1), a window moves its tokens, so not at every step.
        self._forget_every = max(16, quantize_every)

    def _window_floor(self, stored: StoredFormat) -> int:
        """What a side's window holds at most between the appends that quantize: its
        buffer's least capacity, so that decoding never grows it."""
        if stored.format is None:
            return 16
        if stored.info.per_channel:
            return self.residual + stored.group_size
        return self.residual + self.quantize_every

    def _window_holds(self, stored: StoredFormat) -> Optional[int]:
        """The most tokens a side's window holds before an append moves some into the
        store (one below its least capacity), None for a full-precision side."""
        return None if stored.format is None else self._window_floor(stored) - 1

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
        new, (k_window, v_window) = keys.shape[TOKEN_AXIS], self._windows
        if (k_window.length + new <= k_window.bound and v_window.length + new <= v_window.bound
                and self.sliding_window is None):
            # A decode step between quantize calls: the new tokens go into the windows in
            # place, nothing leaves them; the general path below does the same, with
            # bookkeeping that costs per layer and step.
            k_window.write(keys, new)
            v_window.write(values, new)
            return tuple(self._history(i, out) for i in range(2)) if history else None
        if self._signature is None:
            self._signature = signature
            self._backend = backend_for(keys)
            self._ops = buffer_ops(self._backend.runtime)
        forgotten = self._beyond_window() if self.sliding_window is not None else ((0, 0), (0, 0))
        staged = []
        for stored, window, arr, (_, skip) in zip(self.formats, self._windows, (keys, values), forgotten):
            held = window.length - skip
            leaving = 0 if stored.format is None else max(0, held + arr.shape[TOKEN_AXIS] - self.residual)
            if leaving and stored.info.per_channel:
                # Whole blocks of G tokens only: the rest of the block waits, in full
                # precision, until it fills (the window holds R to R + G - 1 tokens).
                leaving -= leaving % stored.group_size
            elif leaving < self.quantize_every:
                leaving = 0
            q = None
            if leaving:  # may raise: nothing has changed yet
                q = quantize_dense(window.followed_by(self._ops, arr, leaving, skip), stored, self.on_nonfinite)
            staged.append((leaving, q))
        for store, window, arr, (leaving, q), (from_store, from_window) in zip(
                self._stores, self._windows, (keys, values), staged, forgotten):
            if from_store:
                store.forget(from_store)
            if q is not None:
                store.write(self._ops, q)
            window.advance(self._ops, arr, from_window + leaving)
        if self.sliding_window is not None:
            # held before this append's tokens, beyond the W - 1 the window keeps
            self.hidden_tokens = max(0, self.seq_length - keys.shape[TOKEN_AXIS] - (self.sliding_window - 1))
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

    def attention_buffers(self):
        """What attention_inputs' Histories are views of, without making them: (keys'
        quantized tokens, values', keys' window buffer, values', tokens in keys' window,
        in values'). For a caller that keeps pointers into them between decode steps
        (the CPU kernel's KernelCall): the same objects are the same memory. Before
        the first token: (None, None, None, None, 0, 0)."""
        if self._signature is None:
            return None, None, None, None, 0, 0
        source, backend = self._signature[1], self._backend.name
        (k_store, v_store), (k_window, v_window) = self._stores, self._windows
        # a full-precision side's store is never written: its view is None
        return (k_store.view(source, backend), v_store.view(source, backend), k_window.buffer, v_window.buffer,
                k_window.length, v_window.length)

    def _beyond_window(self):
        """Per side (tokens to drop from its store, from its window): the oldest tokens
        beyond sliding_window - 1, once enough have piled up, the same number from both
        sides (a per-channel store drops whole blocks only). Nothing changes here, so
        that an append that raises leaves the cache as it was."""
        excess = self.seq_length - (self.sliding_window - 1)
        if excess < self._forget_every:
            return (0, 0), (0, 0)
        tokens = excess
        while True:  # the most every side can drop, down to a count all agree on
            agreed = min(self._droppable(store, window, tokens) for store, window in zip(self._stores, self._windows))
            if agreed == tokens:
                break
            tokens = agreed
        return tuple((min(tokens, store.length), tokens - min(tokens, store.length)) for store in self._stores)

    @staticmethod
    def _droppable(store, window, tokens: int) -> int:
        from_store = store.forgettable(tokens)
        if from_store < min(tokens, store.length):
            return from_store
        return from_store + min(tokens - from_store, window.length)

    def history(self, out_dtype: Any = None) -> Tuple[Any, Any]:
        """(keys, values): every token held, dequantized, then the window (what append
        returns), e.g. for an attention that cannot read the codes."""
        if self._signature is None:
            raise ValueError("the cache has not seen a token yet")
        out = canonical_dtype_name(out_dtype) if out_dtype is not None else self._signature[1]
        return tuple(self._history(i, out) for i in range(2))

    def _history(self, i: int, out_dtype: str):
        from ..api import dequantize

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
            buffer_ops(get_backend(signature[0]).runtime)  # refuses JAX before anything is set
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
                taken = (a if per_tensor(a) else token_major_copy(self._ops, self._ops.take(a, beam_index, 0))
                         for a in store.arrays)
                store.replace(tuple(taken), (len(beam_index),) + store.shape[1:])
        for window in self._windows:
            if window.buffer is not None:
                window.replace(self._ops, self._ops.take(window.view(), beam_index, 0))
        if self._signature is not None:
            s = self._signature
            self._signature = s[:3] + (len(beam_index),) + s[4:]
            self._seen = None  # the batch changed: the next append is checked in full
