"""Enums and records shared by every backend: the vocabulary of the seed trait."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple


class KvQuantMode(enum.Enum):
    """FP8 scaling granularity, as in the seed's ``KvQuantMode``."""

    PER_TENSOR = "per_tensor"
    PER_TOKEN = "per_token"


class Int4GroupSize(enum.IntEnum):
    """INT4 group sizes of the seed's ``Int4GroupSize``; G64 is the default."""

    G32 = 32
    G64 = 64
    G128 = 128

    @classmethod
    def default(cls) -> "Int4GroupSize":
        return cls.G64


class Format(enum.Enum):
    """The quantized formats: spec v1's four, then spec v1.1's three (KIVI): INT2 per
    token in groups inside a token, and INT4 / INT2 per channel, with one scale and zero
    per channel and block of G tokens."""

    FP8_PER_TOKEN = "fp8"
    FP8_PER_TENSOR = "fp8_per_tensor"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    INT4_PER_CHANNEL = "int4_per_channel"
    INT2_PER_CHANNEL = "int2_per_channel"

    @classmethod
    def parse(cls, value: "Format | str") -> "Format":
        if isinstance(value, Format):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            key = _FORMAT_ALIASES.get(key, key)
            for member in cls:
                if member.value == key:
                    return member
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown format {value!r}; expected one of {allowed}")


_FORMAT_ALIASES = {
    "fp8_per_token": "fp8",
    "fp8_token": "fp8",
    "fp8_tensor": "fp8_per_tensor",
    "e4m3": "fp8",
    "int4_channel": "int4_per_channel",
    "int2_channel": "int2_per_channel",
}


class NonFiniteInputError(ValueError):
    """A token, group or tensor holds NaN or +-inf, or its value range overflows float32.

    ``index`` is the position of the first poisoned token (a tuple over the leading
    dimensions), with the group number appended for INT4 and INT2, or ``()`` for a
    per-tensor scale; for per-channel formats, the index of the first poisoned scale in
    ``[..., tokens / G, head_dim]``: the leading dimensions, the block, the channel.
    """

    def __init__(self, message: str, index: Tuple[int, ...]):
        super().__init__(message)
        self.index = index


ON_NONFINITE_CHOICES = ("raise", "propagate")


@dataclass(frozen=True)
class QuantizedKV:
    """A quantized KV tensor and everything needed to dequantize it.

    ``codes``, ``scales`` and ``zeros`` belong to the framework and device of the
    array that was quantized. ``shape`` is the shape of that array and
    ``source_dtype`` its dtype name ("float32", "float16" or "bfloat16").
    """

    codes: Any
    scales: Any
    zeros: Optional[Any]
    format: Format
    group_size: Optional[int]
    shape: Tuple[int, ...]
    source_dtype: str
    backend: str = field(default="numpy", compare=False)

    def __post_init__(self):
        # A format given by name ("int8") is the Format it names, or a clear error.
        object.__setattr__(self, "format", Format.parse(self.format))

    # The split into arrays and static metadata is what the JAX backend registers
    # as a pytree; it lives here so that every backend sees the same record.
    def tree_flatten(self):
        children = (self.codes, self.scales, self.zeros)
        aux = (self.format, self.group_size, self.shape, self.source_dtype, self.backend)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        codes, scales, zeros = children
        fmt, group_size, shape, source_dtype, backend = aux
        return cls(codes, scales, zeros, fmt, group_size, shape, source_dtype, backend)

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    @property
    def num_tokens(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n
