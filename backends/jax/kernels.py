"""The JAX kernels: docs/spec.md on jax.Array, eagerly and under jit, vmap and sharding.

Same function names as backends/numpy/kernels.py. The kernels reduce over the last axis
of an array of any rank and never reshape leading axes, so a KV cache sharded
over batch, kv_heads or tokens stays sharded and the per-token and per-group
paths need no collective; per-tensor FP8 needs exactly one (the global max).

XLA on the CPU rewrites x / broadcast(s) into x * (1/s), contracts a multiply
followed by an add into an FMA inside fusions, and flushes subnormals (FTZ and
DAZ). None can change these results (docs/spec.md, "Why compilers cannot change
the bits"): the reciprocal is computed once per token and multiplied; no product
is ever added to anything (the float adds that round by a magic number take a
minimum's output or a bitcast); and the spec flushes every subnormal itself, explicitly
here too, because XLA on GPUs keeps subnormals. Constants are NumPy float32 built
from bit patterns, so jax_enable_x64 cannot turn them into float64.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvquant import _formulas, _spec

NAME = "jax"

F32 = jnp.float32

DTYPES = {
    "float32": jnp.dtype(jnp.float32),
    "float16": jnp.dtype(jnp.float16),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float8_e4m3fn": jnp.dtype(jnp.float8_e4m3fn),
    "int8": jnp.dtype(jnp.int8),
    "uint8": jnp.dtype(jnp.uint8),
}


def _f32(bits: int) -> np.float32:
    return np.float32(_spec.f32_from_bits(bits))


R448 = _f32(_spec.R448_BITS)
R127 = _f32(_spec.R127_BITS)
R15 = _f32(_spec.R15_BITS)
R3 = _f32(_spec.R3_BITS)
S_MIN = _f32(_spec.S_MIN_BITS)
ONE = _f32(_spec.ONE_BITS)
ZERO = np.float32(0)
FP8_MAX = _f32(_spec.FP8_MAX_BITS)
INT8_MAX = _f32(_spec.INT8_MAX_BITS)
MIN_NORMAL = _f32(_spec.MIN_NORMAL_BITS)
PRODUCT_FLUSH = _f32(_spec.PRODUCT_FLUSH_BITS)
FP8_PLAIN_SCALE = _f32(_spec.FP8_PLAIN_SCALE_BITS)
INT4_PLAIN_SCALE = _f32(_spec.INT4_PLAIN_SCALE_BITS)
INT4_PLAIN_ZERO_PRODUCT = _f32(_spec.INT4_PLAIN_ZERO_PRODUCT_BITS)
NAN = _f32(_spec.NAN_BITS)
INF = np.float32(np.inf)
_NAN_BITS = {
    "float32": np.array(_spec.NAN_BITS_BY_DTYPE["float32"], np.uint32).view(np.int32)[()],
    "float16": np.array(_spec.NAN_BITS_BY_DTYPE["float16"], np.uint16).view(np.int16)[()],
    "bfloat16": np.array(_spec.NAN_BITS_BY_DTYPE["bfloat16"], np.uint16).view(np.int16)[()],
}


class _JaxMath:
    """The array namespace kvquant/_formulas.py computes with."""

    where = staticmethod(jnp.where)
    isfinite = staticmethod(jnp.isfinite)
    abs = staticmethod(jnp.abs)
    copysign = staticmethod(jnp.copysign)
    zeros_like = staticmethod(jnp.zeros_like)
    maximum = staticmethod(jnp.maximum)
    concat = staticmethod(lambda parts, axis=-1: jnp.concatenate(parts, axis=axis))
    nan = staticmethod(lambda ref: NAN)

    @staticmethod
    def reciprocal_rn(s):
        return reciprocal_rn(s)

    ONE, ZERO, S_MIN, MIN_NORMAL, PRODUCT_FLUSH = ONE, ZERO, S_MIN, MIN_NORMAL, PRODUCT_FLUSH

    amin = staticmethod(lambda v, axis: jnp.min(v, axis=axis))
    amax = staticmethod(lambda v, axis: jnp.max(v, axis=axis))
    stack = staticmethod(lambda parts, axis: jnp.stack(parts, axis=axis))
    as_float32 = staticmethod(lambda v: v.astype(F32))
    canonical = staticmethod(lambda p: _canonical_params(p))

    @staticmethod
    def poisoned_max(blocks, reduced, axis):
        """XLA's CPU reductions drop NaN (_poison_nonfinite): the maximum made +inf
        where the slice along ``axis`` holds NaN or inf."""
        if axis == -1:
            return _poison_nonfinite(blocks, reduced)
        return jax.lax.platform_dependent(blocks, reduced, cpu=_poison_blocks_by_product_with_zeros, default=_as_reduced)

    # A poisoned group's NaN or inf elements give garbage codes, replaced by 0 once
    # packed: a select on the bytes keeps XLA's loop vectorised, one on the floats did not.
    ZERO_POISONED_BYTES = True
    zero_poisoned = staticmethod(lambda y, poisoned: jnp.where(poisoned, jnp.zeros((), y.dtype), y))
    dequantized = staticmethod(lambda b, z, s: (b - z) * s)
    scaled_offsets = staticmethod(lambda x, mn, inv: (x - mn) * inv)
    flush_products = staticmethod(lambda v, scales, zeros: flush_product(v))
    pack_codes = staticmethod(lambda q, codes_per_byte: pack_codes(q, codes_per_byte))
    pack_group_codes = pack_codes
    unpack_codes = staticmethod(lambda packed, codes_per_byte: unpack_codes(packed, codes_per_byte))

    @staticmethod
    def materialized(*params):
        out = _materialize(*(p.astype(F32) for p in params))
        return tuple(o > ZERO if p.dtype == jnp.bool_ else o for p, o in zip(params, out))

    @staticmethod
    def codes(y, levels):
        """round_clamped after a minimum (the spec's upper clamp, which also keeps XLA
        from contracting the product into the magic-number add)."""
        return round_clamped(jnp.minimum(y, np.float32(levels)), ROUND_MAGIC_UNSIGNED).astype(jnp.uint8)


M = _JaxMath


def flush(v, below=MIN_NORMAL):
    """Spec flush() (kvquant/_formulas.py)."""
    return _formulas.flush(M, v, below)


def flush_product(v):
    """Spec flush_product(). XLA on the CPU flushes a product whose exact value rounds
    (with unbounded exponent) below 2^-126, which IEEE rounding can lift to 2^-126;
    flushing the whole lowest normal binade makes both agree."""
    return _formulas.flush_product(M, v)


def _widen(x):
    return x.astype(F32)


def reciprocal_rn(s):
    """float32(1 / s), correctly rounded and flushed, for positive normal float32 s
    (docs/spec.md, "Reciprocals").

    On the CPU a plain division: XLA's CPU division is IEEE (tests/test_reciprocal.py
    checks it under jit on 300,000 scales); its rewrite into a multiplication by a
    reciprocal applies to a broadcast divisor, and here the divisor is the scale array
    itself. Elsewhere by integer long division: XLA on GPUs divides float32
    approximately (1 ulp off on an H100, which moved INT4 zeros and FP8 codes). The
    choice is made when lowering, per platform; on the CPU the long division would cost
    a fifth of a quantization (docs/performance.md).
    """
    return jax.lax.platform_dependent(s, cpu=_reciprocal_by_division, default=reciprocal_by_long_division)


def _reciprocal_by_division(s):
    return flush(ONE / s)


def reciprocal_by_long_division(s):
    """reciprocal_rn off the CPU, exact on any device (tests run it on the CPU too)."""
    bits = _spec.reciprocal_rn_bits(jax.lax.bitcast_convert_type(s, jnp.int32), jnp.where, _floor_div_estimate)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.int32), F32)


def _floor_div_estimate(n, m):
    return jnp.floor(n.astype(F32) / m.astype(F32)).astype(jnp.int32)


def _symmetric_scale(amax, reciprocal):
    return _formulas.symmetric_scale(M, amax, reciprocal)


def _to_output(v, out_dtype: str):
    """Round once to out_dtype; every NaN (a NaN code, scale or zero, or 0 x inf from a
    caller's infinite scale) gets the canonical NaN bits, written as integers so that no
    conversion can pick another NaN."""
    return _to_output_nan_where(v, jnp.isnan(v), out_dtype)


def _to_output_nan_where(v, nan, out_dtype: str):
    """_to_output for values known to be NaN exactly where ``nan`` holds."""
    out = v.astype(DTYPES[out_dtype])
    carrier = jnp.int32 if out_dtype == "float32" else jnp.int16
    bits = jnp.where(nan, _NAN_BITS[out_dtype], jax.lax.bitcast_convert_type(out, carrier))
    return jax.lax.bitcast_convert_type(bits, DTYPES[out_dtype])


def _canonical_params(p):
    """Read scales/zeros as the spec does: subnormals flushed, any NaN made canonical."""
    p = flush(p.astype(F32))
    return jnp.where(jnp.isnan(p), NAN, p)


def _zero_where(codes, poisoned):
    if codes.dtype == jnp.float8_e4m3fn:
        as_int = jax.lax.bitcast_convert_type(codes, jnp.uint8)
        as_int = jnp.where(poisoned, jnp.uint8(0), as_int)
        return jax.lax.bitcast_convert_type(as_int, jnp.float8_e4m3fn)
    return jnp.where(poisoned, jnp.zeros((), codes.dtype), codes)


# --------------------------------------------------------------------- FP8
U32 = jnp.uint32
I32 = jnp.int32
SUBNORMAL_E4M3_SHIFTER = _f32(_spec.E4M3_SUBNORMAL_SHIFTER_BITS)


def encode_e4m3(y):
    """e4m3fn codes of float32 values of magnitude below 464 by the integer method of
    _spec.e4m3_code_words, shared with the compiled torch backend: no float rewrite or
    flush can touch it, and it is faster than XLA's own float8 convert on the CPU
    (docs/performance.md)."""
    bits = jax.lax.bitcast_convert_type(y, I32)
    words = _spec.e4m3_code_words(bits, _add_subnormal_shifter, jnp.where)
    return jax.lax.bitcast_convert_type(words.astype(jnp.uint8), jnp.float8_e4m3fn)


def _add_subnormal_shifter(magnitude_bits):
    total = jax.lax.bitcast_convert_type(magnitude_bits, F32) + SUBNORMAL_E4M3_SHIFTER
    return jax.lax.bitcast_convert_type(total, I32)


def decode_e4m3(codes):
    """(float32 value, is-NaN) of e4m3fn codes, exactly. A normal code's 7 magnitude bits
    at float32 bits 20-26 plus an exponent bias of 120 are its value; a subnormal one
    (exponent 0) is its 3 mantissa bits times 2^-9. Every result is a normal float32, so
    a flushing device reads it unchanged."""
    c = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(U32)
    mag = c & U32(0x7F)
    normal = jax.lax.bitcast_convert_type((mag << U32(20)) + U32(120 << 23), F32)
    small = mag.astype(F32) * np.float32(2.0**-9)
    value = jax.lax.bitcast_convert_type(jnp.where(mag < U32(8), small, normal), U32) | ((c & U32(0x80)) << U32(24))
    return jax.lax.bitcast_convert_type(value, F32), mag == U32(0x7F)


def _fp8_codes(xf, inv, clamp: bool):
    """e4m3(clamp(x * inv, -448, 448)). With a dynamic scale |x * inv| < 448.0002, which
    the encoder rounds to 448 as the clamp would (docs/spec.md, section 10), so only a
    static scale clamps: on the CPU the loop is compute-bound, and the clamp's two
    operations were a tenth of it. XLA's own cast would give NaN past 448; the encoder
    never sees a value it cannot round."""
    y = xf * inv
    return encode_e4m3(jnp.clip(y, -FP8_MAX, FP8_MAX) if clamp else y)


def _materialize(*params):
    """The same float32 arrays, computed once before the per-element loop that reads them.

    Speed only, no bits change: XLA on the CPU otherwise fuses the per-token or per-group
    arithmetic into the element loop and redoes it for every element (INT4: 37 times a
    copy instead of 1.9). An optimization_barrier over a tuple did not stop it (XLA
    dropped it); over one stacked array it does.
    """
    stacked = jax.lax.optimization_barrier(jnp.stack(params))
    return tuple(stacked[i] for i in range(len(params)))


def _absmax(xf, per_token: bool):
    """max |x| per token (over the last axis) or over the whole tensor; not finite if
    the token or tensor holds a NaN or an inf (+inf for a NaN on the CPU, see
    _poison_nonfinite).

    Per token as max(x) and -min(x): XLA on the CPU reduces both in one pass faster
    than it reduces |x|.
    Over the whole tensor, the maximum of those per-token values: one global maximum,
    so a sharded cache needs one all-reduce, not two."""
    if not per_token:
        return jnp.max(_absmax(xf, per_token=True))
    return _poison_nonfinite(xf, jnp.maximum(jnp.max(xf, axis=-1), -jnp.min(xf, axis=-1)))


def _poison_nonfinite(x, reduced):
    """``reduced``, a maximum over x's last axis, made +inf where that slice holds a NaN
    or an infinity, so that ~isfinite() finds every poisoned token or group.

    XLA on the CPU hands max and min reductions of more than a few dozen rows to
    YNNPACK, whose reductions drop NaN (jax 0.10.2: every row of [32768, 128] holding
    one NaN came back finite, one even -inf; openxla/xla#21461 is the same bug), and a
    select on x in front of them is computed as a pass of its own.
    A product with a vector of zeros is NaN exactly where the slice holds NaN or +-inf
    (NaN * 0 and inf * 0 are NaN, every finite * 0 is +-0, and sums of zeros cannot
    overflow): a matrix-vector product reads x once. +inf
    rather than NaN: FP8 per tensor then takes the maximum of these values through the
    same reductions, which keep infinities. Elsewhere XLA's reductions propagate NaN,
    and the values pass through."""
    return jax.lax.platform_dependent(x, reduced, cpu=_poison_by_product_with_zeros, default=_as_reduced)


def _poison_by_product_with_zeros(x, reduced):
    # The barrier keeps XLA from folding a product with constant zeros.
    zeros = jax.lax.optimization_barrier(jnp.zeros((x.shape[-1],), F32))
    return jnp.where(jnp.isnan(jnp.matmul(x, zeros, precision=jax.lax.Precision.HIGHEST)), INF, reduced)


def _poison_blocks_by_product_with_zeros(blocks, reduced):
    """_poison_by_product_with_zeros along the block's token axis (-2)."""
    zeros = jax.lax.optimization_barrier(jnp.zeros((blocks.shape[-2],), F32))
    product = jnp.einsum("...gd,g->...d", blocks, zeros, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(jnp.isnan(product), INF, reduced)


def _as_reduced(x, reduced):
    return reduced


def _per_token_params(xf, reciprocal):
    scale, inv, poisoned = _symmetric_scale(_absmax(xf, per_token=True), reciprocal)
    inv, poisoned = M.materialized(inv, poisoned)
    return scale, inv, poisoned


def fp8_quantize_per_token(x):
    xf = _widen(x)
    scale, inv, poisoned = _per_token_params(xf, R448)
    codes = _fp8_codes(xf, inv[..., None], clamp=False)
    return _zero_where(codes, poisoned[..., None]), scale


def fp8_quantize_per_tensor(x, static_scale: Optional[float]):
    if static_scale is None:
        return _fp8_per_tensor_dynamic(x)
    return _fp8_per_tensor_static(x, *static_scale_args(static_scale))


def static_scale_args(static_scale: float):
    """_spec.static_scale_parts, scale and reciprocal as float32 NumPy scalars (jit
    takes them as arrays). Traced, the division was redone per element."""
    scale, inv, flush_input = _spec.static_scale_parts(static_scale)
    return np.float32(scale), np.float32(inv), flush_input


def _fp8_per_tensor_dynamic(x):
    xf = _widen(x)
    amax = _absmax(xf, per_token=False) if xf.size else jnp.zeros((), F32)
    scale, inv, poisoned = _symmetric_scale(amax, R448)
    return _zero_where(_fp8_codes(xf, inv, clamp=False), poisoned), scale


def _fp8_per_tensor_static(x, scale, inv, flush_input: bool):
    xf = _widen(x)
    if flush_input:
        xf = flush(xf)
    scale, inv = jnp.asarray(scale, F32), jnp.asarray(inv, F32)
    # max |x| carries NaN and inf; a reduction over isfinite ran twice as long on the CPU.
    poisoned = ~jnp.isfinite(_absmax(xf, per_token=False)) if xf.size else jnp.zeros((), bool)
    scale = jnp.where(poisoned, NAN, scale)
    return _zero_where(_fp8_codes(xf, inv, clamp=True), poisoned), scale


def fp8_dequantize(codes, scales, out_dtype: str, scales_checked: bool = False):
    """value = flush_product(float32(code) * scale); scales broadcast against codes. A NaN code
    (0x7F, 0xFF) or a NaN scale gives the canonical NaN.

    scales_checked: every scale is known to be finite and >= 2^-116 (fp8_scales_checked).
    Then a nonzero e4m3 magnitude (>= 2^-9) times the scale is >= 2^-125, so the flush
    changes nothing, and only a NaN code can give a NaN: a faster dequantization with
    the same bits. Such scales are already canonical."""
    value, nan_code = decode_e4m3(codes)
    if scales_checked:
        return _to_output_nan_where(value * scales.astype(F32), nan_code, out_dtype)
    scales = _canonical_params(scales)
    v = flush_product(value * scales)
    return _to_output(jnp.where(nan_code, NAN, v), out_dtype)


@jax.jit
def fp8_scales_checked(scales):
    """Whether fp8_dequantize may take scales_checked=True for these scales."""
    s = scales.astype(F32)
    return jnp.all((s >= FP8_PLAIN_SCALE) & (s < INF))


# -------------------------------------------------------------------- INT8
# Rounding to integers, ties to even, by one float add: y + 1.5*2^23 (|y| <= 127) or
# y + 2^23 (0 <= y <= 15) has ulp 1, so the sum is the rounded integer plus the magic
# number, read back from its bits. jnp.round is not vectorised by XLA on the CPU. The operand is a minimum's output, never a product, so
# there is no multiply-add for XLA to contract. The spec's clamps cannot act (docs/spec.md,
# section 10: y >= -127.00004, or >= -tiny for INT4, rounds to the bound or to 0), so
# only the upper one is kept, as that barrier: without it XLA fuses product and add into
# an FMA, which rounds once where the spec rounds twice (conformance case
# rounding-ties/*/products-on-ties fails then).
ROUND_MAGIC_SIGNED = _f32(_spec.ROUND_MAGIC_SIGNED_BITS)
ROUND_MAGIC_UNSIGNED = _f32(_spec.ROUND_MAGIC_UNSIGNED_BITS)


def round_clamped(y, magic):
    """int32 round-half-even of float32 values in [-127.00004, 127] (magic
    ROUND_MAGIC_SIGNED) or [-tiny, 15] (ROUND_MAGIC_UNSIGNED)."""
    return jax.lax.bitcast_convert_type(y + magic, I32) - jax.lax.bitcast_convert_type(magic, I32)


def int8_quantize(x):
    xf = _widen(x)
    scale, inv, poisoned = _per_token_params(xf, R127)
    q = round_clamped(jnp.minimum(xf * inv[..., None], INT8_MAX), ROUND_MAGIC_SIGNED).astype(jnp.int8)
    return _zero_where(q, poisoned[..., None]), scale


def int8_dequantize(codes, scales, out_dtype: str):
    """value = float32(q) * scale: never subnormal for a normal scale and |q| >= 1."""
    scales = _canonical_params(scales)
    return _to_output(codes.astype(F32) * scales, out_dtype)


# ------------------------------------------------- INT4, INT2, per channel
# Written once in kvquant/_formulas.py for PyTorch and JAX; the namespace M above holds
# what is XLA's own (where the poisoned select goes, packing by bitcasts).
def int4_quantize(x, group_size: int):
    return _formulas.quantize_token_groups(M, _widen(x), group_size, R15, 15, 2)


def pack_codes(q, codes_per_byte: int):
    """_formulas.pack_codes; nibbles (uint8 codes [..., 2n], each below 16, to bytes
    [..., n], element 2j in the low nibble) by reading each pair as one little-endian
    uint16 w = lo + 256 hi, whose byte is the low 8 bits of w | w >> 4: a bitcast, where
    slicing the pairs apart is slower."""
    if codes_per_byte != 2:
        return _formulas.pack_codes(M, q, codes_per_byte)
    pairs = jax.lax.bitcast_convert_type(q.reshape(q.shape[:-1] + (q.shape[-1] // 2, 2)), jnp.uint16)
    return ((pairs | (pairs >> 4)) & 0xFF).astype(jnp.uint8)


def unpack_codes(packed, codes_per_byte: int):
    """_formulas.unpack_codes (the inverse of pack_codes): bytes
    [..., n] to uint8 codes [..., n * k].

    Four bytes at a time when n allows: as one little-endian uint32 word, code j of the
    word's 4k is (word >> (8 / k) j) & (2^(8/k) - 1), a broadcast over j that XLA fuses
    into the dequantization loop. Unpacking uint8 or uint16 lanes on their own took as
    long as the float arithmetic after it, and the formulas' uint8 shifts and stack were
    slower still (docs/performance.md)."""
    lead, n = packed.shape[:-1], packed.shape[-1]
    if n % 4 == 0:
        bits = 8 // codes_per_byte
        words = jax.lax.bitcast_convert_type(packed.reshape(lead + (n // 4, 4)), U32)
        codes = (words[..., None] >> _CODE_SHIFTS[codes_per_byte]) & U32((1 << bits) - 1)
        return codes.astype(jnp.uint8).reshape(lead + (codes_per_byte * n,))
    if codes_per_byte != 2:
        return _formulas.unpack_codes(M, packed, codes_per_byte)
    w = packed.astype(jnp.uint16)
    pairs = jax.lax.bitcast_convert_type((w & 0x0F) | ((w >> 4) << 8), jnp.uint8)
    return pairs.reshape(lead + (2 * n,))


_CODE_SHIFTS = {k: np.arange(0, 32, 8 // k, dtype=np.uint32) for k in (2, 4)}


def int4_dequantize(packed, scales, zeros, group_size: int, out_dtype: str, params_checked: bool = False):
    """params_checked: int4_params_checked holds; then the scales are not canonicalised
    either (XLA redid that per element)."""
    v = _formulas.dequantize_token_groups(M, packed, scales, zeros, group_size, 2, params_checked)
    return v.astype(DTYPES[out_dtype]) if params_checked else _to_output(v, out_dtype)


@jax.jit
def int4_params_checked(scales, zeros):
    """Whether int4_dequantize may take params_checked=True: all finite, and no group with
    a scale below 2^-99 or with 0 < |zero * scale| < 2^-124 (docs/spec.md, section 8,
    item 7: only those can give a value below 2^-125). On the parameters as given: a
    subnormal zero that canonicalisation would make 0 can only make the look stricter."""
    s, z = scales.astype(F32), zeros.astype(F32)
    plain_scale = (s >= INT4_PLAIN_SCALE) & (s < INF)
    at_risk = (jnp.abs(z) * s < INT4_PLAIN_ZERO_PRODUCT) & (z != ZERO)
    return jnp.all(plain_scale & (jnp.abs(z) < INF) & ~at_risk)


def int2_quantize(x, group_size: int):
    return _formulas.quantize_token_groups(M, _widen(x), group_size, R3, 3, 4)


def int2_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_token_groups(M, packed, scales, zeros, group_size, 4), out_dtype)


def int4_channel_quantize(x, group_size: int):
    return _formulas.quantize_channel_blocks(M, _widen(x), group_size, R15, 15, 2)


def int4_channel_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_channel_blocks(M, packed, scales, zeros, group_size, 2), out_dtype)


def int2_channel_quantize(x, group_size: int):
    return _formulas.quantize_channel_blocks(M, _widen(x), group_size, R3, 3, 4)


def int2_channel_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_channel_blocks(M, packed, scales, zeros, group_size, 4), out_dtype)
