"""JaxLayerCache: the functional quantized KV cache for JAX, a pytree of fixed capacity
for decode loops under jax.jit (see the class)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

from .._history import History
from .._ops import canonical_dtype_name
from .._registry import get_backend
from .._types import QuantizedKV
from .stored import TOKEN_AXIS, CacheInputError, StoredFormat, parse_residual, per_tensor, quantize_dense


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

    ``k_all`` / ``v_all`` are ``[batch, kv_heads, capacity + window, head_dim]``: the
    quantized slots (dequantized) then the window's slots; ``valid`` ([capacity +
    window] bools) marks the slots holding tokens, for the attention mask. Slot order
    is not token order across the two parts, which attention does not need (positions
    are in the keys already). ``capacity`` is the number of quantized token slots: it
    must hold every token that leaves the window plus one append's new tokens (an
    append writes all its new tokens' codes at once, the not-yet-leaving ones to be
    written again, identically, when they leave). With a concrete length, an append
    past that raises; under jit it cannot be checked.

    Per-channel formats (KIVI's keys) quantize blocks of G tokens: the window then has
    residual + G - 1 slots and tokens leave it in whole blocks (both sides, so that one
    mask serves both), as LayerCache's per-channel side does; each append quantizes a
    fixed span of blocks from the window's front, and the blocks that are complete are
    the ones counted (an incomplete one, written past the valid slots, is written again
    when it completes). The capacity is then a multiple of G, with room for one append's
    new tokens rounded up to whole blocks. The stored bits equal LayerCache's.

    ``sliding_window=W`` (a layer that attends to the last W tokens): the quantized slots
    are a ring, token position p in slot p mod capacity, so memory is the capacity
    whatever the length; the capacity must hold the window and one append's span
    (capacity >= W + new tokens rounded up to blocks). ``positions()`` gives each slot's
    token position (-1 when empty), for masks of several new tokens; ``valid`` and
    ``attention_inputs``' mask show the slots the newest token sees.

    On a device mesh, ``sharding`` (a ``NamedSharding`` whose spec names the batch and
    kv_heads axes, e.g. ``P("batch", "heads")``) places every per-token array over those
    two axes and the scalars replicated; ``append`` under jit keeps that placement and
    the unsharded cache's bits, with no collective (docs/cache.md, "More than one device").
    """

    def __init__(self, stores, windows, length, formats, residual, capacity, dtype, layer=0, sliding_window=None):
        self.stores = stores      # per side: (codes, scales[, zeros]) with `capacity` token slots, or (values,)
        self.windows = windows    # per side: [batch, kv_heads, residual, head_dim] full precision
        self.length = length      # int32 scalar: tokens appended so far
        self.formats = formats
        self.residual = residual
        self.capacity = capacity
        self.dtype = dtype
        self.layer = layer
        self.sliding_window = sliding_window

    def tree_flatten(self):
        return (self.stores, self.windows, self.length), (self.formats, self.residual, self.capacity, self.dtype,
                                                          self.layer, self.sliding_window)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @classmethod
    def create(cls, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: Any = "float32", *,
               keys: Any = "int8", values: Any = "int8", residual: int = 128, layer: Any = 0,
               sharding: Any = None, sliding_window: Optional[int] = None) -> "JaxLayerCache":
        import jax.numpy as jnp

        get_backend("jax").runtime.register_pytree(cls, cls.tree_flatten, cls.tree_unflatten)
        dtype = canonical_dtype_name(dtype)
        formats = (StoredFormat.parse(keys), StoredFormat.parse(values))
        residual = parse_residual(residual)
        blocks = {f.group_size for f in formats if f.info is not None and f.info.per_channel}
        if len(blocks) > 1:
            raise ValueError(f"keys and values are per channel with different group sizes {sorted(blocks)}: a "
                             "JaxLayerCache moves both sides' tokens in blocks of one size")
        block = blocks.pop() if blocks else 1
        if capacity % block:
            raise ValueError(f"capacity {capacity} is not a multiple of the per-channel group size {block}")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or not 0 < sliding_window <= capacity - block):
            raise ValueError(f"sliding_window must be a positive int with room for a block beside it in the "
                             f"capacity {capacity}, got {sliding_window!r}")
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
            quantize_dense(sample, f)  # refuses a bad format/shape combination now
        windows = tuple(jnp.zeros((batch, kv_heads, residual + block - 1, head_dim), dtype) for _ in formats)
        cache = cls(tuple(stores), windows, jnp.zeros((), jnp.int32), formats, residual, capacity, dtype, layer,
                    sliding_window)
        return cache if sharding is None else _placed(cache, sharding, (batch, kv_heads))

    @property
    def block(self) -> int:
        """Tokens leave the window in multiples of this: a per-channel side's G, else 1."""
        return self.windows[0].shape[TOKEN_AXIS] - self.residual + 1

    def _quantized_tokens(self, length):
        """How many of ``length`` tokens have left the window (whole blocks)."""
        import jax.numpy as jnp

        left = max(length - self.residual, 0) if isinstance(length, int) else jnp.maximum(length - self.residual, 0)
        return left - left % self.block

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
        G = self.block
        span = G * ((new + G - 1) // G)  # tokens quantized per append: every block that can complete
        if self.sliding_window is not None and self.sliding_window + span > self.capacity:
            raise CacheInputError(f"{where}: a ring of {self.capacity} slots cannot hold the window "
                                  f"({self.sliding_window}) and an append of {new} tokens ({span} slots)")
        if self.sliding_window is None and not isinstance(self.length, jax.core.Tracer):
            length = int(self.length)
            if self._quantized_tokens(length + new) > self._quantized_tokens(length) and \
                    self._quantized_tokens(length) + span > self.capacity:
                raise CacheInputError(f"{where}: the cache is full ({self.capacity} quantized slots; "
                                      f"{length} tokens held, {new} more asked for)")
        out = canonical_dtype_name(out_dtype) if out_dtype is not None else self.dtype
        L = self.length
        Q = self._quantized_tokens(L)
        r = L - Q
        T = L + new
        Q2 = self._quantized_tokens(T)
        k = Q2 - Q
        W = self.windows[0].shape[TOKEN_AXIS]
        stores, windows, histories = [], [], []
        for f, store, window, arr in zip(self.formats, self.stores, self.windows, (keys, values)):
            # Room for the window's slots after up to new + G - 1 tokens leave (dynamic_slice
            # would move a slice that overruns the buffer, not shorten it).
            pad = arr.shape[:TOKEN_AXIS] + (new + G - 1,) + arr.shape[TOKEN_AXIS + 1:]
            buf = jnp.concatenate([window, jnp.zeros(pad, arr.dtype)], axis=TOKEN_AXIS)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, arr, r, axis=TOKEN_AXIS)
            leaving = buf[:, :, :span]  # its first k tokens leave the window
            if f.format is None:
                parts = (leaving,)
            else:
                q = quantize_dense(leaving, f)
                parts = (q.codes, q.scales) + ((q.zeros,) if q.zeros is not None else ())
            # A per-channel format's scales and zeros have a row per block of G tokens.
            rows = [G if i and f.info is not None and f.info.per_channel else 1 for i in range(len(parts))]
            store = tuple(p if per_tensor(p) else self._written(s, p, Q // n, self.capacity // n)
                          for s, p, n in zip(store, parts, rows))
            window = jax.lax.dynamic_slice_in_dim(buf, k, W, axis=TOKEN_AXIS)
            stores.append(store)
            windows.append(window)
        cache = JaxLayerCache(tuple(stores), tuple(windows), T.astype(jnp.int32), self.formats, self.residual,
                              self.capacity, self.dtype, self.layer, self.sliding_window)
        for i in range(2):
            histories.append(cache.history(i, out))
        return cache, histories[0], histories[1], cache._seen_by_newest()

    def _written(self, buffer, part, start, rows: int):
        """``part`` written into ``buffer`` from row ``start``: in place, or around the
        ring of ``rows`` rows for a sliding window."""
        import jax
        import jax.numpy as jnp

        if self.sliding_window is None:
            return jax.lax.dynamic_update_slice_in_dim(buffer, part, start, axis=TOKEN_AXIS)
        index = (start + jnp.arange(part.shape[TOKEN_AXIS])) % rows
        return buffer.at[:, :, index].set(part)

    def positions(self):
        """Each slot's token position, quantized slots then the window's; -1 where empty."""
        import jax.numpy as jnp

        Q = self._quantized_tokens(self.length)
        window = jnp.arange(self.windows[0].shape[TOKEN_AXIS])
        ring = jnp.arange(self.capacity)
        if self.sliding_window is None:
            stored = jnp.where(ring < Q, ring, -1)
        else:  # the latest position p < Q with p = slot (mod capacity)
            stored = ring + self.capacity * ((Q - 1 - ring) // self.capacity)
            stored = jnp.where(stored >= 0, stored, -1)
        held = jnp.where(window < self.length - Q, Q + window, -1)
        return jnp.concatenate([stored, held]).astype(jnp.int32)

    def _seen_by_newest(self):
        """The slots the newest token attends to: held, and inside its sliding window."""
        positions = self.positions()
        seen = positions >= 0
        if self.sliding_window is not None:
            seen = seen & (positions > self.length - 1 - self.sliding_window)
        return seen

    def quantized(self, side: str = "keys") -> Optional[QuantizedKV]:
        """Every quantized slot of a side as a QuantizedKV (capacity tokens; the first
        ``max(0, length - residual)``, rounded down to whole blocks, hold tokens)."""
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


        sides = tuple(History(self.quantized(side), self.windows[i]) if self.formats[i].format is not None
                      # a full-precision side's slots are plain values: one array, slots in the same order
                      else History(None, jnp.concatenate([self.stores[i][0], self.windows[i]], axis=TOKEN_AXIS))
                      for i, side in enumerate(("keys", "values")))
        return sides[0], sides[1], jnp.where(self._seen_by_newest(), 0.0, -jnp.inf).astype(jnp.float32)

    def history(self, i: int, out_dtype: str):
        import jax.numpy as jnp

        from ..api import dequantize

        q = self.quantized(("keys", "values")[i])
        stored = self.stores[i][0].astype(out_dtype) if q is None else dequantize(q, out_dtype)
        return jnp.concatenate([stored, self.windows[i].astype(out_dtype)], axis=TOKEN_AXIS)

    @property
    def nbytes(self) -> int:
        arrays = [a for store in self.stores for a in store] + list(self.windows)
        return int(sum(a.size * a.dtype.itemsize for a in arrays))
