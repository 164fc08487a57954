"""What attention reads: one side (keys or values) of a layer's history, a quantized
part then a full-precision window. A leaf module (it imports no backend), so that the
backends' attention and the caches use it without importing kvquant.attention, which
finds each backend's attention through its runtime."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ._types import QuantizedKV

TOKEN_AXIS = -2
DEFAULT_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class History:
    """One side (keys or values) of a layer's history: the quantized tokens, then the
    full-precision window; either may be None."""

    quantized: Optional[QuantizedKV] = None
    window: Any = None

    @property
    def length(self) -> int:
        n = 0 if self.quantized is None else self.quantized.shape[TOKEN_AXIS]
        return n + (0 if self.window is None else self.window.shape[TOKEN_AXIS])


def as_history(side: Any) -> History:
    """A History as given, a QuantizedKV as its quantized part, an array as its window."""
    if isinstance(side, History):
        return side
    if isinstance(side, QuantizedKV):
        return History(side, None)
    return History(None, side)


def token_slice(q: QuantizedKV, start: int, stop: int) -> QuantizedKV:
    """Tokens start:stop (along dimension -2) of a quantized history, any framework's
    arrays; for a per-channel format start and stop are whole blocks."""
    from ._formats import FORMATS

    info = FORMATS[q.format]
    per = q.group_size if info.per_channel else 1
    if info.params == "tensor":
        scales, zeros = q.scales, q.zeros
    elif info.params == "token":
        scales, zeros = q.scales[..., start:stop], None
    else:
        scales, zeros = q.scales[..., start // per:stop // per, :], q.zeros[..., start // per:stop // per, :]
    shape = tuple(q.shape[:-2]) + (stop - start, q.shape[-1])
    return QuantizedKV(q.codes[..., start:stop, :], scales, zeros, q.format, q.group_size, shape, q.source_dtype,
                       q.backend)
