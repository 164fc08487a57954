"""Framework-agnostic entry points: arrays in, same-framework arrays out."""
from __future__ import annotations

import math
from typing import Any, Optional

from ._formats import format_info
from ._ops import canonical_dtype_name
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
    "int8" (per token), "int4" or "int2" (groups of ``group_size`` 32, 64 or 128
    elements inside a token, default 64), "int4_per_channel" or "int2_per_channel"
    (spec v1.1: one scale and zero per channel and block of ``group_size`` tokens
    along dimension -2, which must be a multiple of it).
    The codes, scales and zeros come back in x's framework, on x's device.
    """
    info = format_info(fmt)
    ops = _resolve(backend, x)
    shape = tuple(ops.runtime.shape(x)) if ops.runtime.is_array(x) else None
    if shape is None:
        raise TypeError(f"x must be a {ops.runtime.name} array, got {type(x).__name__}")
    if len(shape) < 2:
        raise ValueError(f"x must have rank 2 or more, [..., head_dim], got shape {shape}")
    if scale is not None and not info.static_scale:
        raise ValueError(f"a static scale applies only to fp8_per_tensor, not {info.format.value}")
    group = info.resolve_group_size(group_size)
    head_dim = shape[-1]
    outputs = info.quantize(ops, x, math.prod(shape[:-1]), head_dim, group_size=group, static_scale=scale,
                            on_nonfinite=on_nonfinite)
    codes, scales, zeros = (tuple(outputs) + (None,))[:3]
    return QuantizedKV(
        codes=codes,
        scales=scales,
        zeros=zeros,
        format=info.format,
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
    info = format_info(q.format)
    outputs = (q.codes, q.scales) + ((q.zeros,) if info.has_zeros else ())
    return info.dequantize(ops, outputs, q.num_tokens, q.head_dim, out_dtype, q.group_size)


def adapt(array: Any):
    """A ``TensorAdapter`` for any backend's array."""
    from .protocols import TensorAdapter

    return TensorAdapter(backend_for(array).runtime, array)
