"""The JAX runtime: what kvquant asks of an array library besides the kernels
(kvquant.protocols.Runtime), for jax.Array and tracers; and the one place kvquant's
containers become pytrees."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvquant._history import History
from kvquant._types import QuantizedKV

from . import kernels


class JaxRuntime:
    """numr's ``Runtime`` for jax.Array (and tracers, inside jit and vmap)."""

    name = kernels.NAME

    @staticmethod
    def register_pytree(cls, flatten, unflatten) -> None:
        register_pytree(cls, flatten, unflatten)

    @staticmethod
    def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
        """kvquant.attention for JAX arrays (attention.py): always the fused form,
        which jit compiles; ``compiled`` and ``chunk_tokens`` do not apply."""
        from . import attention

        return attention.attend(query, keys, values, scale, causal, mask)

    def is_array(self, obj) -> bool:
        return isinstance(obj, (jax.Array, jax.core.Tracer))

    def device(self, arr) -> str:
        if isinstance(arr, jax.core.Tracer):
            return "traced"
        try:
            devices = arr.devices()
        except Exception:
            return "traced"
        if len(devices) == 1:
            return str(next(iter(devices)))
        return "sharded:" + ",".join(sorted(str(d) for d in devices))

    def devices(self):
        return [str(d) for d in jax.devices()]

    def version(self) -> str:
        return f"jax {jax.__version__}, backend {jax.default_backend()}"

    def dtype(self, name: str):
        try:
            return kernels.DTYPES[name]
        except KeyError:
            raise TypeError(f"unknown dtype name {name!r}") from None

    def dtype_name(self, arr) -> str:
        return jnp.dtype(arr.dtype).name

    def shape(self, arr):
        return tuple(arr.shape)

    def reshape(self, arr, shape):
        shape = tuple(shape)
        return arr if tuple(arr.shape) == shape else jnp.reshape(arr, shape)

    def to_numpy(self, arr):
        return np.asarray(jax.device_get(arr))

    def from_numpy(self, arr, device=None):
        out = jnp.asarray(arr)
        if device is not None:
            out = jax.device_put(out, self._device(device))
        return out

    def _device(self, device):
        """A jax.Device from a device or its name ("cuda:0", "cpu:0", "gpu", "tpu")."""
        if not isinstance(device, str):
            return device
        for d in jax.devices():
            if device in (str(d), f"{d.platform}:{d.id}", d.platform, d.device_kind):
                return d
        if device.split(":")[0] in ("cuda", "gpu", "rocm"):
            index = int(device.split(":")[1]) if ":" in device else 0
            return jax.devices("gpu")[index]
        raise ValueError(f"no JAX device named {device!r}; devices: {', '.join(map(str, jax.devices()))}")

    def synchronize(self, device=None) -> None:
        (jax.device_put(0) + 0).block_until_ready()

    def is_concrete(self, arr) -> bool:
        return not isinstance(arr, jax.core.Tracer)

    def detach(self, arr):
        # Only a tracer can carry a gradient; stop_gradient on a concrete array returns
        # it unchanged, after a dispatch paid per call.
        return jax.lax.stop_gradient(arr) if isinstance(arr, jax.core.Tracer) else arr

    def first_nan_index(self, values) -> Optional[int]:
        bad = np.flatnonzero(np.isnan(np.asarray(values)))
        return int(bad[0]) if bad.size else None


runtime = JaxRuntime()


def register_pytree(cls, flatten, unflatten) -> None:
    """kvquant's containers become pytrees here and nowhere else (they cross jit
    boundaries and live in lax.scan carries): QuantizedKV (its arrays the children,
    format, group size, shape, dtype and backend the static aux data) and History (its
    quantized part and window) as soon as the backend loads; JaxLayerCache (its stores)
    through the runtime, when the first one is made."""
    try:
        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    except ValueError:  # already registered (module reloaded)
        pass


register_pytree(QuantizedKV, QuantizedKV.tree_flatten, QuantizedKV.tree_unflatten)
register_pytree(History, lambda h: ((h.quantized, h.window), None), lambda _, children: History(*children))
