"""kvquant: KV-cache quantization with the same bits on NumPy, PyTorch and JAX.

    import kvquant
    q = kvquant.quantize(k_cache, "int4", group_size=64)   # numpy, torch or jax array
    k_approx = kvquant.dequantize(q)                         # same framework, same device

The arithmetic is specified bit for bit in docs/spec.md; the NumPy backend is its
reference. Importing this package imports NumPy only: the PyTorch and JAX backends
load when their arrays show up or when asked for by name.
"""
from ._ops import BackendOps
from ._registry import (
    BackendNotFoundError,
    available_backends,
    backend_for,
    get_backend,
    register_backend,
)
from ._spec import SPEC_VERSION
from ._types import Format, Int4GroupSize, KvQuantMode, NonFiniteInputError, QuantizedKV
from .api import adapt, dequantize, quantize
from .protocols import Kernels, KvCacheQuantOps, Runtime, TensorAdapter
from . import attention, cache  # noqa: E402  (import no framework: containers load theirs on first append)

__version__ = "0.1.0"

from ._registry import preload_for_imported_frameworks as _preload

_preload()

__all__ = [
    "BackendNotFoundError",
    "BackendOps",
    "Format",
    "Int4GroupSize",
    "Kernels",
    "KvCacheQuantOps",
    "KvQuantMode",
    "NonFiniteInputError",
    "QuantizedKV",
    "Runtime",
    "SPEC_VERSION",
    "TensorAdapter",
    "adapt",
    "cache",
    "available_backends",
    "backend_for",
    "dequantize",
    "get_backend",
    "quantize",
    "register_backend",
]
