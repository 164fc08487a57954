"""Framework-agnostic entry points: arrays in, same-framework arrays out."""
from __future__ import annotations

from typing import Any, Optional

from ._ops import canonical_dtype_name, parse_group_size
from ._registry import backend_for, get_backend
from ._types import Format, Int4GroupSize, QuantizedKV


def _resolve(backend: Any, array: Any):
    if backend is None:
        return backend_for(array)
    if isinstance(backend, str):
        return get_backend(backend)
    return backend


def quantize(
    x: Any,
    fmt: "Format | str" = Format.INT8,
    *,
    group_size: Optional["Int4GroupSize | int"] = None,
    scale: Optional[float] = None,
    on_nonfinite: str = "raise",
    backend: Any = None,
) -> QuantizedKV:
    """Quantize a KV tensor ``[..., head_dim]`` with the backend that owns ``x``.

    ``fmt``: "fp8" (per token), "fp8_per_tensor" (``scale`` for a static scale),
    "int8" (per token) or "int4" (``group_size`` 32, 64 or 128, default 64).
    The codes, scales and zeros come back in x's framework, on x's device.
    """
    fmt = Format.parse(fmt)
    ops = _resolve(backend, x)
    shape = tuple(ops.runtime.shape(x)) if ops.runtime.is_array(x) else None
    if shape is None:
        raise TypeError(f"x must be a {ops.runtime.name} array, got {type(x).__name__}")
    if len(shape) < 2:
        raise ValueError(
            f"x must have rank 2 [num_tokens, head_dim] or 4 [batch, kv_heads, seq_len, head_dim], got shape {shape}"
        )
    if scale is not None and fmt is not Format.FP8_PER_TENSOR:
        raise ValueError(f"a static scale applies only to fp8_per_tensor, not {fmt.value}")
    if group_size is not None and fmt is not Format.INT4:
        raise ValueError(f"group_size applies only to int4, not {fmt.value}")
    head_dim = shape[-1]
    num_tokens = 1
    for d in shape[:-1]:
        num_tokens *= d
    zeros = None
    group = None
    if fmt is Format.FP8_PER_TOKEN:
        codes, scales = ops.quantize_kv_fp8_per_token(x, num_tokens, head_dim, on_nonfinite=on_nonfinite)
    elif fmt is Format.FP8_PER_TENSOR:
        codes, scales = ops.quantize_kv_fp8_per_tensor(x, num_tokens, head_dim, scale, on_nonfinite=on_nonfinite)
    elif fmt is Format.INT8:
        codes, scales = ops.quantize_kv_int8(x, num_tokens, head_dim, on_nonfinite=on_nonfinite)
    else:
        group = parse_group_size(Int4GroupSize.default() if group_size is None else group_size)
        codes, scales, zeros = ops.quantize_kv_int4(x, num_tokens, head_dim, group, on_nonfinite=on_nonfinite)
    return QuantizedKV(
        codes=codes,
        scales=scales,
        zeros=zeros,
        format=fmt,
        group_size=group,
        shape=shape,
        source_dtype=ops.runtime.dtype_name(x),
        backend=ops.name,
    )


def dequantize(q: QuantizedKV, dtype: Any = None, *, backend: Any = None) -> Any:
    """Invert ``quantize``; ``dtype`` defaults to the dtype that was quantized."""
    if not isinstance(q, QuantizedKV):
        raise TypeError(f"dequantize takes a QuantizedKV, got {type(q).__name__}")
    ops = _resolve(backend, q.codes)
    out_dtype = canonical_dtype_name(dtype) if dtype is not None else q.source_dtype
    num_tokens, head_dim = q.num_tokens, q.head_dim
    if q.format is Format.FP8_PER_TOKEN:
        return ops.dequantize_kv_fp8_per_token(q.codes, q.scales, num_tokens, head_dim, out_dtype)
    if q.format is Format.FP8_PER_TENSOR:
        return ops.dequantize_kv_fp8_per_tensor(q.codes, q.scales, num_tokens, head_dim, out_dtype)
    if q.format is Format.INT8:
        return ops.dequantize_kv_int8(q.codes, q.scales, num_tokens, head_dim, out_dtype)
    return ops.dequantize_kv_int4(q.codes, q.scales, q.zeros, num_tokens, head_dim, q.group_size, out_dtype)


def adapt(array: Any):
    """A ``TensorAdapter`` for any backend's array."""
    from .protocols import TensorAdapter

    return TensorAdapter(backend_for(array).runtime, array)
