"""The PyTorch runtime: what kvquant asks of an array library besides the kernels
(kvquant.protocols.Runtime), for torch.Tensor on any device torch supports."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import kernels

NAMES = {v: k for k, v in kernels.DTYPES.items()}


class TorchRuntime:
    """numr's ``Runtime`` for torch.Tensor: any device torch supports."""

    name = kernels.NAME

    @staticmethod
    def attend(query, keys, values, scale: float, causal: bool, mask, compiled: bool, chunk_tokens: int):
        """kvquant.attention for tensors (attention.py, imported on first use: it loads
        torch.compile's and the C++ kernel's machinery)."""
        from . import attention

        return attention.attend(query, keys, values, scale, causal, mask, compiled, chunk_tokens)

    def is_array(self, obj) -> bool:
        return isinstance(obj, torch.Tensor)

    def unsupported(self, arr) -> Optional[str]:
        if arr.layout != torch.strided:
            return (f"{arr.layout} tensors are not supported: kvquant quantizes dense "
                    "(strided) tensors; pass t.to_dense()")
        return None

    def device(self, arr) -> str:
        return str(arr.device)

    def devices(self):
        found = ["cpu"]
        if torch.cuda.is_available():
            found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("mps")
        return found

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def dtype(self, name: str):
        try:
            return kernels.DTYPES[name]
        except KeyError:
            raise TypeError(f"unknown dtype name {name!r}") from None

    def dtype_name(self, arr) -> str:
        return NAMES.get(arr.dtype, str(arr.dtype).replace("torch.", ""))

    def shape(self, arr):
        return tuple(arr.shape)

    def reshape(self, arr, shape):
        return arr.reshape(tuple(shape))

    def to_numpy(self, arr):
        import ml_dtypes

        arr = arr.detach()
        if arr.device.type != "cpu":
            arr = arr.cpu()
        if arr.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            # NumPy has no such dtypes: move the bits, then label them with ml_dtypes.
            target = ml_dtypes.bfloat16 if arr.dtype == torch.bfloat16 else ml_dtypes.float8_e4m3fn
            carrier = torch.int16 if arr.dtype == torch.bfloat16 else torch.uint8
            return arr.contiguous().view(carrier).numpy().view(target)
        return arr.contiguous().numpy()

    def from_numpy(self, arr, device=None):
        import numpy as np

        name = arr.dtype.name
        if name in ("bfloat16", "float8_e4m3fn"):
            carrier = np.int16 if name == "bfloat16" else np.uint8
            t = torch.from_numpy(np.ascontiguousarray(arr).view(carrier).copy()).view(kernels.DTYPES[name])
        else:
            t = torch.from_numpy(np.array(arr, copy=True))
        return t.to(device) if device is not None else t

    def synchronize(self, device=None) -> None:
        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            torch.cuda.synchronize(device)

    def is_concrete(self, arr) -> bool:
        # Meta tensors carry shapes only: like a traced value, nothing to inspect.
        return not torch.compiler.is_compiling() and arr.device.type != "meta"

    @contextlib.contextmanager
    def num_threads(self, n: int):
        """Run with n intra-op threads (the conformance suite's thread-count invariance)."""
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def first_nan_index(self, values) -> Optional[int]:
        # A maximum is NaN exactly when some value is (amax propagates NaN), cheaper than
        # isnan + any. Reading it is the one host
        # synchronisation of on_nonfinite="raise"; the search runs only to raise.
        if values.numel() == 0 or not bool(torch.isnan(values.amax())):
            return None
        return int(torch.nonzero(torch.isnan(values).reshape(-1))[0, 0])

    # ---- cache buffers (kvquant.cache.LayerCache)
    def empty_permuted(self, like, shape, layout):
        """An uninitialised tensor of ``shape``, like's dtype and device, whose axes lie in
        memory in ``layout`` order, outermost first."""
        inverse = tuple(layout.index(a) for a in range(len(shape)))
        return torch.empty(tuple(shape[a] for a in layout), dtype=like.dtype, device=like.device).permute(inverse)

    def concat(self, arrays, axis):
        return torch.cat(arrays, dim=axis)

    def copy(self, arr):
        return arr.clone()

    def take(self, arr, index, axis):
        return arr.index_select(axis, torch.as_tensor(index, device=arr.device))

    def nbytes(self, arr) -> int:
        return arr.numel() * arr.element_size()

    def astype(self, arr, dtype):
        return arr.to(dtype)


runtime = TorchRuntime()
