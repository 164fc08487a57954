"""The NumPy runtime: what kvquant asks of an array library besides the kernels
(kvquant.protocols.Runtime). Host memory, one device called ``cpu``."""
from __future__ import annotations

import contextlib
from typing import Optional

import ml_dtypes
import numpy as np

from . import kernels


class NumpyRuntime:
    """numr's ``Runtime`` for NumPy arrays: host memory, one device called ``cpu``."""

    name = kernels.NAME

    @staticmethod
    def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
        """kvquant.attention for NumPy arrays (attention.py): the float64 reference."""
        from . import attention

        return attention.attend(query, keys, values, scale, causal, mask, compiled, chunk_tokens)

    def is_array(self, obj) -> bool:
        return isinstance(obj, np.ndarray)

    def unsupported(self, arr) -> Optional[str]:
        if isinstance(arr, np.ma.MaskedArray):
            return ("NumPy masked arrays are not supported: kvquant would quantize the "
                    "values under the mask as well; pass arr.filled(fill_value) or arr.data")
        return None

    def device(self, arr) -> str:
        return "cpu"

    def devices(self):
        return ["cpu"]

    def version(self) -> str:
        return f"numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}"

    def dtype(self, name: str):
        try:
            return kernels._NP_DTYPES[name]
        except KeyError:
            raise TypeError(f"unknown dtype name {name!r}") from None

    def dtype_name(self, arr) -> str:
        return arr.dtype.name

    def shape(self, arr):
        return arr.shape

    def reshape(self, arr, shape):
        return arr.reshape(shape)

    def to_numpy(self, arr) -> np.ndarray:
        return arr

    def from_numpy(self, arr: np.ndarray, device=None):
        return np.asarray(arr)

    def synchronize(self, device=None) -> None:
        return None

    @contextlib.contextmanager
    def num_threads(self, n: int):
        """Run the kernels on n threads (the conformance suite's thread-count invariance).
        Process-wide, like torch.set_num_threads."""
        before, kernels._threads = kernels._threads, max(1, int(n))
        try:
            yield
        finally:
            kernels._threads = before

    def is_concrete(self, arr) -> bool:
        return True

    def first_nan_index(self, values) -> Optional[int]:
        bad = np.flatnonzero(np.isnan(values))
        return int(bad[0]) if bad.size else None

    # ---- cache buffers (kvquant.cache.LayerCache)
    def empty_permuted(self, like, shape, layout):
        """An uninitialised array of ``shape`` and like's dtype whose axes lie in memory
        in ``layout`` order, outermost first (torch.empty_permuted's meaning)."""
        inverse = tuple(layout.index(a) for a in range(len(shape)))
        return np.empty(tuple(shape[a] for a in layout), like.dtype).transpose(inverse)

    def concat(self, arrays, axis):
        return np.concatenate(arrays, axis=axis)

    def copy(self, arr):
        return arr.copy()

    def take(self, arr, index, axis):
        return np.take(arr, np.asarray(index), axis=axis)

    def nbytes(self, arr) -> int:
        return int(arr.nbytes)

    def astype(self, arr, dtype):
        return arr.astype(dtype)


runtime = NumpyRuntime()
