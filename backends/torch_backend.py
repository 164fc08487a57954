"""PyTorch backend: docs/spec.md on torch.Tensor, on the tensor's own device.

Same function names as numpy_backend.py. Every kernel is a straight line of
tensor operations with no data-dependent Python branch in the traced path, so
the same code runs eagerly and under ``torch.compile(fullgraph=True)``. The
few host checks that save a full pass in eager mode on the CPU (is any token
poisoned? is any scale tiny enough to need a flush?) are skipped while
compiling and on accelerators, where the masked form is used instead.

Why the arithmetic is safe here (docs/spec.md, "Why compilers cannot change the
bits"): every float32 step is a single multiply, subtract, max or min; the
reciprocal is computed once per token and multiplied, never divided per element;
no product is ever added to anything, so there is nothing to contract into an FMA.
PyTorch keeps subnormals on the CPU and CUDA (no FTZ), so the spec's flushes are
written out explicitly exactly where the spec lists them.
"""
from __future__ import annotations

import contextlib
import struct
from typing import Optional

import torch

from kvquant import _spec
from kvquant._ops import BackendOps, num_groups

NAME = "torch"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _f32(bits: int) -> float:
    # A Python float holding the float32 value exactly; torch multiplies a float32
    # tensor by a Python scalar in float32 (the scalar is exactly representable).
    return struct.unpack("<f", struct.pack("<I", bits))[0]


R448 = _f32(_spec.R448_BITS)
R127 = _f32(_spec.R127_BITS)
R15 = _f32(_spec.R15_BITS)
S_MIN = _f32(_spec.S_MIN_BITS)
FP8_MAX = _f32(_spec.FP8_MAX_BITS)
MIN_NORMAL = _f32(_spec.MIN_NORMAL_BITS)
STATIC_SCALE_DAZ = _f32(_spec.STATIC_SCALE_DAZ_BITS)


