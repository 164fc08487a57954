"""One table of formats: everything that differs between them, so that the API, the
conformance suite and the golden vectors ask the table instead of branching on
``Format``. What else a new format touches: docs/formats.md, "Adding a format"."""
from __future__ import annotations

from dataclasses import dataclass
import operator
from typing import Any, Optional, Sequence, Tuple

from ._types import Format, Int4GroupSize

GROUP_SIZES: Tuple[int, ...] = tuple(int(g) for g in Int4GroupSize)
_GROUP_SIZES_TEXT = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"


def parse_group_size(group_size: Any) -> int:
    if isinstance(group_size, Int4GroupSize):
        # The member's value, not operator.index: dynamo recursed without end inside
        # IntEnum.__index__ (torch 2.13, torch.compile(fullgraph=True) of a seed call).
        return group_size.value
    problem = f"group_size must be {_GROUP_SIZES_TEXT}, got {group_size!r}"
    if isinstance(group_size, bool):
        raise ValueError(problem)
    try:
        value = operator.index(group_size)
    except TypeError:
        raise ValueError(problem) from None
    if value not in GROUP_SIZES:
        raise ValueError(problem)
    return value


@dataclass(frozen=True)
class FormatInfo:
    """What kvquant needs to know about one format.

    ``params``: how many float32 values describe the codes and where they live:
    "token" (one scale per token), "tensor" (one scale), "group" (a scale and a zero
    per group of ``group_size`` elements inside a token), "channel" (a scale and a zero
    per channel and block of ``group_size`` tokens along the token axis, spec v1.1).
    ``levels``: the largest code of an asymmetric format (15 for 4 bits, 3 for 2).
    ``kernel``: the stem of its kernels' names (``<kernel>_quantize``, ``_dequantize``),
    or ``quantize_kernel`` and ``dequantize_kernel`` where they are named otherwise;
    ``kernel_names`` is the pair every backend's kernels provide (kvquant._ops.CONTRACT)."""

    format: Format
    code_dtype: str
    codes_per_byte: int
    params: str
    quantize_method: str
    dequantize_method: str
    group_sizes: Tuple[int, ...] = ()
    static_scale: bool = False
    levels: int = 0
    spec_version: str = "1"
    kernel: str = ""
    quantize_kernel: str = ""
    dequantize_kernel: str = ""

    @property
    def kernel_names(self) -> Tuple[str, str]:
        return (self.quantize_kernel or f"{self.kernel}_quantize", self.dequantize_kernel or f"{self.kernel}_dequantize")

    @property
    def has_zeros(self) -> bool:
        return self.params in ("group", "channel")

    @property
    def per_channel(self) -> bool:
        return self.params == "channel"

    @property
    def bits(self) -> int:
        return 8 // self.codes_per_byte

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("codes", "scales", "zeros") if self.has_zeros else ("codes", "scales")

    def code_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        shape = tuple(shape)
        return shape[:-1] + (shape[-1] // self.codes_per_byte,)

    def resolve_group_size(self, group_size: Any = None) -> Optional[int]:
        """The group size this format's codes use: ``group_size`` parsed (the default
        for None) for a grouped format; None for the others, which refuse one."""
        if not self.group_sizes:
            if group_size is not None:
                raise ValueError(f"group_size applies only to the grouped formats "
                                 f"({', '.join(f.value for f, i in FORMATS.items() if i.group_sizes)}), not {self.format.value}")
            return None
        return parse_group_size(Int4GroupSize.default() if group_size is None else group_size)

    def param_shape(self, shape: Sequence[int], group_size: Optional[int] = None) -> Tuple[int, ...]:
        shape = tuple(shape)
        if self.params == "tensor":
            return ()
        if self.params == "token":
            return shape[:-1]
        if self.params == "channel":
            return shape[:-2] + (shape[-2] // group_size, shape[-1])
        return shape[:-1] + (-(-shape[-1] // group_size),)

    def bits_per_element(self, head_dim: int, group_size: Optional[int] = None) -> float:
        """Bits of codes plus float32 parameters per element (a per-tensor scale is
        counted as free)."""
        code_bits = 8 / self.codes_per_byte
        if self.params == "token":
            return code_bits + 32 / head_dim
        if self.params == "group":
            return code_bits + 64 * (-(-head_dim // group_size)) / head_dim
        if self.params == "channel":
            return code_bits + 64 / group_size
        return code_bits

    def quantize(self, ops: Any, x: Any, num_tokens: int, head_dim: int, *, group_size: Optional[int] = None,
                 static_scale: Optional[float] = None, on_nonfinite: str = "raise"):
        """The seed method for this format, called with its own arguments."""
        method = getattr(ops, self.quantize_method)
        if self.group_sizes:
            return method(x, num_tokens, head_dim, group_size, on_nonfinite=on_nonfinite)
        if self.static_scale:
            return method(x, num_tokens, head_dim, static_scale, on_nonfinite=on_nonfinite)
        return method(x, num_tokens, head_dim, on_nonfinite=on_nonfinite)

    def dequantize(self, ops: Any, outputs: Sequence[Any], num_tokens: int, head_dim: int, out_dtype: Any,
                   group_size: Optional[int] = None):
        method = getattr(ops, self.dequantize_method)
        if self.group_sizes:
            return method(*outputs, num_tokens, head_dim, group_size, out_dtype)
        return method(*outputs, num_tokens, head_dim, out_dtype)


FORMATS = {
    info.format: info
    for info in (
        FormatInfo(Format.FP8_PER_TOKEN, "float8_e4m3fn", 1, "token",
                   "quantize_kv_fp8_per_token", "dequantize_kv_fp8_per_token",
                   quantize_kernel="fp8_quantize_per_token", dequantize_kernel="fp8_dequantize"),
        FormatInfo(Format.FP8_PER_TENSOR, "float8_e4m3fn", 1, "tensor",
                   "quantize_kv_fp8_per_tensor", "dequantize_kv_fp8_per_tensor", static_scale=True,
                   quantize_kernel="fp8_quantize_per_tensor", dequantize_kernel="fp8_dequantize"),
        FormatInfo(Format.INT8, "int8", 1, "token", "quantize_kv_int8", "dequantize_kv_int8",
                   quantize_kernel="int8_quantize", dequantize_kernel="int8_dequantize"),
        FormatInfo(Format.INT4, "uint8", 2, "group", "quantize_kv_int4", "dequantize_kv_int4",
                   group_sizes=GROUP_SIZES, levels=15, kernel="int4"),
        FormatInfo(Format.INT2, "uint8", 4, "group", "quantize_kv_int2", "dequantize_kv_int2",
                   group_sizes=GROUP_SIZES, levels=3, spec_version="1.1", kernel="int2"),
        FormatInfo(Format.INT4_PER_CHANNEL, "uint8", 2, "channel", "quantize_kv_int4_per_channel",
                   "dequantize_kv_int4_per_channel", group_sizes=GROUP_SIZES, levels=15, spec_version="1.1",
                   kernel="int4_channel"),
        FormatInfo(Format.INT2_PER_CHANNEL, "uint8", 4, "channel", "quantize_kv_int2_per_channel",
                   "dequantize_kv_int2_per_channel", group_sizes=GROUP_SIZES, levels=3, spec_version="1.1",
                   kernel="int2_channel"),
    )
}


def format_info(fmt: "Format | str") -> FormatInfo:
    return FORMATS[Format.parse(fmt)]
