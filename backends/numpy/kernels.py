"""The NumPy kernels: the reference implementation of docs/spec.md.

Every other backend is judged against the bits this file produces, so it follows
the spec's formulas step by step. Each formula step is one NumPy operation on
float32 (NumPy never fuses, never flushes subnormals and always rounds to nearest
even), applied to chunks of rows spread over the calling thread and a small pool.
Where this file uses integer arithmetic on float bits instead of a float operation,
the comment says why the two agree, and tests/test_numpy_reference.py checks the claim
against a literal transcription of the spec.

Same function names in every backend's kernels.py (Keras 3 style), so backends can
be read side by side:

    fp8_quantize_per_token, fp8_quantize_per_tensor, fp8_dequantize,
    int8_quantize, int8_dequantize, int4_quantize, int4_dequantize,
    int2_quantize, int2_dequantize (spec v1.1), int4_channel_quantize,
    int4_channel_dequantize, int2_channel_quantize, int2_channel_dequantize
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, List, Optional, Tuple

import ml_dtypes
import numpy as np

from kvquant import _spec
from kvquant._ops import num_groups

NAME = "numpy"

F32 = np.float32
U32 = np.uint32


def _f32(bits: int) -> np.float32:
    return np.float32(_spec.f32_from_bits(bits))


R448 = _f32(_spec.R448_BITS)
R127 = _f32(_spec.R127_BITS)
R15 = _f32(_spec.R15_BITS)
R3 = _f32(_spec.R3_BITS)
S_MIN = _f32(_spec.S_MIN_BITS)
ONE = _f32(_spec.ONE_BITS)
FP8_MAX = _f32(_spec.FP8_MAX_BITS)
MIN_NORMAL = _f32(_spec.MIN_NORMAL_BITS)
PRODUCT_FLUSH = _f32(_spec.PRODUCT_FLUSH_BITS)
NAN = _f32(_spec.NAN_BITS)
STATIC_SCALE_DAZ = _f32(_spec.STATIC_SCALE_DAZ_BITS)
FP8_PLAIN_SCALE = _f32(_spec.FP8_PLAIN_SCALE_BITS)
INT4_PLAIN_SCALE = _f32(_spec.INT4_PLAIN_SCALE_BITS)
INT4_PLAIN_ZERO_PRODUCT = _f32(_spec.INT4_PLAIN_ZERO_PRODUCT_BITS)

_NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
}

# Rows per chunk: 2 MiB of float32. A chunk costs about 30 NumPy calls, each a GIL
# hand-off between threads, and that, more than cache misses, decided the
# size on 2 cores: smaller and larger chunks were both slower (docs/performance.md).
_CHUNK_BYTES = 1 << 21

# x + 1.5*2^23 rounds x (|x| < 2^22) to an integer, ties to even, because the sum's
# ulp is 1; the integer then sits in the sum's low mantissa bits in two's complement,
# and the magic number's low byte is zero, so the low byte of the float32 is the int8
# value: a narrowing cast of the bits is the whole conversion. 2^23 does the same for
# 0 <= x < 2^23.
_ROUND_MAGIC_SIGNED = _f32(_spec.ROUND_MAGIC_SIGNED_BITS)
_ROUND_MAGIC_UNSIGNED = _f32(_spec.ROUND_MAGIC_UNSIGNED_BITS)

_ABS_MASK = U32(_spec.ABS_MASK_BITS)
_INF_BITS = U32(_spec.INF_BITS)


# ----------------------------------------------------------------- helpers
def _row_chunks(rows: int, width: int):
    step = max(1, _CHUNK_BYTES // (4 * max(width, 1)))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


_threads = min(os.cpu_count() or 1, 8)
_pools = {}
_pools_lock = threading.Lock()


def _each_chunk(rows: int, width: int, body: Callable[[int, int], object]) -> List[object]:
    """body(start, stop) for every row chunk, the chunks split into one contiguous run
    per thread: the calling thread takes the first run, a small pool the others.

    NumPy releases the GIL inside each ufunc, so the runs go in parallel; each body
    writes only its own rows of preallocated outputs, and every element's arithmetic is
    the same whichever thread does it, so the bits do not depend on the thread count
    (the conformance suite's ``threads`` check runs 1 and 2). np.errstate is per thread:
    bodies set their own. Working on the calling thread, rather than waiting there for
    two pool threads, saves a hand-off.
    """
    chunks = list(_row_chunks(rows, width))
    workers = min(_threads, len(chunks))
    if workers <= 1:
        return [body(start, stop) for start, stop in chunks]
    per_worker = -(-len(chunks) // workers)
    runs = [chunks[i:i + per_worker] for i in range(0, len(chunks), per_worker)]
    pool = _pool(len(runs) - 1)
    pending = [pool.submit(lambda run=run: [body(start, stop) for start, stop in run]) for run in runs[1:]]
    try:
        first = [body(start, stop) for start, stop in runs[0]]
    finally:
        # Never return (or raise) while a pool thread may still write the outputs.
        wait(pending)
    return first + [result for future in pending for result in future.result()]


def _pool(size: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(size)
        if pool is None:
            pool = _pools[size] = ThreadPoolExecutor(size, thread_name_prefix="kvquant-numpy")
        return pool


def _widen(x: np.ndarray) -> np.ndarray:
    """float16/bfloat16 to float32 exactly; a float32 array is returned as it is."""
    return x if x.dtype == F32 else x.astype(F32)


def flush(v: np.ndarray, below=MIN_NORMAL) -> np.ndarray:
    """Spec flush(): a subnormal float32 becomes a zero of the same sign (NaN passes)."""
    v = np.asarray(v, dtype=F32)
    return np.where(np.abs(v) < below, np.copysign(F32(0), v), v)


def flush_product(v: np.ndarray) -> np.ndarray:
    """Spec flush_product(): a product below 2^-125 in magnitude becomes a zero of the same
    sign (the lowest normal binade too, where flush-to-zero hardware rounds differently)."""
    return flush(v, PRODUCT_FLUSH)


def _flush_product_rows_inplace(out: np.ndarray, rows: np.ndarray) -> None:
    if rows.size:
        out[rows] = flush_product(out[rows])


def _abs_into(x: np.ndarray, work: np.ndarray) -> np.ndarray:
    """work = |x| (float32 or its uint32 bits), by clearing the sign bits."""
    np.bitwise_and(x.view(U32), _ABS_MASK, out=work.view(U32))
    return work


def _float32_rows(out: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Where a dequantization computes rows start:stop: out's own rows when out is
    float32, else a float32 block that _store_rows then rounds into out."""
    return out[start:stop] if out.dtype == F32 else np.empty((stop - start,) + out.shape[1:], F32)


def _store_rows(out: np.ndarray, start: int, stop: int, block: np.ndarray) -> None:
    if out.dtype != F32:
        out[start:stop] = block


def _absmax_rows(x: np.ndarray, work_u32: np.ndarray) -> np.ndarray:
    """max |x| of each row, NaN if the row holds a NaN.

    Clearing the sign bit makes the float32 bits of |x| order like unsigned integers,
    with every NaN above +inf; an integer max reduction is exact and many times faster
    than NumPy's NaN-propagating float max along a short axis.
    """
    top = _reduce_segments(np.maximum, _abs_into(x, work_u32), (0,))[:, 0]
    return np.where(top > _INF_BITS, U32(_spec.NAN_BITS), top).view(F32)


def _group_min_max(x: np.ndarray, group_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """float32 min and max of each group of x (contiguous [rows, head_dim]). A group
    holding a NaN gets a NaN minimum (a NaN with the sign bit set) or maximum (one
    without), so its range mx - mn is NaN and the group is poisoned, as the spec asks.

    From three exact integer reductions of the bits, where float reductions ran three
    times slower and mapping to order-preserving keys first took three passes. As int32,
    non-negative floats order by value and sit above every negative one (sign bit set);
    negative floats order by magnitude, so the int32 maximum of an all-negative group
    is its minimum float and the int32 minimum its maximum. As uint32 every negative
    float lies above every non-negative one and orders by magnitude, so the uint32
    maximum of a group holding a negative (-0.0 and -NaN included) is its minimum float.
    NaN bits lie beyond inf's of the same sign in both orders.
    """
    bits = x.view(np.int32)
    width = x.shape[1]
    starts = [g for start, stop, size in _group_slices(width, group_size) for g in range(start, stop, size)]
    max_signed = _reduce_segments(np.maximum, bits, starts)
    min_signed = _reduce_segments(np.minimum, bits, starts)
    max_unsigned = _reduce_segments(np.maximum, bits.view(U32), starts)
    has_negative = max_unsigned >= U32(0x80000000)
    has_non_negative = max_signed >= 0
    mn = np.where(has_negative, max_unsigned.view(np.int32), min_signed)
    mx = np.where(has_non_negative, max_signed, min_signed)
    return mn.view(F32), mx.view(F32)


def _group_slices(head_dim: int, group_size: int):
    """(start, stop) of each run of equal-length groups: full groups, then the short tail."""
    full = (head_dim // group_size) * group_size
    runs = []
    if full:
        runs.append((0, full, group_size))
    if full < head_dim:
        runs.append((full, head_dim, head_dim - full))
    return runs


def _reduce_segments(op: np.ufunc, a: np.ndarray, starts) -> np.ndarray:
    """op over each segment of every row of a contiguous 2-D array: segment i runs from
    starts[i] to starts[i + 1], the last one to the row's end. Returns [rows, segments].

    One ufunc.reduceat over the flat array: NumPy sets up a reduction along a short last
    axis once per output, and reduce(axis=-1) ran 3 times slower for rows of 128 and
    groups of 64 (NumPy 2.4). Only exact integer min/max go through here, so the order
    inside a segment cannot matter.
    """
    rows, width = a.shape
    if rows == 0:
        return np.empty((0, len(starts)), a.dtype)
    return op.reduceat(a.reshape(-1), _segment_offsets(rows, width, tuple(starts))).reshape(rows, len(starts))


@functools.lru_cache(maxsize=64)
def _segment_offsets(rows: int, width: int, starts: Tuple[int, ...]) -> np.ndarray:
    """Flat offsets of every segment start, row by row; cached, as every full chunk of a
    call has the same shape."""
    offsets = (np.arange(0, rows * width, width, dtype=np.intp)[:, None] + np.asarray(starts, np.intp)).ravel()
    offsets.flags.writeable = False
    return offsets


def _any_per_row(mask: np.ndarray) -> np.ndarray:
    """mask.any(axis=1) for a [rows, groups] mask with few groups, a column at a time:
    NumPy's reduction along the short axis is slow."""
    out = np.zeros(mask.shape[0], bool)
    for column in range(mask.shape[1]):
        out |= mask[:, column]
    return out


def _broadcast_groups(params: np.ndarray, head_dim: int, group_size: int) -> np.ndarray:
    """Per-group values [rows, groups] repeated to one per element [rows, head_dim]."""
    counts = [group_size] * (head_dim // group_size)
    if head_dim % group_size:
        counts.append(head_dim % group_size)
    return np.repeat(params, counts, axis=1)


def _symmetric_scale(amax: np.ndarray, reciprocal: np.float32):
    """Spec: scale = 1 if amax == 0 else max(amax * R(n), S_MIN); inv = 1 / scale.

    Returns (scale, inv, poisoned); a poisoned row gets the NaN scale and inv = 0.
    amax >= 0 (or NaN), so flush(amax) == 0 is amax < 2^-126.
    """
    poisoned = ~np.isfinite(amax)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.where(amax < MIN_NORMAL, ONE, np.maximum(amax * reciprocal, S_MIN))
    inv = ONE / scale  # a normal float32: scale lies in [2^-100, 2^121]
    if poisoned.any():
        scale = np.where(poisoned, NAN, scale)
        inv = np.where(poisoned, F32(0), inv)
    return scale, inv, poisoned


# --------------------------------------------------------------------- FP8
# Veltkamp's splitting constant for float32: c = y * (2^20 + 1), then (y - c) + c is y
# rounded to 24 - 20 = 4 significant bits, ties to even, which is the e4m3 grid for
# 2^-6 <= y <= 448 (tests/test_numpy_reference.py checks every float32 there). Three
# float passes replace eight integer ones.
_VELTKAMP_SPLITTER = _f32(_spec.VELTKAMP_SPLITTER_BITS)  # 2^20 + 1
_E4M3_MIN_NORMAL = _f32(_spec.E4M3_MIN_NORMAL_BITS)  # 2^-6
_E4M3_SUBNORMAL_STEPS = _f32(_spec.E4M3_SUBNORMAL_STEPS_BITS)  # 512 = 1 / 2^-9, the subnormal e4m3 step
_TWO_TO_120 = _f32(_spec.E4M3_DECODE_BIAS_BITS)  # the decoder's exponent bias gap, 127 - 7
# A rounded magnitude's float32 bits >> 20 are (exponent + 127) << 3 | mantissa; the
# e4m3 code is (exponent + 7) << 3 | mantissa, 960 less, and 960 = 64 (mod 256).
_E4M3_REBIAS_MOD_256 = np.uint8(64)


def _sparse_flatnonzero(mask: np.ndarray) -> np.ndarray:
    """np.flatnonzero for a mask that is almost all False: a scan of 8 flags at a time,
    then only the hit words, cheaper than flatnonzero of the mask or of the words
    (NumPy vectorises nonzero for bool only)."""
    flat = mask.reshape(-1)
    if flat.size % 8:
        return np.flatnonzero(flat)
    words = np.flatnonzero(flat.view(np.uint64) != 0)
    if words.size == 0:
        return words
    candidates = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    return candidates[flat[candidates]]


def _encode_e4m3_magnitudes(mag: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """out = e4m3 codes of the float32 magnitudes mag (0 <= mag < 464, contiguous),
    sign bit clear; mag is overwritten.

    Below 2^-6 e4m3 is subnormal with a fixed step of 2^-9, so the code is rint(mag * 512);
    such magnitudes are rare in real data and are patched afterwards."""
    with np.errstate(invalid="ignore"):
        small = _sparse_flatnonzero(np.less(mag, _E4M3_MIN_NORMAL))
    small_codes = np.rint(mag.reshape(-1)[small] * _E4M3_SUBNORMAL_STEPS).astype(np.uint8)
    np.multiply(mag, _VELTKAMP_SPLITTER, out=scratch)
    np.subtract(mag, scratch, out=mag)
    mag += scratch
    # Shifting straight into the uint8 output (NumPy narrows in its buffered loop) was
    # faster than a shift pass followed by a narrowing copy.
    np.right_shift(mag.view(U32), U32(20), out=out, casting="unsafe")
    out += _E4M3_REBIAS_MOD_256
    out.reshape(-1)[small] = small_codes


def _or_sign_bits(out: np.ndarray, signed: np.ndarray) -> None:
    """Set bit 7 of each code whose value in signed has its sign bit set (-0.0 included,
    as ml_dtypes does)."""
    sign = np.signbit(signed).view(np.uint8)
    sign *= np.uint8(0x80)  # NumPy's uint8 left shift is not vectorised
    out |= sign


def encode_e4m3(y: np.ndarray) -> np.ndarray:
    """e4m3fn codes (as uint8) of float32 values already clamped to [-448, 448].

    Equal to ml_dtypes' round-to-nearest-even cast on every such float32
    (tests/test_numpy_reference.py checks all 2^31 of them in an opt-in sweep,
    and every rounding boundary in the default run)."""
    y = np.ascontiguousarray(y, dtype=F32)
    out = np.empty(y.shape, np.uint8)
    _encode_e4m3_magnitudes(np.abs(y), np.empty(y.shape, F32), out)
    _or_sign_bits(out, y)
    return out


_E4M3_SUBNORMAL_STEP = F32(1) / _E4M3_SUBNORMAL_STEPS  # 2^-9, exact
_FLOAT32_SUBNORMAL = _f32(1)  # the smallest float32 subnormal, 2^-149


def _keeps_subnormals() -> bool:
    """Whether float32 subnormals survive arithmetic in this thread: not where a library
    set the CPU's flush-to-zero / denormals-are-zero modes (torch.set_flush_denormal(True),
    code built with -ffast-math), which are per thread."""
    return _FLOAT32_SUBNORMAL * F32(2) != 0


def _patch_subnormal_codes(codes_u8: np.ndarray, out: np.ndarray, scales: np.ndarray) -> None:
    """out = float32(code) * scale where the code is an e4m3 subnormal (exponent bits 0,
    mantissa m > 0: the value m * 2^-9, a normal float32), for when _decode_e4m3_into read
    it through a float32 subnormal that this CPU flushed. scales broadcasts per row."""
    flat = codes_u8.reshape(-1)
    where = _sparse_flatnonzero(((flat & np.uint8(0x78)) == 0) & ((flat & np.uint8(0x07)) != 0))
    if where.size == 0:
        return
    picked = flat[where]
    value = (picked & np.uint8(0x07)).astype(F32) * _E4M3_SUBNORMAL_STEP
    value = np.where(picked & np.uint8(0x80), -value, value)
    row_scales = np.broadcast_to(scales, (codes_u8.shape[0], 1))[where // codes_u8.shape[1], 0]
    with np.errstate(over="ignore", invalid="ignore"):
        out.reshape(-1)[where] = value * row_scales


def _decode_e4m3_into(codes_u8: np.ndarray, out: np.ndarray, factor=_TWO_TO_120) -> None:
    """out = float32 value of each e4m3fn code times factor / 2^120 (out contiguous).

    Placing the 7 magnitude bits at float32 bits 20-26 gives 2^(e-127)(1+m/8) for
    e > 0 and the subnormal m * 2^-129 for e = 0; both are the e4m3 value times
    2^-120. Sign-extending the code as int8 copies its sign bit into bit 31 (and bits
    27-30, which the mask clears). Multiplying by factor = 2^120 is exact (NumPy keeps
    float32 subnormals); factor = scale * 2^120, when that is exact, gives value *
    scale with the one rounding of the spec's product."""
    bits = out.view(np.int32)
    np.copyto(bits, codes_u8.view(np.int8), casting="unsafe")
    bits <<= np.int32(20)
    bits &= np.int32(-0x78100000)  # 0x87F00000: the sign and the 7 magnitude bits
    out *= factor


def _fp8_encode_block(xc: np.ndarray, inv, work: np.ndarray, out: np.ndarray, clamp: bool) -> None:
    """out = e4m3(clamp(x * inv, -448, 448)) for one chunk of rows; work holds |x| on entry.

    inv > 0, so x * inv has the sign of x and |x * inv| = |x| * inv. With a dynamic
    scale |x * inv| < 448.0002 (docs/spec.md, section 10): rounding gives 448 exactly as
    the clamp would, so the clamp may be skipped."""
    with np.errstate(invalid="ignore", over="ignore"):
        np.multiply(work, inv, out=work)
        if clamp:
            np.minimum(work, FP8_MAX, out=work)
    _encode_e4m3_magnitudes(work, np.empty(work.shape, F32), out)
    _or_sign_bits(out, xc)


def fp8_quantize_per_token(x: np.ndarray):
    rows, width = x.shape
    codes = np.empty((rows, width), np.uint8)
    scales = np.empty(rows, F32)

    def chunk(start, stop):
        xc = _widen(x[start:stop])
        work = np.empty(xc.shape, F32)
        amax = _absmax_rows(xc, work.view(U32))
        scale, inv, poisoned = _symmetric_scale(amax, R448)
        block = codes[start:stop]
        _fp8_encode_block(xc, inv[:, None], work, block, clamp=False)
        block[poisoned] = 0
        scales[start:stop] = scale

    _each_chunk(rows, width, chunk)
    return codes.view(ml_dtypes.float8_e4m3fn), scales


def fp8_quantize_per_tensor(x: np.ndarray, static_scale: Optional[float]):
    rows, width = x.shape
    if static_scale is None:
        def chunk_amax(start, stop):
            xc = _widen(x[start:stop])
            return _absmax_rows(xc, np.empty(xc.shape, np.uint32)).max(initial=F32(0))

        amax = max(_each_chunk(rows, width, chunk_amax), key=_nan_wins, default=F32(0))
        scale, inv, poisoned = (a[0] for a in _symmetric_scale(np.array([amax], F32), R448))
        flush_input = False
    else:
        scale = F32(static_scale)
        inv = flush(ONE / scale)[()]
        # 1/scale <= 2^116 maps every subnormal input below half the smallest e4m3 step
        # (2^-10), so reading it as zero changes no code; above that it must be flushed.
        flush_input = scale < STATIC_SCALE_DAZ
        poisoned = False
    codes = np.empty((rows, width), np.uint8)

    def chunk(start, stop):
        xc = _widen(x[start:stop])
        if flush_input:
            xc = flush(xc)
        work = _abs_into(xc, np.empty(xc.shape, F32))
        # A static scale has no amax to carry a NaN or inf, so look for one in |x|'s bits.
        nonfinite = static_scale is not None and work.view(U32).max() >= _INF_BITS
        _fp8_encode_block(xc, inv, work, codes[start:stop], clamp=static_scale is not None)
        return nonfinite

    any_nonfinite = any(_each_chunk(rows, width, chunk))
    if static_scale is not None and any_nonfinite:
        poisoned, scale = True, NAN
    if poisoned:
        codes[...] = 0
    return codes.view(ml_dtypes.float8_e4m3fn), np.array(scale, F32)


def _nan_wins(v):
    return (math.isnan(v), v)


def fp8_dequantize(codes: np.ndarray, scales: np.ndarray, out_dtype: str):
    """value = flush_product(float32(code) * scale), rounded once to out_dtype; a NaN code or
    scale gives the canonical NaN.

    scales is [rows, 1] (per token) or [1, 1] (per tensor).
    """
    rows, width = codes.shape
    scales = flush(scales)
    out = np.empty((rows, width), _NP_DTYPES[out_dtype])
    # A scale >= 2^-116 times a nonzero e4m3 magnitude (>= 2^-9) is >= 2^-125: no flush.
    needs_flush = bool((scales < FP8_PLAIN_SCALE).any())
    # scale * 2^120 is exact below 2^8 (and NaN or inf stay so), which folds the decoder's
    # 2^120 into the one product.
    with np.errstate(over="ignore", invalid="ignore"):
        fold = not (np.abs(scales) >= F32(2.0**8))[np.isfinite(scales)].any()
        factors = scales * _TWO_TO_120 if fold else scales

    @np.errstate(over="ignore", invalid="ignore")  # float16 may overflow to inf, as specified
    def chunk(start, stop):
        block = _float32_rows(out, start, stop)
        code_bytes = codes[start:stop].view(np.uint8)
        factor = factors if factors.shape[0] == 1 else factors[start:stop]
        if fold:
            _decode_e4m3_into(code_bytes, block, factor)
        else:
            _decode_e4m3_into(code_bytes, block)
            block *= factor
        if not _keeps_subnormals():
            _patch_subnormal_codes(code_bytes, block, scales if scales.shape[0] == 1 else scales[start:stop])
        if needs_flush:
            block[...] = flush_product(block)
        # 0x7F and 0xFF are e4m3fn's NaN: never produced, but a caller may hand them in.
        nan_codes = code_bytes | np.uint8(0x80)
        if nan_codes.max() == 0xFF:
            block[nan_codes == 0xFF] = NAN
        _store_rows(out, start, stop, block)

    _each_chunk(rows, width, chunk)
    _canonical_nans(out, ~np.isfinite(scales[:, 0]), out_dtype)
    return out


def _canonical_nan(out_dtype: str) -> np.ndarray:
    """The spec's NaN of an output dtype, built from its bits."""
    dtype = _NP_DTYPES[out_dtype]
    carrier = np.uint32 if dtype.itemsize == 4 else np.uint16
    return np.array(_spec.NAN_BITS_BY_DTYPE[out_dtype], dtype=carrier).view(dtype)


def _canonical_nans(out: np.ndarray, suspect_rows: np.ndarray, out_dtype: str) -> None:
    """Every NaN a dequantization writes is the one canonical NaN of out_dtype: hardware
    differs in which NaN x * NaN or 0 * inf returns (x86 keeps an operand's payload, CUDA
    returns 0x7FFFFFFF), so the spec names the bits. Only a row with a non-finite scale or
    zero (suspect_rows, one flag per row or one for the whole tensor) can hold a NaN from
    arithmetic, so only those rows are searched."""
    rows = np.flatnonzero(suspect_rows)
    if rows.size == 0:
        return
    block = out if suspect_rows.shape[0] == 1 else out[rows]
    block[np.isnan(block)] = _canonical_nan(out_dtype)
    if suspect_rows.shape[0] != 1:
        out[rows] = block


# -------------------------------------------------------------------- INT8
def int8_quantize(x: np.ndarray):
    rows, width = x.shape
    codes = np.empty((rows, width), np.int8)
    scales = np.empty(rows, F32)

    def chunk(start, stop):
        xc = _widen(x[start:stop])
        work = np.empty(xc.shape, F32)
        amax = _absmax_rows(xc, work.view(U32))
        scale, inv, poisoned = _symmetric_scale(amax, R127)
        with np.errstate(invalid="ignore"):
            np.multiply(xc, inv[:, None], out=work)
        # |x * inv| <= 127.00003 (docs/spec.md, "INT8"), so the clamp to [-127, 127] can
        # never act and round-half-even is the magic-number addition.
        work += _ROUND_MAGIC_SIGNED
        np.copyto(codes[start:stop], work.view(np.int32), casting="unsafe")
        codes[start:stop][poisoned] = 0
        scales[start:stop] = scale

    _each_chunk(rows, width, chunk)
    return codes, scales


def int8_dequantize(codes: np.ndarray, scales: np.ndarray, out_dtype: str):
    """value = float32(q) * scale; never subnormal, since |q| >= 1 and a read scale is normal."""
    scales = flush(scales)
    out = np.empty(codes.shape, _NP_DTYPES[out_dtype])

    @np.errstate(over="ignore", invalid="ignore")  # float16 may overflow to inf, as specified
    def chunk(start, stop):
        block = _float32_rows(out, start, stop)
        np.multiply(codes[start:stop], scales[start:stop], out=block, dtype=F32)
        _store_rows(out, start, stop, block)

    _each_chunk(*codes.shape, chunk)
    _canonical_nans(out, ~np.isfinite(scales[:, 0]), out_dtype)
    return out


# -------------------------------------------------------------- INT4, INT2
def _asymmetric_params(mn: np.ndarray, mx: np.ndarray, reciprocal: np.float32):
    """Spec scale, inverse and zero of an asymmetric group (INT4, R(15); INT2, R(3)) from
    its min and max (float32 arrays of any shape).

    A zero minimum is +0.0 whatever sign the reduction chose, so flushing mn gives +0
    outright. The signs of a flushed mx and rng cannot matter: mx only enters
    rng = mx - mn, which is >= 0 (or NaN) and is only compared with zero or scaled
    when it is not zero."""
    with np.errstate(invalid="ignore", over="ignore"):
        mn = np.where(np.abs(mn) < MIN_NORMAL, F32(0), mn)
        mx = np.where(np.abs(mx) < MIN_NORMAL, F32(0), mx)
        rng = mx - mn
        poisoned = ~np.isfinite(rng)
        scale = np.where(rng < MIN_NORMAL, ONE, np.maximum(rng * reciprocal, S_MIN))  # flush(rng) == 0
        with np.errstate(divide="ignore"):
            inv = ONE / scale
        # A reciprocal below 2^-126 counts as zero (spec section 1). 2-bit scales reach
        # range * R(3) > 2^126 (section 12); INT4's stay below 2^125, so for them this
        # changes nothing (section 8, item 11).
        inv = np.where(inv < MIN_NORMAL, F32(0), inv)
        zero = flush_product(-(mn * inv))
    if poisoned.any():
        scale = np.where(poisoned, NAN, scale)
        inv = np.where(poisoned, F32(0), inv)
        zero = np.where(poisoned, NAN, zero)
        mn = np.where(poisoned, F32(0), mn)
    return scale, inv, zero, mn, poisoned


def _rounded_codes(work: np.ndarray) -> np.ndarray:
    """uint8 round-half-even of (x - mn) * inv, in place on work. 0 <= (x - mn) * inv <=
    levels * 1.000001 (docs/spec.md, section 10, for 15 and 3 alike): the clamp never
    acts, and a negative value only arises as -tiny when mn was flushed, rounding to 0."""
    work += _ROUND_MAGIC_UNSIGNED
    return work.view(np.uint32).astype(np.uint8)


def _quantize_token_groups(x: np.ndarray, group_size: int, reciprocal: np.float32, codes_per_byte: int):
    rows, width = x.shape
    groups = num_groups(width, group_size)
    packed = np.empty((rows, width // codes_per_byte), np.uint8)
    scales = np.empty((rows, groups), F32)
    zeros = np.empty((rows, groups), F32)
    pack = _PACKERS[codes_per_byte]

    def chunk(start, stop):
        xc = np.ascontiguousarray(_widen(x[start:stop]))
        work = np.empty(xc.shape, F32)
        mn, mx = _group_min_max(xc, group_size)
        scale, inv, zero, mn, poisoned = _asymmetric_params(mn, mx, reciprocal)
        with np.errstate(invalid="ignore", over="ignore"):
            if width % group_size == 0:
                shaped = work.reshape(stop - start, groups, group_size)
                np.subtract(xc.reshape(shaped.shape), mn[:, :, None], out=shaped)
                shaped *= inv[:, :, None]
            else:
                np.subtract(xc, _broadcast_groups(mn, width, group_size), out=work)
                work *= _broadcast_groups(inv, width, group_size)
        block = pack(_rounded_codes(work))
        if poisoned.any():
            block[_broadcast_groups(poisoned, width, group_size)[:, 0::codes_per_byte]] = 0
        packed[start:stop] = block
        scales[start:stop] = scale
        zeros[start:stop] = zero

    _each_chunk(rows, width, chunk)
    return packed, scales, zeros


def int4_quantize(x: np.ndarray, group_size: int):
    return _quantize_token_groups(x, group_size, R15, 2)


def int2_quantize(x: np.ndarray, group_size: int):
    return _quantize_token_groups(x, group_size, R3, 4)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, 2n] (each below 16) to bytes [rows, n], element 2j in the low
    nibble: each pair read as one little-endian uint16 w = lo + 256 hi gives the byte
    as the low 8 bits of w | w >> 4, in two passes instead of two strided ones."""
    pairs = np.ascontiguousarray(q).view("<u2")
    return (pairs | (pairs >> np.uint16(4))).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_nibbles: bytes [rows, n] to uint8 codes [rows, 2n]."""
    w = packed.astype("<u2")
    hi = w >> np.uint16(4)
    w &= np.uint16(0x0F)
    hi <<= np.uint16(8)
    w |= hi
    return w.view(np.uint8)


def pack_crumbs(q: np.ndarray) -> np.ndarray:
    """uint8 2-bit codes [rows, 4n] to bytes [rows, n], element 4j in bits 0-1 up to
    4j+3 in bits 6-7: each quad read as one little-endian uint32 w = c0 + 2^8 c1 +
    2^16 c2 + 2^24 c3, the byte is the low 8 bits of w | w >> 6 | w >> 12 | w >> 18
    (each shift brings one code to its place; the rest lands above bit 7)."""
    w = np.ascontiguousarray(q).view("<u4")
    return (w | (w >> np.uint32(6)) | (w >> np.uint32(12)) | (w >> np.uint32(18))).astype(np.uint8)


def unpack_crumbs(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_crumbs: bytes [rows, n] to uint8 codes [rows, 4n]."""
    codes = (packed[..., None] >> np.arange(0, 8, 2, dtype=np.uint8)) & np.uint8(3)
    return codes.reshape(packed.shape[:-1] + (packed.shape[-1] * 4,))


_PACKERS = {2: pack_nibbles, 4: pack_crumbs}
_UNPACKERS = {2: unpack_nibbles, 4: unpack_crumbs}


def _dequantize_token_groups(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
                             out_dtype: str, codes_per_byte: int):
    """value = flush_product((float32(q) - zero) * scale), rounded once to out_dtype."""
    rows, packed_width = packed.shape
    width = packed_width * codes_per_byte
    unpack = _UNPACKERS[codes_per_byte]
    scales, zeros = flush(scales), flush(zeros)
    out = np.empty((rows, width), _NP_DTYPES[out_dtype])
    risky_rows = np.flatnonzero(_any_per_row(_asymmetric_at_risk(scales, zeros)))

    @np.errstate(over="ignore", invalid="ignore")  # float16 may overflow to inf, as specified
    def chunk(start, stop):
        block = _float32_rows(out, start, stop)
        np.copyto(block, unpack(packed[start:stop]))
        if width % group_size == 0:
            shaped = block.reshape(stop - start, -1, group_size)
            shaped -= zeros[start:stop, :, None]
            shaped *= scales[start:stop, :, None]
        else:
            block -= _broadcast_groups(zeros[start:stop], width, group_size)
            block *= _broadcast_groups(scales[start:stop], width, group_size)
        local = risky_rows[(risky_rows >= start) & (risky_rows < stop)] - start
        _flush_product_rows_inplace(block, local)
        _store_rows(out, start, stop, block)

    _each_chunk(rows, width, chunk)
    _canonical_nans(out, _any_per_row(~(np.isfinite(scales) & np.isfinite(zeros))), out_dtype)
    return out


def _asymmetric_at_risk(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Groups whose dequantized values can fall below 2^-125, whatever their codes' width:
    a scale below 2^-99, or 0 < |zero * scale| < 2^-124 (docs/spec.md, section 8, item 7;
    a zero of 0 does not make a small scale safe: q = 1 gives the scale itself)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (scales < INT4_PLAIN_SCALE) | ((np.abs(zeros) * scales < INT4_PLAIN_ZERO_PRODUCT) & (zeros != 0))


def int4_dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, out_dtype: str):
    return _dequantize_token_groups(packed, scales, zeros, group_size, out_dtype, 2)


def int2_dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, out_dtype: str):
    return _dequantize_token_groups(packed, scales, zeros, group_size, out_dtype, 4)


# ------------------------------------------------- per channel (spec v1.1)
def _quantize_channel_blocks(x: np.ndarray, group_size: int, reciprocal: np.float32, codes_per_byte: int):
    """x [tokens, head_dim], tokens a multiple of G (so blocks never straddle the
    leading dimensions of the caller's [..., seq, head_dim]): one scale and zero per
    channel of each block of G tokens, [tokens / G, head_dim]; codes packed along
    head_dim as the per-token formats are. NumPy's float min and max along the block's
    token axis propagate NaN, so a poisoned (block, channel) has a NaN range."""
    rows, width = x.shape
    blocks = rows // group_size
    packed = np.empty((rows, width // codes_per_byte), np.uint8)
    scales = np.empty((blocks, width), F32)
    zeros = np.empty((blocks, width), F32)
    pack = _PACKERS[codes_per_byte]

    def chunk(start, stop):
        xb = _widen(x[start * group_size:stop * group_size]).reshape(stop - start, group_size, width)
        scale, inv, zero, mn, poisoned = _asymmetric_params(xb.min(axis=1), xb.max(axis=1), reciprocal)
        with np.errstate(invalid="ignore", over="ignore"):
            work = (xb - mn[:, None, :]) * inv[:, None, :]
        q = _rounded_codes(work)
        if poisoned.any():
            q[np.broadcast_to(poisoned[:, None, :], q.shape)] = 0
        packed[start * group_size:stop * group_size] = pack(q.reshape(-1, width))
        scales[start:stop] = scale
        zeros[start:stop] = zero

    _each_chunk(blocks, group_size * width, chunk)
    return packed, scales, zeros


def _dequantize_channel_blocks(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
                               out_dtype: str, codes_per_byte: int):
    rows, packed_width = packed.shape
    width = packed_width * codes_per_byte
    blocks = rows // group_size
    unpack = _UNPACKERS[codes_per_byte]
    scales, zeros = flush(scales), flush(zeros)
    out = np.empty((rows, width), _NP_DTYPES[out_dtype])
    needs_flush = bool(_asymmetric_at_risk(scales, zeros).any())

    @np.errstate(over="ignore", invalid="ignore")  # float16 may overflow to inf, as specified
    def chunk(start, stop):
        block = _float32_rows(out, start * group_size, stop * group_size)
        np.copyto(block, unpack(packed[start * group_size:stop * group_size]))
        shaped = block.reshape(stop - start, group_size, width)
        shaped -= zeros[start:stop, None, :]
        shaped *= scales[start:stop, None, :]
        if needs_flush:
            block[...] = flush_product(block)
        _store_rows(out, start * group_size, stop * group_size, block)

    _each_chunk(blocks, group_size * width, chunk)
    # Only a group with a non-finite scale or zero can hold a NaN from arithmetic (an
    # infinite one may also give inf, which stays); its NaNs get the canonical bits.
    suspects = ~(np.isfinite(scales) & np.isfinite(zeros))
    if suspects.any():
        shaped = out.reshape(blocks, group_size, width)
        shaped[np.isnan(shaped) & suspects[:, None, :]] = _canonical_nan(out_dtype)
    return out


def int4_channel_quantize(x: np.ndarray, group_size: int):
    return _quantize_channel_blocks(x, group_size, R15, 2)


def int4_channel_dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, out_dtype: str):
    return _dequantize_channel_blocks(packed, scales, zeros, group_size, out_dtype, 2)


def int2_channel_quantize(x: np.ndarray, group_size: int):
    return _quantize_channel_blocks(x, group_size, R3, 4)


def int2_channel_dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, out_dtype: str):
    return _dequantize_channel_blocks(packed, scales, zeros, group_size, out_dtype, 4)