def _nan_like(ref: torch.Tensor, dtype_name: str = "float32") -> torch.Tensor:
    """The spec's canonical NaN as a 0-d tensor on ref's device (built from bits,
    so no framework can pick another payload)."""
    bits = _spec.NAN_BITS_BY_DTYPE[dtype_name]
    if dtype_name == "float32":
        return torch.tensor(bits - (1 << 32) if bits >= 1 << 31 else bits, dtype=torch.int32, device=ref.device).view(torch.float32)
    return torch.tensor(bits - (1 << 16) if bits >= 1 << 15 else bits, dtype=torch.int16, device=ref.device).view(_DTYPES[dtype_name])


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """A cheap host-side test may replace a full masked pass only in eager mode on the
    CPU, where reading one flag costs no device synchronisation."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def flush(v: torch.Tensor) -> torch.Tensor:
    """Spec flush(): a subnormal float32 becomes a zero of the same sign."""
    return torch.where(v.abs() < MIN_NORMAL, v * 0.0, v)


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32)


def _absmax(t: torch.Tensor, dim) -> torch.Tensor:
    """max |x| along dim in one pass; NaN if the slice holds a NaN."""
    lo, hi = torch.aminmax(t, dim=dim) if dim is not None else torch.aminmax(t)
    return torch.maximum(hi, -lo)


def _symmetric_scale(amax: torch.Tensor, reciprocal: float):
    """Spec: scale = 1 if amax == 0 else max(amax * R(n), S_MIN); inv = 1 / scale.
    A poisoned token gets the NaN scale and inv = 0."""
    poisoned = ~torch.isfinite(amax)
    amax = flush(amax)
    scale = torch.clamp_min(amax * reciprocal, S_MIN)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    scale = torch.where(poisoned, _nan_like(scale), scale)
    inv = torch.where(poisoned, torch.zeros_like(scale), 1.0 / scale)
    return scale, inv, poisoned


def _zero_rows(codes: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """Codes of poisoned rows (poisoned is [rows, 1] or broadcastable) become 0."""
    as_int = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    if _host_checks_allowed(codes) and not bool(poisoned.any()):
        return codes
    as_int = torch.where(poisoned, torch.zeros((), dtype=as_int.dtype, device=as_int.device), as_int)
    return as_int.view(codes.dtype) if codes.dtype == torch.float8_e4m3fn else as_int


def _to_output(v: torch.Tensor, bad: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """Round once to out_dtype; elements with a NaN parameter become the canonical NaN.

    Which NaN x * NaN gives is the hardware's choice (x86 keeps the operand's payload,
    CUDA returns 0x7FFFFFFF), and ATen's and Inductor's vectorised float32 -> bfloat16
    casts turn every NaN into 0xFFFF, so the NaN bits are written as integers.
    """
    out = v.to(_DTYPES[out_dtype])
    if _host_checks_allowed(v) and not bool(bad.any()):
        return out
    carrier = torch.int32 if out_dtype == "float32" else torch.int16
    nan_bits = _nan_like(out, out_dtype).view(carrier)
    return torch.where(bad, nan_bits, out.view(carrier)).view(out.dtype)


def _canonical_params(p: torch.Tensor) -> torch.Tensor:
    """Read scales/zeros as the spec does: subnormals flushed, any NaN made canonical."""
    p = flush(p)
    return torch.where(torch.isnan(p), _nan_like(p), p)


# --------------------------------------------------------------------- FP8
def _fp8_codes(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    # torch's cast saturates where ml_dtypes and JAX give NaN: the clamp keeps every
    # backend's cast away from out-of-range values.
    return torch.clamp(x * inv, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_quantize_per_token(x: torch.Tensor):
    xf = _widen(x)
    scale, inv, poisoned = _symmetric_scale(_absmax(xf, -1), R448)
    codes = _fp8_codes(xf, inv[:, None])
    return _zero_rows(codes, poisoned[:, None]), scale


def fp8_quantize_per_tensor(x: torch.Tensor, static_scale: Optional[float]):
    if static_scale is None:
        return _fp8_per_tensor_dynamic(x)
    scale = torch.tensor(static_scale, dtype=torch.float32, device=x.device)
    # 1/scale > 2^116 lifts a subnormal input past half the smallest e4m3 step, so only
    # then must inputs be flushed; the flag is static, the scale a tensor, so a compiled
    # kernel is not specialised on every scale a checkpoint holds.
    return _fp8_per_tensor_static(x, scale, static_scale < STATIC_SCALE_DAZ)


def _fp8_per_tensor_dynamic(x: torch.Tensor):
    xf = _widen(x)
    amax = _absmax(xf, None) if xf.numel() else torch.zeros((), device=xf.device)
    scale, inv, poisoned = _symmetric_scale(amax, R448)
    return _zero_rows(_fp8_codes(xf, inv), poisoned), scale


def _fp8_per_tensor_static(x: torch.Tensor, scale: torch.Tensor, flush_input: bool):
    xf = _widen(x)
    if flush_input:
        xf = flush(xf)
    inv = flush(1.0 / scale)
    if xf.numel():
        lo, hi = torch.aminmax(xf)
        poisoned = ~(torch.isfinite(lo) & torch.isfinite(hi))
    else:
        poisoned = torch.zeros((), dtype=torch.bool, device=xf.device)
    scale = torch.where(poisoned, _nan_like(scale), scale)
    return _zero_rows(_fp8_codes(xf, inv), poisoned), scale


def fp8_dequantize(codes: torch.Tensor, scales: torch.Tensor, out_dtype: str):
    """value = flush(float32(code) * scale); scales is [rows, 1] or [1, 1]."""
    scales = _canonical_params(scales)
    v = codes.to(torch.float32) * scales
    # A nonzero e4m3 magnitude (>= 2^-9) times a scale >= 2^-115 is normal.
    if not _host_checks_allowed(v) or bool((scales < 2 * STATIC_SCALE_DAZ).any()):
        v = flush(v)
    return _to_output(v, torch.isnan(scales), out_dtype)


# -------------------------------------------------------------------- INT8
def int8_quantize(x: torch.Tensor):
    xf = _widen(x)
    scale, inv, poisoned = _symmetric_scale(_absmax(xf, -1), R127)
    q = torch.clamp(torch.round(xf * inv[:, None]), -127.0, 127.0).to(torch.int8)
    return _zero_rows(q, poisoned[:, None]), scale


def int8_dequantize(codes: torch.Tensor, scales: torch.Tensor, out_dtype: str):
    """value = float32(q) * scale: never subnormal for a normal scale and |q| >= 1."""
    scales = _canonical_params(scales)
    v = codes.to(torch.float32) * scales
    return _to_output(v, torch.isnan(scales), out_dtype)


# -------------------------------------------------------------------- INT4
def _grouped(t: torch.Tensor, group_size: int):
    """[rows, head_dim] as a list of [rows, groups, size] views: the full groups, then
    the shorter last group when head_dim is not a multiple of group_size."""
    rows, width = t.shape
    full = (width // group_size) * group_size
    parts = []
    if full:
        parts.append(t[:, :full].reshape(rows, full // group_size, group_size))
    if full < width:
        parts.append(t[:, full:].reshape(rows, 1, width - full))
    return parts


def _per_element(p: torch.Tensor, width: int, group_size: int) -> torch.Tensor:
    """Per-group values [rows, groups] repeated to [rows, head_dim]."""
    return torch.repeat_interleave(p, group_size, dim=1)[:, :width]


def _int4_params(mn: torch.Tensor, mx: torch.Tensor):
    mn = flush(mn)
    mn = torch.where(mn == 0, torch.zeros_like(mn), mn)  # +0 whatever sign the reduction chose
    mx = flush(mx)
    rng = flush(mx - mn)
    poisoned = ~torch.isfinite(rng)
    scale = torch.clamp_min(rng * R15, S_MIN)
    scale = torch.where(rng == 0, torch.ones_like(scale), scale)
    scale = torch.where(poisoned, _nan_like(scale), scale)
    inv = torch.where(poisoned, torch.zeros_like(scale), 1.0 / scale)
    zero = flush(-(mn * inv))
    zero = torch.where(poisoned, _nan_like(zero), zero)
    mn = torch.where(poisoned, torch.zeros_like(mn), mn)
    return scale, inv, zero, mn, poisoned


def int4_quantize(x: torch.Tensor, group_size: int):
    xf = _widen(x)
    rows, width = xf.shape
    parts = _grouped(xf, group_size)
    lo_hi = [torch.aminmax(p, dim=-1) for p in parts]
    mn = torch.cat([lh[0] for lh in lo_hi], dim=1)
    mx = torch.cat([lh[1] for lh in lo_hi], dim=1)
    scale, inv, zero, mn, poisoned = _int4_params(mn, mx)
    if width % group_size == 0:
        g = xf.reshape(rows, width // group_size, group_size)
        q = torch.clamp(torch.round((g - mn[:, :, None]) * inv[:, :, None]), 0.0, 15.0).reshape(rows, width)
    else:
        q = torch.clamp(
            torch.round((xf - _per_element(mn, width, group_size)) * _per_element(inv, width, group_size)),
            0.0,
            15.0,
        )
    q = q.to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    bad_bytes = _per_element(poisoned, width, group_size)[:, 0::2]
    return _zero_rows(packed, bad_bytes), scale, zero


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, out_dtype: str):
    """value = flush((float32(q) - zero) * scale)."""
    rows, half = packed.shape
    width = half * 2
    scales, zeros = _canonical_params(scales), _canonical_params(zeros)
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, width).to(torch.float32)
    if width % group_size == 0:
        v = ((q.reshape(rows, width // group_size, group_size) - zeros[:, :, None]) * scales[:, :, None]).reshape(rows, width)
    else:
        v = (q - _per_element(zeros, width, group_size)) * _per_element(scales, width, group_size)
    # Only groups with a scale below 2^-99, or a q = 0 element with |zero * scale| near
    # 2^-126, can produce a subnormal (docs/spec.md, "Where flushing matters").
    at_risk = ((scales < 2.0**-99) | (zeros.abs() * scales < 2.0**-124)) & (zeros != 0)
    if not _host_checks_allowed(v) or bool(at_risk.any()):
        v = flush(v)
    bad = _per_element(torch.isnan(scales) | torch.isnan(zeros), width, group_size)
    return _to_output(v, bad, out_dtype)


# ----------------------------------------------------------------- Runtime
class TorchRuntime:
    """numr's ``Runtime`` for torch.Tensor: any device torch supports."""

    name = NAME

    def is_array(self, obj) -> bool:
        return isinstance(obj, torch.Tensor)

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
            return _DTYPES[name]
        except KeyError:
            raise TypeError(f"unknown dtype name {name!r}") from None

    def dtype_name(self, arr) -> str:
        return _NAMES.get(arr.dtype, str(arr.dtype).replace("torch.", ""))

    def shape(self, arr):
        return tuple(arr.shape)

    def reshape(self, arr, shape):
        return arr.reshape(tuple(shape))

    def to_numpy(self, arr):
        import ml_dtypes
        import numpy as np

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
            t = torch.from_numpy(np.ascontiguousarray(arr).view(carrier).copy()).view(_DTYPES[name])
        else:
            t = torch.from_numpy(np.array(arr, copy=True))
        return t.to(device) if device is not None else t

    def synchronize(self, device=None) -> None:
        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            torch.cuda.synchronize(device)

    def is_concrete(self, arr) -> bool:
        return not torch.compiler.is_compiling()

    @contextlib.contextmanager
    def num_threads(self, n: int):
        """Run with n intra-op threads (the conformance suite's thread-count invariance)."""
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def first_nan_index(self, flat) -> Optional[int]:
        bad = torch.isnan(flat)
        if not bool(bad.any()):  # the one host synchronisation of on_nonfinite="raise"
            return None
        return int(torch.nonzero(bad)[0, 0])


