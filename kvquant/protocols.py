"""The protocols a backend implements, mirroring boostr's generics.

``Runtime`` mirrors numr's ``Runtime``: what a framework's arrays are and how to
move them. ``KvCacheQuantOps`` mirrors boostr's ``KvCacheQuantOps<R: Runtime>``:
the seed's six methods with the same names and argument order, plus FP8
per-tensor quantization with a dynamic or caller-given scale. ``Kernels`` is what a
backend author writes; ``BackendOps`` turns a Runtime and Kernels into
``KvCacheQuantOps``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from ._types import Int4GroupSize


@runtime_checkable
class Runtime(Protocol):
    """What kvquant needs to know about a framework's arrays."""

    name: str

    def is_array(self, obj: Any) -> bool: ...
    def device(self, arr: Any) -> str: ...
    def devices(self) -> List[str]: ...
    def version(self) -> str: ...
    def dtype(self, name: str) -> Any:
        """The framework's dtype for a name: float32, float16, bfloat16,
        float8_e4m3fn, int8 or uint8."""
    def dtype_name(self, arr: Any) -> str: ...
    def shape(self, arr: Any) -> Tuple[int, ...]: ...
    def reshape(self, arr: Any, shape: Sequence[int]) -> Any: ...
    def to_numpy(self, arr: Any) -> Any:
        """A host NumPy copy (DLPack where the framework allows)."""
    def from_numpy(self, arr: Any, device: Optional[str] = None) -> Any: ...
    def synchronize(self, device: Optional[str] = None) -> None: ...
    def is_concrete(self, arr: Any) -> bool:
        """False while tracing or compiling, where values cannot be inspected."""
    def first_nan_index(self, values: Any) -> Optional[int]:
        """The flat (C-order) index of the first NaN in values, of any shape, or None."""
    # Optional: unsupported(arr) -> Optional[str], a reason to refuse an array of the
    # right type (sparse, masked); detach(arr), cut the input from autodiff;
    # num_threads(n), a context manager (the suite's thread-count check);
    # attend(query, keys, values, scale, causal, mask, compiled, chunk_tokens), the
    # backend's attention over kvquant.attention.History sides (kvquant.attention.attend
    # calls it; without one, a TypeError).
    # Optional, cache buffers (kvquant.cache.LayerCache holds a runtime's arrays only
    # where it has them): empty_permuted(like, shape, layout), an uninitialised array
    # whose axes lie in memory in layout order; concat(arrays, axis); copy(arr);
    # take(arr, index, axis); nbytes(arr); astype(arr, dtype).


@runtime_checkable
class KvCacheQuantOps(Protocol):
    """boostr's ``KvCacheQuantOps``; every quantize method also takes ``on_nonfinite``."""

    name: str
    runtime: Runtime

    def quantize_kv_fp8_per_token(self, input, num_tokens: int, head_dim: int, *, on_nonfinite: str = "raise") -> Tuple[Any, Any]: ...
    def dequantize_kv_fp8_per_token(self, quantized, scales, num_tokens: int, head_dim: int, output_dtype: Any = "float32") -> Any: ...
    def quantize_kv_fp8_per_tensor(self, input, num_tokens: int, head_dim: int, scale: Optional[float] = None, *, on_nonfinite: str = "raise") -> Tuple[Any, Any]: ...
    def dequantize_kv_fp8_per_tensor(self, quantized, scale, num_tokens: int, head_dim: int, output_dtype: Any = "float32") -> Any: ...
    def quantize_kv_int4(self, input, num_tokens: int, head_dim: int, group_size: Int4GroupSize | int = Int4GroupSize.G64, *, on_nonfinite: str = "raise") -> Tuple[Any, Any, Any]: ...
    def dequantize_kv_int4(self, packed, scales, zeros, num_tokens: int, head_dim: int, group_size: Int4GroupSize | int = Int4GroupSize.G64, output_dtype: Any = "float32") -> Any: ...
    def quantize_kv_int8(self, input, num_tokens: int, head_dim: int, *, on_nonfinite: str = "raise") -> Tuple[Any, Any]: ...
    def dequantize_kv_int8(self, quantized, scales, num_tokens: int, head_dim: int, output_dtype: Any = "float32") -> Any: ...


@runtime_checkable
class Kernels(Protocol):
    """What a backend author writes: the arithmetic of docs/spec.md on arrays that
    ``BackendOps`` has already checked (docs/conformance.md, "The kernel contract").

    ``x`` is float32, float16 or bfloat16, ``[tokens, head_dim]`` (or the caller's own
    ``[..., head_dim]`` when ``accepts_any_rank``); ``out_dtype`` is a name, "float32",
    "float16" or "bfloat16"; ``group_size`` is 32, 64 or 128; ``static_scale`` is None or
    a Python float holding a finite, positive, normal float32. Per-token parameters come
    in as ``[tokens, 1]``, a per-tensor scale as ``[1, 1]``.

    Optional members, looked up with getattr:
        accepts_any_rank: bool          kernels reduce over the last axis of any rank
        variants() -> dict              other ways to run the same kernels, by name
        trace(fn) -> fn                 the framework's compiler around a whole function
        release() -> None               forget what was compiled for the shapes seen
        compiles_per_shape: bool        each new input shape or dtype compiles anew (the
                                        conformance suite's quick profile then shares
                                        compilations across cases: docs/conformance.md)
    """

    def fp8_quantize_per_token(self, x) -> Tuple[Any, Any]: ...
    def fp8_quantize_per_tensor(self, x, static_scale: Optional[float]) -> Tuple[Any, Any]: ...
    def fp8_dequantize(self, codes, scales, out_dtype: str) -> Any: ...
    def int8_quantize(self, x) -> Tuple[Any, Any]: ...
    def int8_dequantize(self, codes, scales, out_dtype: str) -> Any: ...
    def int4_quantize(self, x, group_size: int) -> Tuple[Any, Any, Any]: ...
    def int4_dequantize(self, packed, scales, zeros, group_size: int, out_dtype: str) -> Any: ...


class TensorAdapter:
    """One array of any backend, seen through its runtime: framework-neutral code
    (the conformance suite) reads shape, dtype, device and host bits through this."""

    __slots__ = ("runtime", "array")

    def __init__(self, runtime: Runtime, array: Any):
        self.runtime = runtime
        self.array = array

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.runtime.shape(self.array))

    @property
    def dtype(self) -> str:
        return self.runtime.dtype_name(self.array)

    @property
    def device(self) -> str:
        return self.runtime.device(self.array)

    def numpy(self):
        return self.runtime.to_numpy(self.array)

    def __repr__(self) -> str:
        return f"TensorAdapter({self.runtime.name}, shape={self.shape}, dtype={self.dtype}, device={self.device})"