runtime = TorchRuntime()

# The traced units: fp8_quantize_per_tensor is a host-side wrapper that turns the
# static scale into a tensor before calling one of them.
_TRACED = (
    "fp8_quantize_per_token",
    "_fp8_per_tensor_dynamic",
    "_fp8_per_tensor_static",
    "fp8_dequantize",
    "int8_quantize",
    "int8_dequantize",
    "int4_quantize",
    "int4_dequantize",
)


class _Kernels:
    """The kernels as one object; ``wrap`` (torch.compile) applies to every traced unit."""

    def __init__(self, wrap=None):
        self._fns = {name: (wrap(globals()[name]) if wrap else globals()[name]) for name in _TRACED}
        for name in _TRACED:
            if not name.startswith("_"):
                setattr(self, name, self._fns[name])
        self._compiled = wrap is not None

    def fp8_quantize_per_tensor(self, x, static_scale):
        if static_scale is None:
            return self._fns["_fp8_per_tensor_dynamic"](x)
        scale = torch.tensor(static_scale, dtype=torch.float32, device=x.device)
        return self._fns["_fp8_per_tensor_static"](x, scale, static_scale < STATIC_SCALE_DAZ)

    def variants(self):
        return {} if self._compiled else {"compile": _compiled_kernels()}


_COMPILED = None


def _compiled_kernels():
    """The same kernels under torch.compile(fullgraph=True): a graph break is an error.

    Shapes start static and turn dynamic on the first change (dynamic=None); the
    recompile limit is raised because every dtype, head_dim and group size is its own
    specialisation, and fullgraph=True turns hitting the limit into a hard error.
    """
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4096
        )
        _COMPILED = _Kernels(lambda fn: torch.compile(fn, fullgraph=True, dynamic=True))
    return _COMPILED


def create_backend() -> BackendOps:
    return BackendOps(NAME, runtime, _Kernels(), variant="eager")
